"""One prepared run for a GPU machine, printing one JSON (and writing it, section by section, to --out so a run cut
short keeps what it measured). The default sections (*) fit in 5 minutes of one GPU: on an H200 they took 19, 45, 36
and 170 s (the last with the 1M-row cache written first); `--only all` adds the others (about 2 minutes more):

- (*) stage one: the whole extraction loop against the pure forward pass of the paper's pair (bf16 autocast,
  channels_last, batch 64, one decoding worker per core), on the images of --data;
- stage one, steady: the same on those images listed 16 times (a few batches only measure the loader's start);
- (*) stage two: 5-fold cross-validation of Res-MTNet on the 4768-value cache it just wrote, on the GPU, against the
  same run on the CPU (its metrics side by side: the two devices' arithmetic differs, so they are close, not equal);
- (*, in stage two) the sweep: configs/sweep.yaml's configurations x 5 folds stacked, against one at a time;
- the trainer's steps: benchmarks/train.py --stack at 200,000 x 768 on the GPU (one member against five stacked;
  with --compare, another checkout's trainer too);
- (*) JPEG decoding on the device (`extract.decode gpu`) against the workers' PIL decode on full-size synthetic
  CheXpert JPEGs: features at fp32 (only the decoder differs), pixel hashes, bf16 against fp32 features, and the
  whole command's images/s either way;
- JPEG decoding: benchmarks/extract.py --decode on this machine (a CPU worker's rates per format, and with
  `extract.decode gpu` the worker's share and the GPU's own decode + resize rate);
- CUDA's own host memory: a fresh process's resident memory before and after cuBLAS and cuDNN start;
- (*) stage two at scale: benchmarks/scale.py's 1,000,000 x 768 float16 row with the heads on the GPU, in its own
  process, given whatever is left of --budget seconds (reported as skipped when that is too little).

    python benchmarks/gpu.py --data ../shared/data/jsrt --out /tmp/gpu   # on the GPU (random-init weights)
    python benchmarks/gpu.py --quick                                     # CPU smoke run: tiny models, seconds

--quick runs every section's code on a CPU with tiny random backbones and small synthetic data, so the script is
known to work before GPU time is spent on it (tests/test_offline_and_gpu.py runs it); there a failing section fails
the run, while on the GPU a failing section records its error and the run goes on to the next.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def stage_one(data: Path, cache: Path, cfg, repeats: int) -> dict:
    """Extraction loop and whole command against the forward bound, interleaved; medians and ratios."""
    import torch

    from pipeline.data.table import load_dataset
    from pipeline.features.extraction import Extractor, load_backbones
    from pipeline.runtime import pick_device
    from stages.extract import extract_features, weights_by_name

    e = cfg.extract
    n = len(load_dataset(data))
    backbones = load_backbones(e.backbones, weights_by_name(cfg, e.backbones), e.image_size, e.interpolation,
                               e.normalize, e.seed)
    extractor = Extractor(backbones, pick_device(e.device, "extract.device"), e.amp, e.channels_last)
    batches = [torch.rand(min(e.batch_size, n - s), 1, e.image_size, e.image_size) for s in range(0, n, e.batch_size)]

    def bound() -> float:
        started = time.perf_counter()
        for batch in batches:
            for key in backbones:
                extractor.run(key, batch)
        if extractor.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    bound()  # warm-up: cuDNN autotuning and lazy CUDA initialisation are not throughput
    loop, command, forward = [], [], []
    for r in range(repeats):
        forward.append(bound())
        started = time.perf_counter()
        summary = extract_features(data, cache, cfg, rebuild=True, progress=False)
        command.append(time.perf_counter() - started)
        loop.append(summary.seconds)
    med = statistics.median
    return {"images": n, "backbones": e.backbones, "precision": extractor.precision, "batch_size": e.batch_size,
            "workers": e.num_workers, "forward_img_s": n / med(forward), "loop_img_s": n / med(loop),
            "command_img_s": n / med(command), "loop_vs_forward": med(forward) / med(loop),
            "command_vs_forward": med(forward) / med(command)}


def variant(cfg, overrides: dict):
    """A copy of `cfg` with dotted keys set and checked (as a sweep's choice is)."""
    from stages.sweep import config_variants

    return config_variants(cfg, [overrides])[0]


def repeated_images(data: Path, times: int, folder: Path) -> Path:
    """A manifest data set listing every image of `data` `times` times (distinct ids): enough batches for every
    decoding worker, where a small data set measures the loader's start rather than its rate."""
    import csv

    from pipeline.data.table import load_dataset

    table = load_dataset(data)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image"])
        for k in range(times):
            writer.writerows([f"{i}-{k}", str(Path(p).resolve())] for i, p in zip(table["id"], table["image"]))
    return folder


def step_times(rows: int, device: str, compare) -> dict:
    """benchmarks/train.py --stack: the trainer's ms per step, one member against five stacked (and --compare's
    code the same way), in a fresh process."""
    command = [sys.executable, str(REPO / "benchmarks" / "train.py"), "--stack", "--rows", str(rows),
               "--device", device] + (["--compare", str(compare)] if compare else [])
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def cuda_host_memory() -> dict:
    """Resident memory of a fresh process before and after CUDA starts (a cuBLAS product and a cuDNN convolution):
    the host memory any CUDA run holds on top of its data."""
    code = ("import resource, torch\n"
            "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
            "before = rss(); x = torch.randn(512, 512, device='cuda'); (x @ x).sum().item(); after_blas = rss()\n"
            "torch.nn.functional.conv2d(torch.randn(8, 3, 64, 64, device='cuda'), torch.randn(4, 3, 3, 3, "
            "device='cuda')).sum().item()\n"
            "print(before, after_blas, rss())")
    before, blas, conv = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                   check=True).stdout.split())
    return {"rss_gib_after_import_torch": before, "after_cublas": blas, "after_cudnn": conv}


def pooled_metrics(cv) -> dict:
    """task -> metric -> pooled value of the reference head's out-of-fold report."""
    overall = cv.reports[cv.reference.model]["overall"]
    return {task: {m: v["pooled"] for m, v in metrics.items()} for task, metrics in overall.items()}


def stage_two(cache: Path, cfg, sweep: Path, n_configs, repeats: int) -> dict:
    """Cross-validation on the configured device (median of `repeats`), once on the CPU for comparison, the sweep."""
    from pipeline.evaluation.engine import cross_validate, load_train_data

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train import sweep_times  # benchmarks/train.py: the same sweep measurement as on the CPU

    data = load_train_data(cache, cfg)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        cv = cross_validate(data, cfg)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    on_cpu = cross_validate(data, variant(cfg, {"train.device": "cpu"}))
    cpu_s = time.perf_counter() - started
    device, cpu = pooled_metrics(cv), pooled_metrics(on_cpu)
    side_by_side = {f"{task}.{m}": [round(v, 4), round(cpu[task][m], 4)]
                    for task, metrics in device.items() for m, v in metrics.items()}
    return {"cv_run_s": statistics.median(times), "cv_runs_s": times, "device": cfg.train.device,
            "cv_on_cpu_s": cpu_s, "pooled_device_vs_cpu": side_by_side,
            "sweep": sweep_times(data, cfg, sweep, n_configs)}


def decode_on_device(folder: Path, cfg, size: int, patients: int, backbone: str) -> dict:
    """`extract.decode gpu` against the workers' PIL decode on synthetic CheXpert JPEGs of `size` px: fp32
    features (only the decoder differs), pixel hashes, bf16 against fp32, and each command's images/s."""
    import numpy as np

    from cache.reader import FeatureCache
    from pipeline.data.synthetic_datasets import write_chexpert
    from stages.extract import extract_features

    data = write_chexpert(folder / "jpeg", patients=patients, per_patient=2, size=size, seed=0)
    base = variant(cfg, {"extract.backbones": [backbone], "extract.fused": {}, "extract.amp": "off"})
    runs = {"pil_fp32": {}, "device_fp32": {"extract.decode": "gpu"},
            "device_bf16": {"extract.decode": "gpu", "extract.amp": "bf16"}}
    out, features, hashes, precision = {"images": 0, "size": size, "backbone": backbone}, {}, {}, {}
    for repeat in range(2):  # the first pass warms up (model build, cuDNN autotuning); the second is timed
        for name, overrides in runs.items():
            path = folder / f"{name}.h5"
            summary = extract_features(data, path, variant(base, overrides), rebuild=True, progress=False)
            out[f"{name}_img_s"] = summary.images_per_s
    for name in runs:
        with FeatureCache(folder / f"{name}.h5") as cache:
            features[name], hashes[name] = cache.features([backbone]), cache.pixel_hashes
            precision[name] = next(iter(cache.backbones.values())).attrs["precision"]
    ref = features["pil_fp32"]
    scale = float(np.abs(ref).max())
    out["images"] = len(ref)
    out["precision"] = precision
    for name in ("device_fp32", "device_bf16"):
        diff = features[name] - ref
        out[f"{name}_vs_pil_fp32"] = {"max_abs_over_scale": float(np.abs(diff).max()) / scale,
                                      "rel_fro": float(np.linalg.norm(diff) / np.linalg.norm(ref))}
    out["pixel_hashes_equal"] = float(np.mean(hashes["device_fp32"] == hashes["pil_fp32"]))
    return out


def jpeg_decode(data: Path, repeats: int) -> dict:
    """benchmarks/extract.py --decode's table on this machine."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from extract import decode

    return decode(argparse.Namespace(data=data, repeats=repeats, forward_rate=[2000, 5000]))


def stage_two_at_scale(rows: int, dim: int, device: str, seconds_left: float) -> dict:
    """benchmarks/scale.py's row of rows x dim float16 (its peak RSS, phases and ratios), in a fresh process."""
    command = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--rows", str(rows), "--dim", str(dim),
               "--dtype", "float16", "--device", device]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(1.0, seconds_left), check=True)
    except subprocess.TimeoutExpired:
        return {"rows": rows, "skipped": f"not finished in the {seconds_left:.0f} s left of the budget"}
    result = json.loads(done.stdout)["results"][0]
    result["log"] = result["log"][:3] + result["log"][-3:]
    return result


class Report:
    """The result dictionary, written to `out` (atomically) after every section; on the GPU a section's error is
    recorded in its place (its traceback's last lines) and the run goes on."""

    def __init__(self, out, strict: bool):
        self.result, self.out, self.strict, self.started = {}, out, strict, time.perf_counter()

    def section(self, name: str, work) -> None:
        began = time.perf_counter()
        try:
            self.result[name] = work()
        except Exception:
            if self.strict:
                raise
            self.result[name] = {"error": traceback.format_exc().strip().splitlines()[-3:]}
        if isinstance(self.result[name], dict):
            self.result[name]["section_s"] = round(time.perf_counter() - began, 1)
        print(f"{name} ({time.perf_counter() - self.started:.0f} s): {json.dumps(self.result[name])[:2000]}",
              file=sys.stderr)
        if self.out:
            from pipeline.fsutil import atomic_write_text

            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "gpu.json", json.dumps(self.result, indent=1))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


#: What a plain run measures: the issue's three (stage one against its bound, the stacked sweep, the 1M-row stage
#: two) and the GPU's JPEG decoding; the rest with --only.
DEFAULT_SECTIONS = ("stage_one", "stage_two", "decode_on_device", "stage_two_at_scale")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "jsrt")
    parser.add_argument("--weights", default="none", help="none (default: speed does not depend on the values)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", type=int, default=None, help="sweep: only the first N configurations")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny backbones, synthetic data")
    parser.add_argument("--scale-rows", type=int, default=None,
                        help="rows of the stage-two run at scale (default 1,000,000; --quick 2,000); 0 skips it")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run (the scale row "
                        "gets what is left)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json, rewritten after each section")
    parser.add_argument("--only", type=lambda v: v.split(","), default=None, help="comma-separated sections to run, "
                        f"or 'all' (default: {','.join(DEFAULT_SECTIONS)}; --quick: all; stage_two needs stage_one)")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout whose trainer stage_two_steps "
                        "times too (e.g. `git archive` of an earlier commit)")
    args = parser.parse_args()

    from pipeline import runtime

    runtime.configure(None)
    import timm
    import torch
    import torchvision

    from pipeline.config import load_config

    report = Report(args.out, strict=args.quick)
    cuda = torch.cuda.is_available()
    report.result["machine"] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                                "torchvision": torchvision.__version__, "timm": timm.__version__,
                                "cores": runtime.available_cores()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from pipeline.data.synthetic import make_synthetic

            data = make_synthetic(Path(tmp) / "data", n_images=24, image_size=64, seed=0)
            tiny = ["timm:test_efficientnet", "timm:test_resnet"]
            overrides = {"extract.backbones": tiny, "extract.fused": {"paper": tiny}, "extract.image_size": 64,
                         "extract.amp": "bf16", "extract.batch_size": 8, "extract.num_workers": 0,
                         "train.features": tiny, "heads.res-mtnet.hidden": 16, "heads.res-mtnet.epochs": 3,
                         "eval.folds": 3,
                         "eval.bootstrap": 10, "train.device": "cpu", "extract.device": "cpu"}
            n_configs, repeats, jpeg = args.configs or 2, 1, dict(size=96, patients=3, backbone=tiny[0])
        else:
            data = args.data
            overrides = {"extract.amp": "bf16", "extract.channels_last": True, "extract.batch_size": 64,
                         "extract.num_workers": runtime.available_cores(), "train.device": "auto"}
            n_configs, repeats = args.configs, args.repeats
            jpeg = dict(size=2500, patients=24, backbone="densenet161")
        cfg = load_config("paper", {"extract.weights": args.weights, **overrides})
        device = "cpu" if args.quick else "cuda"
        cache = Path(tmp) / "features.h5"
        sections = {
            "stage_one": lambda: stage_one(data, cache, cfg, repeats),
            "stage_one_steady": lambda: stage_one(repeated_images(data, 2 if args.quick else 16, Path(tmp) / "rep"),
                                                  Path(tmp) / "steady.h5", cfg, repeats),
            "stage_two": lambda: stage_two(cache, cfg, REPO / "configs" / "sweep.yaml", n_configs, repeats),
            "stage_two_steps": lambda: step_times(2000 if args.quick else 200_000, device, args.compare),
            "decode_on_device": lambda: decode_on_device(Path(tmp), cfg, **jpeg),
            # the CPU smoke run leaves the decode table to benchmarks/extract.py (tens of seconds here)
            "jpeg_decode": lambda: {"skipped": "--quick"} if args.quick else jpeg_decode(args.data, repeats),
            "cuda_host_memory": lambda: cuda_host_memory() if cuda else {"skipped": "no CUDA"},
            "stage_two_at_scale": lambda: stage_two_at_scale(
                rows, 64 if args.quick else 768, device, args.budget - report.elapsed()) if rows else
            {"skipped": "--scale-rows 0"}}
        rows = (2000 if args.quick else 1_000_000) if args.scale_rows is None else args.scale_rows
        chosen = list(sections) if args.quick or args.only == ["all"] else args.only or DEFAULT_SECTIONS
        unknown = set(chosen) - set(sections)
        if unknown:
            parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sections)}")
        for name, work in sections.items():
            if name in chosen:
                report.section(name, work)
    print(json.dumps(report.result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
