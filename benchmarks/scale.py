"""Stage two at scale: the whole `train-heads` command on synthetic caches of N x D rows.

    python benchmarks/scale.py --rows 10000 30000 100000            # D = 4768, configs/large.yaml, 2 epochs
    python benchmarks/scale.py --rows 3000 --dim 512 --epochs 1     # a quick look

Each cache is written through the cache's public writer (`pipeline.data.synthetic.write_feature_cache`: a real
cache with the paper's label columns), then `train-heads --config large` runs as a fresh process with a fixed
epoch count (early stopping off, so sizes compare). Per N: peak resident memory of that process (its own
rusage) against the feature matrix's size and the bound of 1.5 x the matrix + 1.5 GiB, the command's seconds,
and the training's seconds per epoch per 1,000 rows (metrics.json's timings: the stacked 5-fold training
alone), with where the rest of the time went (baselines, summaries). JSON at the end. --device cuda runs the
same on a GPU (unmeasured here: no GPU on this machine).
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
    """(seconds, peak RSS bytes) of one command, from the child's own rusage."""
    started = time.perf_counter()
    child = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"train-heads failed ({child.returncode}): {' '.join(map(str, args))}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--dim", type=int, default=4768)
    parser.add_argument("--epochs", type=int, default=2)
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
                   "--out", str(out), "--overwrite", "--no-progress", "-q", "--device", args.device,
                   "--set", f"train.epochs={args.epochs}", "--set", "train.early_stopping=0"]
        for item in args.sets:
            command += ["--set", item]
        seconds, rss = run_command(command, env)
        meta = json.loads((out / "metrics.json").read_text())["meta"]
        timings = meta["timings"]
        matrix = n * args.dim * 4
        row = {"rows": n, "dim": args.dim, "matrix_gib": matrix / GIB, "peak_rss_gib": rss / GIB,
               "rss_over_matrix": rss / matrix, "bound_gib": (1.5 * matrix + 1.5 * GIB) / GIB,
               "within_bound": rss <= 1.5 * matrix + 1.5 * GIB, "command_s": seconds,
               "train_s": timings["train"], "baselines_s": timings["baselines"], "summaries_s": timings["summaries"],
               "train_s_per_epoch_per_1k_rows": timings["train"] / timings["train_row_epochs"] * 1000}
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    base = results[0]["train_s_per_epoch_per_1k_rows"]
    for row in results:
        row["per_row_time_vs_first"] = row["train_s_per_epoch_per_1k_rows"] / base
    print(json.dumps({"device": args.device, "epochs": args.epochs, "results": results}, indent=1))


if __name__ == "__main__":
    main()
