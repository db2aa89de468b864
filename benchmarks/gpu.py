"""One prepared run for a GPU machine (under 5 minutes on one GPU), printing one JSON:

- stage one: the whole extraction loop against the pure forward pass of the paper's pair (bf16 autocast,
  channels_last, batch 64, one decoding worker per core), on the JSRT images;
- stage two: one 5-fold cross-validation of Res-MTNet on the 4768-value cache it just wrote (on the GPU);
- the sweep: configs/sweep.yaml's configurations x 5 folds stacked, against one configuration at a time;
- JPEG decoding: benchmarks/extract.py --decode on this machine (a CPU worker's rates per format, and with
  `extract.decode gpu` the worker's share and the GPU's own decode + resize rate);
- stage two at scale: benchmarks/scale.py's 1,000,000 x 768 float16 row with the heads on the GPU, in its own
  process, given whatever is left of the 5 minutes (reported as skipped when that is too little).

    python benchmarks/gpu.py --data ../shared/data/jsrt                 # on the GPU (random-init weights)
    python benchmarks/gpu.py --quick                                     # CPU smoke run: tiny models, seconds

--quick runs the same code on a CPU with tiny random backbones and a small synthetic data set, so the script is
known to work before GPU time is spent on it (tests/test_offline_and_gpu.py runs it).
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


def stage_two(cache: Path, cfg, sweep: Path, n_configs, repeats: int) -> dict:
    from pipeline.evaluation.engine import cross_validate, load_train_data

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train import sweep_times  # benchmarks/train.py: the same sweep measurement as on the CPU

    data = load_train_data(cache, cfg)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        cross_validate(data, cfg)
        times.append(time.perf_counter() - started)
    return {"cv_run_s": statistics.median(times), "cv_runs_s": times, "device": cfg.train.device,
            "sweep": sweep_times(data, cfg, sweep, n_configs)}


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
        return {"rows": rows, "skipped": f"not finished in the {seconds_left:.0f} s left of the 5 minutes"}
    result = json.loads(done.stdout)["results"][0]
    result.pop("log")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "jsrt")
    parser.add_argument("--weights", default="none", help="none (default: speed does not depend on the values)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", type=int, default=None, help="sweep: only the first N configurations")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny backbones, synthetic data")
    parser.add_argument("--scale-rows", type=int, default=None,
                        help="rows of the stage-two run at scale (default 1,000,000; --quick 2,000); 0 skips it")
    args = parser.parse_args()
    started = time.perf_counter()

    from pipeline import runtime

    runtime.configure(None)
    import torch

    from pipeline.config import load_config

    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "cores": runtime.available_cores()}
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
            n_configs, repeats = args.configs or 2, 1
        else:
            data = args.data
            overrides = {"extract.amp": "bf16", "extract.channels_last": True, "extract.batch_size": 64,
                         "extract.num_workers": runtime.available_cores(), "train.device": "auto"}
            n_configs, repeats = args.configs, args.repeats
        cfg = load_config("paper", {"extract.weights": args.weights, **overrides})
        cache = Path(tmp) / "features.h5"
        result["stage_one"] = stage_one(data, cache, cfg, repeats)
        print(f"stage one: {json.dumps(result['stage_one'])}", file=sys.stderr)
        result["stage_two"] = stage_two(cache, cfg, REPO / "configs" / "sweep.yaml", n_configs, repeats)
    if not args.quick:  # the CPU smoke run leaves the decode table to benchmarks/extract.py (tens of seconds here)
        result["jpeg_decode"] = jpeg_decode(args.data, repeats)
    rows = (2000 if args.quick else 1_000_000) if args.scale_rows is None else args.scale_rows
    if rows:
        result["stage_two_at_scale"] = stage_two_at_scale(rows, 64 if args.quick else 768,
                                                          "cpu" if args.quick else "cuda",
                                                          300 - (time.perf_counter() - started))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
