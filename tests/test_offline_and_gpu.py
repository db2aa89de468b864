"""The paths real users take (issue 13): published weight files, hub caches offline, fetch-weights, and the
reduced-precision path exercised on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.reader import FeatureCache
from pipeline.features.backbones import REGISTRY, TORCHVISION, create_backbone, parse_spec
from stages.extract import extract_features
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _library_model(spec: str, seed: int):
    """The library's own model for a registry entry, with random weights and its classifier (as published)."""
    parsed = parse_spec(spec)
    torch.manual_seed(seed)
    if parsed.library == "torchvision":
        from torchvision import models

        return getattr(models, parsed.arch)(weights=None, **dict(TORCHVISION[parsed.arch].build_kwargs))
    import timm

    return timm.create_model(parsed.arch, pretrained=False)


def _features_of(model, spec: str, size: int) -> np.ndarray:
    """What the library's model with these tensors gives as features: its classifier removed, eval mode."""
    parsed = parse_spec(spec)
    if parsed.library == "torchvision":
        from pipeline.features.backbones import set_module

        set_module(model, TORCHVISION[parsed.arch].head, torch.nn.Identity())
    else:
        model.reset_classifier(0)
    model.eval()
    with torch.no_grad():
        return model(_images(size)).numpy()


def _images(size: int) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_weight_files_as_the_libraries_publish_them(name, tmp_path):
    """torchvision's .pth (classifier included, DenseNet's legacy key names) and timm's hub model.safetensors
    (with and without the classifier) load for every registered backbone and give the library's features."""
    from safetensors.torch import save_file

    spec = parse_spec(name).spec
    model = _library_model(spec, seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    files = []
    if parse_spec(spec).library == "torchvision":
        published = state
        if "densenet" in spec:  # torchvision's published DenseNet checkpoints name layers "norm.1", not "norm1"
            import re

            published = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                         for k, v in state.items()}
            assert published.keys() != state.keys()
        files.append(tmp_path / "published.pth")
        torch.save(published, files[-1])
    else:
        files.append(tmp_path / "model.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(files[-1]))
        head = model.default_cfg["classifier"]
        files.append(tmp_path / "headless.safetensors")
        save_file({k: v.contiguous() for k, v in state.items() if not k.startswith(head + ".")}, str(files[-1]))
    expected = _features_of(model, spec, 64)
    for path in files:
        ours, info = create_backbone(name, weights=str(path))
        with torch.no_grad():
            got = ours(_images(64)).numpy()
        assert got.shape == (2, info.feature_dim)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=str(path))


OFFLINE_RUN = """
import json, sys
sys.path.insert(0, {repo!r})
from click.testing import CliRunner
from stages.cli import main
results = [CliRunner().invoke(main, args) for args in {commands!r}]
print(json.dumps([{{"code": r.exit_code, "output": r.output}} for r in results]))
"""


def _offline(commands, env_dirs, tmp_path):
    """Run CLI commands in one fresh process with HF_HUB_OFFLINE=1 and the given caches (both are read when
    the libraries are imported, hence a new process); one result per command."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(env_dirs / "hf"), "TORCH_HOME": str(env_dirs / "torch")}
    env.pop("HF_HUB_CACHE", None)
    script = tmp_path / "run.py"
    script.write_text(OFFLINE_RUN.format(repo=str(REPO), commands=[[str(a) for a in args] for args in commands]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fill_caches(root: Path):
    """A timm hub cache and a TORCH_HOME laid out as the libraries write them, with random weights."""
    from safetensors.torch import save_file

    hub = root / "hf" / "hub" / "models--timm--test_efficientnet.r160_in1k"
    (hub / "refs").mkdir(parents=True)
    revision = "0" * 40
    (hub / "refs" / "main").write_text(revision)
    (hub / "snapshots" / revision).mkdir(parents=True)
    timm_model = _library_model("timm:test_efficientnet.r160_in1k", seed=2)
    timm_file = hub / "snapshots" / revision / "model.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(timm_file))
    checkpoints = root / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    tv_file = checkpoints / "resnet18-f37072fd.pth"  # the name torchvision downloads ResNet18_Weights.IMAGENET1K_V1 to
    torch.save(_library_model("torchvision:resnet18.IMAGENET1K_V1", seed=3).state_dict(), tv_file)
    return timm_file, tv_file


@pytest.mark.slow
def test_imagenet_weights_offline_from_filled_caches(synthetic_master, tmp_path):
    timm_file, tv_file = _fill_caches(tmp_path / "caches")
    common = ["--data", synthetic_master, "--backbone", "timm:test_efficientnet", "--backbone", "resnet18",
              "--image-size", "64", "--num-workers", "0", "--no-progress"]
    hub, files, check = _offline([
        ["extract-features", "--cache", tmp_path / "hub.h5", "--weights", "imagenet", *common],
        ["extract-features", "--cache", tmp_path / "files.h5", "--weights", f"timm:test_efficientnet={timm_file}",
         "--weights", f"resnet18={tv_file}", *common],
        ["fetch-weights", "--check", "--backbone", "resnet18", "--backbone", "timm:test_efficientnet"]],
        tmp_path / "caches", tmp_path)
    assert hub["code"] == 0, hub["output"]
    assert files["code"] == 0, files["output"]
    with FeatureCache(tmp_path / "hub.h5") as a, FeatureCache(tmp_path / "files.h5") as b:
        for spec in ("timm:test_efficientnet.r160_in1k", "torchvision:resnet18.IMAGENET1K_V1"):
            np.testing.assert_array_equal(a.features([spec]), b.features([spec]))  # the same tensors
            assert a.backbones[spec].attrs["params_sha256"] == b.backbones[spec].attrs["params_sha256"]
        assert a.backbones["timm:test_efficientnet.r160_in1k"].attrs["weights_id"] == \
            "hf-hub:timm/test_efficientnet.r160_in1k"
        assert a.backbones["torchvision:resnet18.IMAGENET1K_V1"].attrs["weights_id"] == \
            "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert check["code"] == 0 and check["output"].count("present: ") == 2, check["output"]


def test_offline_with_empty_caches_is_one_error_naming_every_missing_backbone(synthetic_master, tmp_path):
    result, check = _offline([
        ["extract-features", "--data", synthetic_master, "--cache", tmp_path / "c.h5", "--backbone", "resnet18",
         "--backbone", "timm:test_efficientnet", "--weights", "imagenet", "--no-progress"],
        ["fetch-weights", "--check", "--backbone", "resnet18"]], tmp_path / "empty", tmp_path)
    lines = [line for line in result["output"].splitlines() if line.startswith("Error:")]
    assert result["code"] == 1 and len(lines) == 1, result["output"]
    for needle in ("2 backbone(s) have no ImageNet weights", "torchvision:resnet18.IMAGENET1K_V1 from https://",
                   "timm:test_efficientnet.r160_in1k from hf-hub:timm/test_efficientnet.r160_in1k",
                   "resmtnet fetch-weights --backbone torchvision:resnet18.IMAGENET1K_V1"):
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "c.h5").exists()
    assert check["code"] == 1 and "MISSING (from https://download.pytorch.org" in check["output"]


def test_bf16_autocast_runs_on_the_cpu_and_stays_close_to_fp32(synthetic_master, tmp_path):
    extract_features(synthetic_master, tmp_path / "fp32.h5", tiny_config(), progress=False)
    extract_features(synthetic_master, tmp_path / "bf16.h5", tiny_config(**{"extract.amp": "bf16"}), progress=False)
    spec = "timm:test_efficientnet.r160_in1k"
    with FeatureCache(tmp_path / "fp32.h5") as a, FeatureCache(tmp_path / "bf16.h5") as b:
        assert a.backbones[spec].attrs["precision"] == "cpu-fp32"
        assert b.backbones[spec].attrs["precision"] == "cpu-bf16"
        full, half = a.features([spec]), b.features([spec])
        assert half.dtype == np.float32  # cast back before HDF5
        assert not np.array_equal(full, half)  # the reduced-precision path really ran
        # bf16 keeps 8 bits of mantissa: features agree to about 1% of their spread
        assert np.abs(half - full).max() <= 0.05 * full.std()
    # a rerun at fp32 on the bf16 cache keeps it: precisions are never mixed inside one entry
    summary = extract_features(synthetic_master, tmp_path / "bf16.h5", tiny_config(), progress=False)
    assert summary.computed == []


@pytest.mark.slow
def test_the_gpu_benchmark_runs_in_quick_mode_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert json.loads((tmp_path / "gpu.json").read_text()) == result  # --out: the last section's write is all
    assert result["stage_one"]["precision"] == "cpu-bf16" and result["stage_one"]["loop_vs_forward"] > 0
    assert result["stage_two"]["cv_run_s"] > 0 and result["stage_two"]["sweep"]["configs"] == 2
    assert set(result["stage_two"]["pooled_device_vs_cpu"]) >= {"state.accuracy", "x.mse"}
    decoded = result["decode_on_device"]  # the device decoder's CPU fallback here: the 1e-3 holds
    assert decoded["images"] == 6 and decoded["device_fp32_vs_pil_fp32"]["max_abs_over_scale"] <= 1e-3
    assert decoded["precision"]["device_bf16"] == "cpu-bf16-tvjpeg" and decoded["pixel_hashes_equal"] == 1.0
    scale = result["stage_two_at_scale"]  # benchmarks/scale.py's row, at 2,000 x 64 here
    assert scale["rows"] == 2000 and scale["peak_rss_gib"] > 0 and scale["train_s"] > 0
