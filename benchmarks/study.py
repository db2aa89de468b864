"""A shared study's workers: K trials stacked per batch against one trial per worker process.

    python benchmarks/study.py --rows 5000 --dim 1024 --configs 8

Writes a synthetic cache (pipeline.data.synthetic.write_feature_cache), then runs the same 8-configuration grid
through a journal-file study twice: one worker with --batch K (all K configurations x folds trained as one
stack), and K worker processes one after another with --trials 1 --batch 1 (as a SLURM array of one trial per
task would). Prints one JSON line with both wall times (process start included) and their ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

#: The 8-configuration grid of the benchmark (the keys of configs/sweep.yaml that change the stack's work).
SWEEP = {"method": "grid", "seed": 0, "rank_by": "state.accuracy", "folds": 3, "test_fraction": 0.2,
         "params": {"heads.res-mtnet.hidden": [256, 512], "heads.res-mtnet.dropout": [0.3, 0.5],
                    "heads.res-mtnet.lr": [1.0e-4, 3.0e-4]}}


def worker(cache: Path, sweep: Path, storage: Path, epochs: int, *extra: str) -> float:
    started = time.perf_counter()
    code = "import sys; from stages.cli import main; sys.exit(main())"
    subprocess.run([sys.executable, "-c", code, "sweep", "work", str(sweep), "--cache", str(cache),
                    "--study", str(storage), "--no-progress", "-q", "--set", "train.features=[synthetic:features]",
                    "--set", "train.tasks=[state, presence]", "--set", f"heads.res-mtnet.epochs={epochs}", "--set",
                    "heads.res-mtnet.early_stopping=0", "--set", "heads.res-mtnet.batch_size=128", *extra], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--configs", type=int, default=8, help="the grid's size (8: the spec above)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("study-bench"))
    args = parser.parse_args()
    from pipeline.data.synthetic import write_feature_cache

    args.out.mkdir(parents=True, exist_ok=True)
    cache = write_feature_cache(args.out / "c.h5", args.rows, args.dim, seed=0)
    sweep = args.out / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    for old in args.out.glob("*.log*"):
        old.unlink()
    stacked = worker(cache, sweep, args.out / "stacked.log", args.epochs, "--batch", str(args.configs))
    single = sum(worker(cache, sweep, args.out / "single.log", args.epochs, "--trials", "1", "--batch", "1")
                 for _ in range(args.configs))
    print(json.dumps({"rows": args.rows, "dim": args.dim, "configs": args.configs, "folds": 3,
                      "epochs": args.epochs, "stacked_batch_s": round(stacked, 1),
                      "one_trial_per_process_s": round(single, 1), "ratio": round(single / stacked, 2)}))


if __name__ == "__main__":
    main()
