"""Stage-two speed: one 5-fold CV run, and a sweep trained at once against the same jobs one after another.

    python benchmarks/train.py --cache CACHE.h5                     # paper features (default train.features)
    python benchmarks/train.py --cache CACHE.h5 --features lite0 --configs 16

The sweep is configs/sweep.yaml (64 configurations) x 5 folds. "stacked" trains every job with one call of
the trainer (jobs of equal shapes share one stacked model); "one config at a time" trains each
configuration's 5 folds as `train-heads` does; "one job at a time" trains every (configuration, fold)
alone. All three train the same jobs with the same random numbers; times are medians over --repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate import make_splits  # noqa: E402
from pipeline.train import Job, prepare, train_jobs  # noqa: E402
from stages.sweep import config_variants, configurations, load_sweep  # noqa: E402
from stages.train_heads import cross_validate, hparams, load_train_data  # noqa: E402


def timed(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--features", action="append", help="default: the paper config's")
    parser.add_argument("--sweep", type=Path, default=REPO / "configs" / "sweep.yaml")
    parser.add_argument("--configs", type=int, default=None, help="only the first N configurations")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the CV run")
    parser.add_argument("--sweep-repeats", type=int, default=1)
    parser.add_argument("--skip-one-job", action="store_true", help="skip the slowest, one-job-at-a-time run")
    args = parser.parse_args()

    cfg = load_config("paper", {"train.features": args.features} if args.features else None)
    data = load_train_data(args.cache, cfg)
    hp = hparams(cfg, data.tasks)
    result = {"cache": str(args.cache), "features": data.specs, "shape": list(data.features.shape),
              "torch_threads": torch.get_num_threads(), "epochs": hp.epochs, "batch_size": hp.batch_size,
              "hidden": hp.hidden}

    cv_times = [timed(lambda: cross_validate(data, cfg, hp)) for _ in range(args.repeats)]
    result["cv_run_s"] = statistics.median(cv_times)
    print(f"one 5-fold CV run (training, baselines, metrics): {cv_times}", file=sys.stderr)

    spec = load_sweep(args.sweep)
    choices = configurations(spec)[:args.configs]
    hps = [hparams(c, data.tasks) for c in config_variants(cfg, choices)]
    splits, _ = make_splits(data.table, data.rows, cfg.eval)
    prep = prepare(data.features, data.targets, data.tasks, splits)
    jobs = [Job(h, s) for h in hps for s in range(len(splits))]
    runs = {"stacked": lambda: train_jobs(prep, jobs),
            "one config at a time": lambda: [train_jobs(prep, [Job(h, s) for s in range(len(splits))]) for h in hps]}
    if not args.skip_one_job:
        runs["one job at a time"] = lambda: [train_jobs(prep, [job]) for job in jobs]
    times = {name: [] for name in runs}
    for _ in range(args.sweep_repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
            print(f"{len(choices)} configurations x {len(splits)} folds, {name}: {times[name][-1]:.1f} s",
                  file=sys.stderr)
    result["sweep_configs"] = len(choices)
    result["sweep_s"] = {name: statistics.median(v) for name, v in times.items()}
    base = result["sweep_s"]["stacked"]
    result["speedup_vs"] = {name: v / base for name, v in result["sweep_s"].items() if name != "stacked"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
