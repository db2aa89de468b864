"""Hardening (issue 7): faults, bad input, safe loading, concurrency and determinism, each proven here."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cache.reader import CachedFeatures, FeatureCache
from pipeline.config import load_config
from pipeline.errors import BackboneError, CacheError, ConfigError
from pipeline.features.backbones import create_backbone
from stages.cli import main
from stages.extract import extract_features
from tests.helpers import TINY, assert_same_cache, tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--backbone", TINY[0], "--backbone", TINY[1], "--weights", "none", "--image-size", "64",
             "--batch-size", "4", "--num-workers", "0", "--no-progress", "--set", "extract.fused={}"]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------------------- faults


def test_truncated_cache_is_detected_with_a_way_out(synthetic_master, tiny_cache, tmp_path):
    path = tmp_path / "c.h5"
    data = tiny_cache.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=r"damaged or incomplete .* --rebuild"):
        FeatureCache(path)
    result = _cli("extract-features", "--data", synthetic_master, "--cache", path, *TINY_ARGS)
    assert result.exit_code == 1 and "--rebuild" in result.output and "Traceback" not in result.output
    result = _cli("extract-features", "--data", synthetic_master, "--cache", path, *TINY_ARGS, "--rebuild")
    assert result.exit_code == 0, result.output
    with FeatureCache(path) as c:
        assert len(c) == 24


def test_full_disk_is_a_clear_error_and_the_old_cache_survives(synthetic_master, tiny_cache, tmp_path, monkeypatch):
    path = tmp_path / "c.h5"
    shutil.copy(tiny_cache, path)
    before = tmp_path / "before.h5"
    shutil.copy(path, before)
    import cache.writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cache.writer, "add_fused", full)
    result = _cli("extract-features", "--data", synthetic_master, "--cache", path, "--backbone", "timm:test_convnext",
                  *TINY_ARGS[4:])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "No space left on device" in result.output and "earlier results were left as they were" in result.output
    assert_same_cache(path, before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.h5")]  # no temporary left behind


KILL_TRAIN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import stages.train_heads as th
    from tests.helpers import tiny_train_config
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    th.write_plots = die   # killed after the metrics and the model were written, before the end
    th.train_heads(sys.argv[1], sys.argv[2], tiny_train_config(), progress=False)
""")


@pytest.mark.slow
def test_killed_train_heads_leaves_no_run_folder_that_looks_complete(tiny_cache, tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILL_TRAIN.format(repo=str(REPO)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), str(tiny_cache), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.partial")]
    assert leftovers and not (tmp_path / leftovers[0] / "run.json").exists()


# ----------------------------------------------------------------------------------------- bad input


def test_sixteen_bit_rgba_and_unicode_images_are_extracted(synthetic_dir, tmp_path):
    images = synthetic_dir / "images"
    grey = np.asarray(Image.open(images / "JPCLN001.png"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(images / "JPCLN001.png")
    Image.open(images / "JPCLN002.png").convert("RGBA").save(images / "JPCLN002.png")
    shutil.copy(images / "JPCLN003.png", images / "Lunge_ß_肺.png")
    (synthetic_dir / "manifest.csv").write_text(
        "image,state\nimages/JPCLN001.png,malignant\nimages/JPCLN002.png,benign\nimages/Lunge_ß_肺.png,benign\n",
        encoding="utf-8")
    path = tmp_path / "c.h5"
    extract_features(synthetic_dir / "manifest.csv", path, tiny_config(), progress=False)
    with FeatureCache(path) as c:
        assert c.ids == ["JPCLN001", "JPCLN002", "Lunge_ß_肺"]
        assert np.isfinite(c.features(TINY)).all() and not c.bad.any()


def test_bad_input_through_the_cli_is_one_line_and_writes_nothing(synthetic_dir, tmp_path):
    lines = (synthetic_dir / "jsrt_metadata.csv").read_text().splitlines()
    (synthetic_dir / "jsrt_metadata.csv").write_text("\r\n".join(lines + [lines[3]]) + "\r\n")
    path = tmp_path / "c.h5"
    result = _cli("extract-features", "--data", synthetic_dir, "--cache", path, *TINY_ARGS)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and "duplicate image id" in result.output
    assert not list(tmp_path.glob("c.*"))


# ------------------------------------------------------------------------------------- safe loading


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"state_dict": _Payload(marker)}, handle)
    with pytest.raises(BackboneError, match="refused to load weights file .*evil.pth.*not a plain tensor checkpoint"):
        create_backbone("timm:test_resnet", weights=str(evil))
    assert not marker.exists()
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, zipped)
    with pytest.raises(BackboneError, match="refused"):
        create_backbone("timm:test_resnet", weights=str(zipped))
    assert not marker.exists()


def test_yaml_is_read_safely(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"extract: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(config))
    assert not marker.exists()


def test_nothing_in_a_cache_needs_unpickling(tiny_cache):
    kinds = set()

    def visit(name, obj):
        for value in obj.attrs.values():
            kinds.add(type(value).__name__)
        if isinstance(obj, h5py.Dataset):
            assert obj.dtype.kind in "fiub" or h5py.check_string_dtype(obj.dtype) or obj.dtype.kind == "S", name

    with h5py.File(tiny_cache, "r") as f:
        f.visititems(visit)
        for value in f.attrs.values():
            kinds.add(type(value).__name__)
    assert kinds <= {"str", "int64", "float64", "bool", "bool_", "ndarray", "int", "float"}


# -------------------------------------------------------------------------------------- concurrency

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from cache.lock import cache_lock
    with cache_lock(__import__("pathlib").Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.mark.slow
def test_a_second_writer_process_is_refused(synthetic_master, tmp_path):
    path = tmp_path / "c.h5"
    script = tmp_path / "hold.py"
    script.write_text(HOLD_LOCK.format(repo=str(REPO)))
    holder = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = _cli("extract-features", "--data", synthetic_master, "--cache", path, *TINY_ARGS)
        assert result.exit_code == 1
        assert f"being written by another process (pid {holder.pid})" in result.output
    finally:
        holder.kill()
        holder.wait()
    assert _cli("extract-features", "--data", synthetic_master, "--cache", path, *TINY_ARGS).exit_code == 0


def test_a_reader_during_a_write_sees_only_complete_content(synthetic_master, tiny_cache, tmp_path):
    path = tmp_path / "c.h5"
    shutil.copy(tiny_cache, path)
    with FeatureCache(path) as reader:
        old = reader.features(TINY)
        cfg = tiny_config(**{"extract.backbones": TINY + ["timm:test_convnext"]})
        extract_features(synthetic_master, path, cfg, progress=False)
        np.testing.assert_array_equal(reader.features(TINY), old)  # still the complete old file
        with pytest.raises(CacheError, match="no features of 'timm:test_convnext'"):
            reader.features(["timm:test_convnext"])
    with FeatureCache(path) as fresh:
        assert fresh.features(["timm:test_convnext"]).shape == (24, 64)


def test_dataloader_workers_each_open_the_cache(tiny_cache):
    dataset = CachedFeatures(tiny_cache, TINY)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2)
    rows, feats = [], []
    for x, r in loader:
        feats.append(x.numpy())
        rows.append(r.numpy())
    with FeatureCache(tiny_cache) as c:
        expected = c.features(TINY)
    np.testing.assert_array_equal(np.concatenate(feats), expected[np.concatenate(rows)])
    assert dataset._handle is None  # the parent never opened it: each worker did


# ------------------------------------------------------------------------------------- determinism


def test_same_inputs_same_cache_bit_for_bit(synthetic_master, tiny_cache, tmp_path):
    path = tmp_path / "again.h5"
    extract_features(synthetic_master, path, tiny_config(), progress=False)
    assert_same_cache(path, tiny_cache)


def test_the_suite_cannot_reach_the_network():
    """conftest's guard: a connection out fails (the suite runs offline); loopback stays usable."""
    import socket

    with pytest.raises(OSError, match="the suite must run offline"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1: never routed
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with server, socket.create_connection(server.getsockname(), timeout=1):
        pass
