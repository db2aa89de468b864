"""Stage two at scale: the whole `train-heads` command on synthetic caches of N x D rows.

    python benchmarks/scale.py --rows 10000 100000 --dim 4768        # D = 4768, configs/large.yaml, 2 epochs
    python benchmarks/scale.py --rows 1000000 --dim 768 --dtype float16   # MIMIC-CXR's size, a ViT-B's width
    python benchmarks/scale.py --rows 3000 --dim 512 --epochs 1      # a quick look

Each cache is written through the cache's public writer (`pipeline.data.synthetic.write_feature_cache`: a real
cache with the paper's label columns), then `train-heads --config large` runs as a fresh process with a fixed
epoch count (early stopping off, so sizes compare). Per N: peak resident memory of that process (its own
rusage) against the feature matrix's size (in --dtype, train.feature_dtype) and the bound of 1.5 x the matrix +
1.5 GiB, the command's seconds and each phase's (metrics.json's timings: reading the matrix, the stacked 5-fold
training, baselines, summaries, the final head; "other" is the rest: imports, outputs), the ratio of the whole
command to read + training, the training's seconds per epoch per 1,000 rows, and when the first progress line
came and the longest gap between two (progress is on, as a log off a terminal; `log`: each line and when it
came). JSON at the end. --device cuda runs the
same on a GPU (benchmarks/gpu.py runs the 1M row so; README: "Measured on a GPU").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 1 << 30


def run_command(args, env) -> tuple:
    """(seconds, peak RSS bytes, seconds at which each stderr line came) of one command, from the child's own
    rusage and its log read as it is written."""
    started = time.perf_counter()
    child = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in child.stderr:
        lines.append((time.perf_counter() - started, line.rstrip()))
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = "\n".join(text for _, text in lines[-5:])
        raise SystemExit(f"train-heads failed ({child.returncode}): {' '.join(map(str, args))}\n{tail}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--dim", type=int, default=4768)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                        help="train.feature_dtype: the matrix's type in memory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folder", type=Path, default=None, help="where the caches go (default: a temp folder)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every run")
    args = parser.parse_args()

    from pipeline.data.synthetic import write_feature_cache

    folder = args.folder or Path(tempfile.mkdtemp(prefix="resmtnet-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results = []
    for n in args.rows:
        cache = folder / f"synthetic-{n}x{args.dim}.h5"
        if not cache.exists():
            started = time.perf_counter()
            write_feature_cache(cache, n, args.dim, seed=0)
            print(f"wrote {cache.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        out = folder / f"run-{n}"
        command = [sys.executable, "-c", "from stages.cli import train_heads_main; train_heads_main()",
                   "--cache", str(cache), "--features", "synthetic:features", "--config", "large",
                   "--out", str(out), "--overwrite", "--device", args.device,
                   "--set", f"heads.res-mtnet.epochs={args.epochs}",
                   "--set", "heads.res-mtnet.early_stopping=0", "--set", f"train.feature_dtype={args.dtype}"]
        for item in args.sets:
            command += ["--set", item]
        seconds, rss, lines = run_command(command, env)
        meta = json.loads((out / "metrics.json").read_text())["meta"]
        timings = meta["timings"]
        matrix = n * args.dim * (2 if args.dtype == "float16" else 4)
        phases = {k: timings.get(k, 0.0) for k in ("read", "train", "baselines", "summaries", "refit")}
        at = [0.0] + [t for t, _ in lines] + [seconds]
        row = {"rows": n, "dim": args.dim, "dtype": args.dtype, "matrix_gib": matrix / GIB, "peak_rss_gib": rss / GIB,
               "rss_over_matrix": rss / matrix, "bound_gib": (1.5 * matrix + 1.5 * GIB) / GIB,
               "within_bound": rss <= 1.5 * matrix + 1.5 * GIB, "command_s": seconds,
               **{f"{k}_s": v for k, v in phases.items()}, "other_s": seconds - sum(phases.values()),
               "command_over_read_and_train": seconds / (phases["read"] + phases["train"]),
               "train_s_per_epoch_per_1k_rows": timings["train"] / timings["train_row_epochs"] * 1000,
               "first_line_s": lines[0][0] if lines else None,
               "longest_silence_s": max(b - a for a, b in zip(at[:-1], at[1:])),
               "log": [[round(t, 1), text[:120]] for t, text in lines]}
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    base = results[0]["train_s_per_epoch_per_1k_rows"]
    for row in results:
        row["per_row_time_vs_first"] = row["train_s_per_epoch_per_1k_rows"] / base
    print(json.dumps({"device": args.device, "epochs": args.epochs, "results": results}, indent=1))


if __name__ == "__main__":
    main()
