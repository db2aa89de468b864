"""Stage-one throughput: the whole extract-features pipeline against a pure forward pass (the upper bound).

Both run in this one process, interleaved, at the same batch size and torch threads; the pipeline decodes
the real PNG files, resizes, hashes and writes the cache, the bound only runs the backbones on tensors
made in advance. Reported: medians over --repeats and their ratio.

    python benchmarks/extract.py --data ../shared/data/jsrt --weights none            # the paper's pair
    python benchmarks/extract.py --data ../shared/data/jsrt --memory                   # peak RSS, 200 vs 2000

--memory makes synthetic data sets of 200 and 2000 images and measures the peak resident memory of a
fresh extract-features process on each (main process and its decoding workers).

--spatial compares a pooled-only cache with one that also holds the spatial maps (--spatial: 512 px,
stage -2): extraction time and size on disk, same backbone and weights, in one run.

    python benchmarks/extract.py --spatial --backbone lite0 \
        --weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors

--decode measures what one decoding worker (one process, one thread: what each DataLoader worker is) delivers:
read + hash + decode + resize to 224 per image, exactly the loader's per-image work (ImageFiles), for the
formats the field ships: JSRT's 1024 px 8-bit PNGs (the real files in --data when there, else synthetic ones),
NIH-like 1024 px PNGs, CheXpert-small JPEGs (about 390 x 320) and full-size JPEGs (CheXpert / MIMIC-CXR-JPG,
about 2500 x 3000); then the workers a forward rate of --forward-rate images/s needs. For the JPEGs, also what
`extract.decode gpu` leaves to a worker (read + hash + header check) and the device's own decode + resize rate
(torchvision, batches of 32: nvjpeg on CUDA; here, on one CPU thread, the CPU fallback).

    python benchmarks/extract.py --decode --forward-rate 500 2000 5000
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.table import load_dataset  # noqa: E402
from pipeline.features.extraction import Extractor, load_backbones  # noqa: E402
from pipeline.runtime import pick_device  # noqa: E402
from stages.extract import extract_features, weights_by_name  # noqa: E402


def forward_bound(cfg, n_images: int) -> float:
    """Seconds for the backbones alone on pre-made, pre-normalised tensors (no I/O, no decode)."""
    e = cfg.extract
    backbones = load_backbones(e.backbones, weights_by_name(cfg, e.backbones), e.image_size, e.interpolation,
                               e.normalize, e.seed)
    extractor = Extractor(backbones, pick_device(e.device), e.amp, e.channels_last)
    batches = [torch.rand(min(e.batch_size, n_images - s), 1, e.image_size, e.image_size)
               for s in range(0, n_images, e.batch_size)]
    started = time.perf_counter()
    for batch in batches:
        for spec in backbones:
            extractor.run(spec, batch)
    return time.perf_counter() - started


def throughput(args) -> dict:
    overrides = {"extract.weights": args.weights, "extract.batch_size": args.batch_size}
    if args.backbone:
        overrides["extract.backbones"] = args.backbone
    if args.num_workers is not None:
        overrides["extract.num_workers"] = args.num_workers
    cfg = load_config("paper", overrides)
    n = len(load_dataset(args.data))
    loop, command, bound = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            if r % 2:  # alternate the order so neither side always runs first
                bound.append(forward_bound(cfg, n))
            started = time.perf_counter()
            summary = extract_features(args.data, Path(tmp) / f"c{r}.h5", cfg, rebuild=True, progress=False)
            command.append(time.perf_counter() - started)
            loop.append(summary.seconds)
            if not r % 2:
                bound.append(forward_bound(cfg, n))
            print(f"repeat {r}: command {command[-1]:.1f} s, extraction loop {loop[-1]:.1f} s, "
                  f"forward bound {bound[-1]:.1f} s", file=sys.stderr)
    med = statistics.median
    return {
        "backbones": cfg.extract.backbones, "weights": args.weights, "images": n,
        "batch_size": cfg.extract.batch_size, "torch_threads": torch.get_num_threads(),
        "forward_img_s": n / med(bound), "loop_img_s": n / med(loop), "command_img_s": n / med(command),
        "loop_vs_forward": med(bound) / med(loop), "command_vs_forward": med(bound) / med(command),
    }


MEMORY_CHILD = """
import resource, sys
sys.path.insert(0, {repo!r})
from pipeline.config import load_config
from stages.extract import extract_features
cfg = load_config("paper", {{"extract.backbones": [{backbone!r}], "extract.weights": "none"}})
extract_features({data!r}, {cache!r}, cfg, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def memory(args) -> dict:
    from pipeline.data.synthetic import make_synthetic

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (200, 2000):
            data = make_synthetic(Path(tmp) / f"d{n}", n_images=n, image_size=512, seed=0)
            code = MEMORY_CHILD.format(repo=str(REPO), backbone=args.memory_backbone, data=str(data),
                                       cache=str(Path(tmp) / f"c{n}.h5"))
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            main_kb, worker_kb = (int(v) for v in res.stdout.split()[-2:])
            out[n] = {"main_mib": main_kb / 1024, "worker_mib": worker_kb / 1024}
            print(f"{n} images: peak RSS main {main_kb / 1024:.0f} MiB, worker {worker_kb / 1024:.0f} MiB",
                  file=sys.stderr)
    out["ratio_main_2000_vs_200"] = out[2000]["main_mib"] / out[200]["main_mib"]
    return out


def spatial(args) -> dict:
    backbones = args.backbone or ["lite0"]
    out = {"backbones": backbones, "weights": args.weights}
    with tempfile.TemporaryDirectory() as tmp:
        for name, enabled in (("pooled", False), ("pooled+spatial", True)):
            cfg = load_config("paper", {"extract.backbones": backbones, "extract.weights": args.weights,
                                        "extract.spatial.enabled": enabled, "extract.batch_size": args.batch_size})
            path = Path(tmp) / f"{name}.h5"
            started = time.perf_counter()
            extract_features(args.data, path, cfg, progress=False)
            out[name] = {"seconds": time.perf_counter() - started, "mib": path.stat().st_size / 2 ** 20}
            print(f"{name}: {out[name]['seconds']:.1f} s, {out[name]['mib']:.1f} MiB", file=sys.stderr)
    out["time_ratio"] = out["pooled+spatial"]["seconds"] / out["pooled"]["seconds"]
    out["size_ratio"] = out["pooled+spatial"]["mib"] / out["pooled"]["mib"]
    return out


def decode(args) -> dict:
    """Images per second of one decoding worker, per format, and the workers each forward rate needs."""
    import math

    import numpy as np
    from PIL import Image

    from pipeline.features.extraction import ImageFiles, collate
    from pipeline.features.jpeg import decode_deferred

    torch.set_num_threads(1)  # a DataLoader worker's own setting
    rng = np.random.default_rng(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"per_worker_images_per_s": {}, "workers_needed": {}, "decode_gpu": {"device": str(device)}}

    def rate(paths, work) -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            work()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return len(paths) / statistics.median(times)

    def worker(files, n):
        for i in range(n):
            item = files[i]
            assert not item.error, item.error

    with tempfile.TemporaryDirectory() as tmp:
        def chest(h, w):  # smooth structure plus noise: compresses as radiographs do, unlike flat or random images
            yy, xx = np.mgrid[0:h, 0:w]
            base = 128 + 60 * np.sin(xx / 37.0) * np.cos(yy / 53.0) + rng.normal(0, 12, (h, w))
            return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))

        made = {"png_1024 (NIH, synthetic)": (".png", 1024, 1024),
                "jpeg_390x320 (CheXpert-small)": (".jpg", 390, 320),
                "jpeg_2500x3000 (CheXpert, MIMIC-CXR-JPG)": (".jpg", 3000, 2500)}
        formats = {}
        real = sorted(args.data.glob("images/*.png"))[:40] if args.data.is_dir() else []
        if real:
            formats["png_1024 (JSRT, real files)"] = [str(p) for p in real]
        for name, (suffix, h, w) in made.items():
            paths = []
            for i in range(20 if h > 2000 else 40):
                path = Path(tmp) / f"{name.split()[0]}_{i}{suffix}"
                chest(h, w).save(path, quality=95) if suffix == ".jpg" else chest(h, w).save(path)
                paths.append(str(path))
            formats[name] = paths
        sizes = [(224, "bilinear")]
        for name, paths in formats.items():
            per_worker = rate(paths, lambda: worker(ImageFiles(paths, sizes), len(paths)))
            out["per_worker_images_per_s"][name] = round(per_worker, 1)
            out["workers_needed"][name] = {str(f): math.ceil(f / per_worker) for f in args.forward_rate}
            print(f"{name}: {per_worker:.0f} images/s per worker", file=sys.stderr)
            if paths[0].endswith(".jpg"):
                deferred = ImageFiles(paths, sizes, defer_jpeg=True)
                items = [deferred[i] for i in range(len(paths))]
                batches = [items[s:s + 32] for s in range(0, len(items), 32)]
                left = rate(paths, lambda: worker(deferred, len(paths)))
                on_device = rate(paths, lambda: [decode_deferred(collate(b), paths, sizes, device) for b in batches])
                out["decode_gpu"][name] = {"per_worker_images_per_s": round(left, 1),
                                           "device_images_per_s": round(on_device, 1)}
                print(f"{name}, extract.decode gpu: {left:.0f} images/s per worker, {on_device:.0f} images/s "
                      f"decoded on {device}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "jsrt")
    parser.add_argument("--backbone", action="append", help="default: the paper's pair")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="peak RSS at 200 vs 2000 images instead")
    parser.add_argument("--memory-backbone", default="resnet18")
    parser.add_argument("--spatial", action="store_true", help="pooled-only vs pooled + spatial maps instead")
    parser.add_argument("--decode", action="store_true", help="images/s of one decoding worker per format instead")
    parser.add_argument("--forward-rate", type=float, nargs="+", default=[500.0, 2000.0, 5000.0],
                        help="--decode: forward rates (images/s) to size the workers for")
    args = parser.parse_args()
    result = (memory(args) if args.memory else spatial(args) if args.spatial else decode(args) if args.decode
              else throughput(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
