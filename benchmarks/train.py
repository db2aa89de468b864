"""Stage-two speed: the whole `train-heads` command, two runs at once, one CV run, and a sweep.

    python benchmarks/train.py --cache CACHE.h5                              # command, concurrency, CV run
    python benchmarks/train.py --cache CACHE.h5 --compare ../base            # ... beside another checkout
    python benchmarks/train.py --cache CACHE.h5 --sweep configs/sweep.yaml --configs 8
    python benchmarks/train.py --step                                      # where one training step goes
    python benchmarks/train.py --stack --rows 100000 --device cuda [--compare ../base]  # steps: 1 vs 5 members
    python benchmarks/train.py --answers [--compare ../base]               # how fast errors and inspect-data answer

"command": `train-heads` from start to exit (a fresh process: imports, reading the cache, 5-fold CV with
baselines and bootstrap CIs, refit, plots, report), median of --repeats. "concurrent": two such commands
started together against the same two run one after the other (the ratio should stay near or below 1 on
shared cores; 11x was measured when their threads spun). With --compare DIR, DIR's code (for example a git
worktree of an earlier commit: `git worktree add ../base HEAD~1`) runs the same command, interleaved with
this checkout's, so both are timed under the same load. "cv": one cross-validation run in-process (no
imports, no refit, no files). The sweep part trains configurations x 5 folds stacked against one
configuration at a time. --step times one training step of 5 stacked members (batch 32, 4768 -> 512, the
paper cache's shapes) against its weight-gradient product alone. --answers times fresh `resmtnet` processes
that should answer at once: --help, a cache that does not exist, a config key that does not exist, and
inspect-data on 24 synthetic images (medians of --repeats). Every figure is printed as JSON at the end.
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


def command_time(code: Path, cache: Path, out: Path, extra=()) -> float:
    """Seconds of one `train-heads` run of the code in `code`, as a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    args = [sys.executable, "-c", "from stages.cli import train_heads_main; train_heads_main()",
            "--cache", str(cache), "--out", str(out), "--overwrite", "--no-progress", "-q", *extra]
    started = time.perf_counter()
    subprocess.run(args, env=env, cwd=code, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def concurrent_time(code: Path, cache: Path, folder: Path, extra=()) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", "from stages.cli import train_heads_main; train_heads_main()",
                               "--cache", str(cache), "--out", str(folder / f"c{i}"), "--overwrite", "--no-progress",
                               "-q", *extra], env=env, cwd=code, stdout=subprocess.DEVNULL) for i in range(2)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"train-heads failed in {code}")
    return time.perf_counter() - started


def answer_times(code: Path, repeats: int) -> dict:
    """Median seconds of the answers that need no model: fresh processes of the code in `code`."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    with tempfile.TemporaryDirectory() as tmp:
        from pipeline.data.synthetic import make_synthetic

        data = make_synthetic(Path(tmp) / "jsrt", n_images=24, image_size=64, seed=0)
        Path(tmp, "c.h5").touch()  # a cache path that exists: the config is what is wrong
        cases = {"help": ["--help"], "missing_cache": ["train-heads", "--cache", f"{tmp}/no.h5", "--out", tmp],
                 "bad_config_key": ["train-heads", "--cache", f"{tmp}/c.h5", "--out", tmp, "--set", "train.nope=1"],
                 "inspect_data_24": ["inspect-data", str(data)]}
        times = {}
        for name, args in cases.items():
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                subprocess.run([sys.executable, "-c", "from stages.cli import main; main()", *args], env=env, cwd=code,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                runs.append(time.perf_counter() - started)
            times[name] = round(statistics.median(runs), 3)
    return times


def step_times(repeats: int = 50) -> dict:
    """Milliseconds of one stacked training step (forward, backward, fused Adam) against its parts."""
    from pipeline import runtime

    runtime.configure(None)
    import torch

    from pipeline.core.adam import FusedAdam

    members, batch, d, h = 5, 32, 4768, 512
    x = torch.randn(members, batch, d)
    w = torch.randn(members, d, h, requires_grad=True)
    b = torch.zeros(members, 1, h, requires_grad=True)
    w2 = torch.randn(members, h, 30, requires_grad=True)
    opt = FusedAdam([{"params": [w, b, w2], "lr": 1e-4}])  # the trainer's optimiser
    delta = torch.randn(members, batch, h)

    def step():
        out = torch.bmm(torch.relu(torch.baddbmm(b, x, w)), w2)
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()

    parts = {"step": step, "forward_first_layer": lambda: torch.baddbmm(b, x, w),
             "weight_gradient_first_layer": lambda: torch.bmm(x.transpose(1, 2), delta)}
    out = {"members": members, "batch": batch, "in": d, "hidden": h, "threads": torch.get_num_threads()}
    for name, fn in parts.items():
        for _ in range(5):
            fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[f"{name}_ms"] = (time.perf_counter() - started) / repeats * 1000
    return out


def stack_times(rows: int, dim: int, device: str) -> dict:
    """Milliseconds per optimiser step of the real trainer on a synthetic rows x dim float16 cache with
    configs/large.yaml's head (one epoch, no early stopping): one member (the refit's shape) against the five folds
    stacked (cross-validation's), on `device`; the median gap between progress ticks over the epoch's middle
    half, so neither the start nor the final scoring counts."""
    from pipeline import runtime

    runtime.configure(None)
    from pipeline.config import load_config
    from pipeline.core.splits import make_splits
    from pipeline.core.train import Job, train_jobs
    from pipeline.data.synthetic import write_feature_cache
    from pipeline.evaluation.engine import load_train_data
    from pipeline.heads.resmtnet.family import pooled_family, settings_of

    cfg = load_config("large", {"train.features": ["synthetic:features"], "train.feature_dtype": "float16",
                                "train.device": device, "heads.res-mtnet.epochs": 1,
                                "heads.res-mtnet.early_stopping": 0})
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "stack.h5"
        write_feature_cache(cache, rows, dim, seed=0)
        data = load_train_data(cache, cfg)
    splits, _ = make_splits(data.table, data.rows, cfg.eval, cfg.train.val_fraction)
    family, head = pooled_family(data, splits), settings_of(cfg)
    out = {"rows": rows, "dim": dim, "device": device, "batch_size": head.batch_size, "hidden": head.hidden}
    for name, jobs in {"one_member": [Job(head, 0)], "five_stacked": [Job(head, s) for s in range(5)]}.items():
        ticks: list = []
        started = time.perf_counter()
        train_jobs(family, jobs, device=device, progress=lambda n: ticks.append(time.perf_counter()))
        gaps = [b - a for a, b in zip(ticks[len(ticks) // 4:], ticks[len(ticks) // 4 + 1:3 * len(ticks) // 4])]
        step = statistics.median(gaps) * 1000
        out[name] = {"steps": len(ticks), "ms_per_step": step, "ms_per_member_step": step / len(jobs),
                     "train_jobs_s": time.perf_counter() - started}
    out["one_member_over_stacked_per_member"] = (out["one_member"]["ms_per_member_step"]
                                                 / out["five_stacked"]["ms_per_member_step"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", action="store_true", help="only time one training step and its parts")
    parser.add_argument("--answers", action="store_true", help="only time the answers that need no model")
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--compare", type=Path, default=None, help="another checkout to time the same way")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep", type=Path, default=None, help="also time a sweep (e.g. configs/sweep.yaml)")
    parser.add_argument("--configs", type=int, default=None, help="sweep: only the first N configurations")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--stack", action="store_true", help="only time the trainer's steps: one member against "
                        "five stacked, on a synthetic --rows x --dim cache (with --compare: DIR's trainer too)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--code", type=Path, default=None, help=argparse.SUPPRESS)  # --compare's child process
    args = parser.parse_args()
    if args.code:
        sys.path.insert(0, str(args.code.resolve()))
    if args.stack:
        result = {"this": stack_times(args.rows, args.dim, args.device)}
        if args.compare:
            child = [sys.executable, __file__, "--stack", "--rows", str(args.rows), "--dim", str(args.dim),
                     "--device", args.device, "--code", str(args.compare)]
            result["compare"] = json.loads(subprocess.run(child, capture_output=True, text=True,
                                                          check=True).stdout)["this"]
        print(json.dumps(result, indent=2))
        return
    if args.step:
        print(json.dumps(step_times(), indent=2))
        return
    if args.answers:
        codes = {"this": REPO} | ({"compare": args.compare.resolve()} if args.compare else {})
        print(json.dumps({name: answer_times(code, args.repeats) for name, code in codes.items()}, indent=2))
        return
    if args.cache is None:
        parser.error("--cache is required (except with --step)")
    cache = args.cache.resolve()
    extra = [x for kv in args.sets for x in ("--set", kv)]
    codes = {"this": REPO} | ({"compare": args.compare.resolve()} if args.compare else {})
    result = {"cache": str(cache), "cpu_count": os.cpu_count(), "repeats": args.repeats, "set": args.sets}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        times = {name: {"command": [], "sequential_two": [], "concurrent_two": []} for name in codes}
        for r in range(args.repeats):
            for name, code in (codes.items() if r % 2 == 0 else reversed(list(codes.items()))):
                t = times[name]
                t["command"].append(command_time(code, cache, folder / "run", extra))
                t["sequential_two"].append(t["command"][-1] + command_time(code, cache, folder / "run", extra))
                t["concurrent_two"].append(concurrent_time(code, cache, folder, extra))
                print(f"{name} repeat {r}: command {t['command'][-1]:.1f} s, two one after the other "
                      f"{t['sequential_two'][-1]:.1f} s, two at once {t['concurrent_two'][-1]:.1f} s", file=sys.stderr)
        for name, t in times.items():
            med = {k: statistics.median(v) for k, v in t.items()}
            med["concurrent_over_sequential"] = med["concurrent_two"] / med["sequential_two"]
            result[name] = {"median_s": med, "all_s": t}
        if args.compare:
            result["this_over_compare_command"] = (result["this"]["median_s"]["command"]
                                                   / result["compare"]["median_s"]["command"])

    from pipeline import runtime

    runtime.configure(None)
    from pipeline.configio import parse_set_options
    from pipeline.config import load_config
    from pipeline.evaluation.engine import cross_validate, load_train_data

    cfg = load_config("paper", parse_set_options(args.sets))
    data = load_train_data(cache, cfg)
    cv_times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        cross_validate(data, cfg)
        cv_times.append(time.perf_counter() - started)
    result["cv_run_s"] = {"median": statistics.median(cv_times), "all": cv_times}
    if args.sweep:
        result["sweep"] = sweep_times(data, cfg, args.sweep, args.configs)
    print(json.dumps(result, indent=2))


def sweep_times(data, cfg, sweep: Path, n_configs) -> dict:
    """Configurations x 5 folds stacked, against one configuration at a time (its folds stacked)."""
    from pipeline.heads.resmtnet.family import pooled_family, settings_of
    from pipeline.core.splits import make_splits
    from pipeline.core.train import Job, train_jobs
    from stages.sweep import config_variants, configurations, load_sweep

    choices = configurations(load_sweep(sweep))[:n_configs]
    cfgs = [settings_of(c) for c in config_variants(cfg, choices)]
    splits, _ = make_splits(data.table, data.rows, cfg.eval, cfg.train.val_fraction)
    family = pooled_family(data, splits)
    out = {"configs": len(choices)}
    started = time.perf_counter()
    train_jobs(family, [Job(c, s) for c in cfgs for s in range(len(splits))], device=cfg.train.device)
    out["stacked_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for c in cfgs:
        train_jobs(family, [Job(c, s) for s in range(len(splits))], device=cfg.train.device)
    out["one_config_at_a_time_s"] = time.perf_counter() - started
    out["speedup"] = out["one_config_at_a_time_s"] / out["stacked_s"]
    return out


if __name__ == "__main__":
    main()
