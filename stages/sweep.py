"""Sweeps: many head configurations trained at once, ranked on validation folds, never on test rows.

The rows are split once into development rows and held-out test rows (stratified). Every configuration is
cross-validated on the development rows; the ranking uses those validation folds alone. Only then is the
winner retrained on all development rows and scored once on the test rows, and (by default) trained by
train-heads on every image into OUT/winner, the head predict --model OUT uses. `resmtnet sweep run` runs one
in this process; `sweep work` / `sweep finish` share one across workers (stages/study.py).
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
import yaml

from pipeline.configio import build, dump_config, load_yaml
from pipeline.config import Config, set_key, validate_config
from pipeline.errors import ConfigError
from pipeline.evaluation.engine import TrainData, inner_val_fraction, load_train_data
from pipeline.core.splits import make_splits, official_split, split_groups, stratified_subset, stratify_labels
from pipeline.fsutil import atomic_write_text, json_text, staged_dir
from pipeline.heads.artefact import WINNER
from pipeline.heads.plugin import Validation, loaded_heads
from pipeline.core.train import Split
from stages.progress import progress_bars

logger = logging.getLogger(__name__)


@dataclass
class SweepSpec:
    method: str = "grid"
    trials: int = 64
    seed: int = 0
    rank_by: str = "state.f1_weighted"
    folds: int = 5
    test_fraction: float = 0.2
    params: Dict[str, Any] = field(default_factory=dict)
    configs: List[Dict[str, Any]] = field(default_factory=list)  # method: list, the configurations themselves


@dataclass
class SweepResult:
    ranking: pd.DataFrame
    n_configs: int
    seconds: float
    winner_test: Dict[str, Dict[str, float]]
    model: Optional[Path] = None  # the winner trained on every image (OUT/winner), None without train_winner


def load_sweep(path: Path) -> SweepSpec:
    spec = build(SweepSpec, load_yaml(path) or {}, str(path))
    if spec.method == "list":
        if not spec.configs or not all(isinstance(c, dict) for c in spec.configs) or spec.params:
            raise ConfigError(f"{path}: method list needs 'configs', a list of mappings of config keys to values "
                              "(each one configuration; {} is the base config), and no 'params'")
        return spec
    if spec.configs:
        raise ConfigError(f"{path}: 'configs' is for method: list; method {spec.method} searches 'params'")
    if not spec.params:
        raise ConfigError(f"{path}: 'params' is empty; list the config keys to search")
    for key, values in spec.params.items():
        if isinstance(values, dict):
            if spec.method == "grid" or not {"min", "max"} <= set(values):
                raise ConfigError(f"{path}: {key}: a range needs min and max and method: random")
        elif not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: {key} must be a non-empty list of values (or a range)")
    return spec


def configurations(spec: SweepSpec) -> List[Dict[str, Any]]:
    """The listed configurations of a list, grid or random search; other methods search adaptively (a shared
    study)."""
    if spec.method == "list":
        return [dict(c) for c in spec.configs]
    if spec.method not in ("grid", "random"):
        raise ConfigError(f"sweep method '{spec.method}' searches adaptively: run it as a shared study (train-heads "
                          "--sweep SPEC --study STORAGE); in one process: list, grid or random")
    keys = list(spec.params)
    if spec.method == "grid":
        return [dict(zip(keys, combo)) for combo in itertools.product(*(spec.params[k] for k in keys))]
    rng = np.random.default_rng(spec.seed)
    out = []
    for _ in range(spec.trials):
        choice = {}
        for key, values in spec.params.items():
            if isinstance(values, dict):
                lo, hi = float(values["min"]), float(values["max"])
                choice[key] = float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if values.get("log") \
                    else float(rng.uniform(lo, hi))
            else:
                choice[key] = values[int(rng.integers(len(values)))]
        out.append(choice)
    return out


def config_variants(cfg: Config, choices: List[Dict[str, Any]]) -> List[Config]:
    """One copy of `cfg` per sweep choice, with the choice's keys set (type-checked like CLI overrides)."""
    out = []
    for choice in choices:
        c = copy.deepcopy(cfg)
        for key, value in choice.items():
            set_key(c, key, value)
        out.append(validate_config(c, "sweep"))
    return out


def rank_direction(data: TrainData, cfg: Config, rank_by: str, where: str) -> int:
    """+1 where a higher `rank_by` is better, -1 for errors: a metric of a head family whose inputs were loaded
    (the reference's '<task>.<metric>', from the task's kind; another family's '<family>.<metric>', e.g.
    loc.froc_radius_at_2fp at eval.froc_fps' levels). A family's own name is looked up before the tasks."""
    families = loaded_heads(data)[::-1]  # the reference (listed first) last: a family's own name before the tasks
    for plugin in families:
        try:
            direction = plugin.rank_direction(data, cfg, rank_by)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if direction is not None:
            return direction
    named = [prefix for plugin in loaded_heads(data) for prefix in plugin.rank_prefixes(data)]
    raise ConfigError(f"{where}: rank_by '{rank_by}' must be <task>.<metric> with a trained task or head family "
                      f"({', '.join(named)})")


def development_split(data: TrainData, cfg: Config, spec: SweepSpec) -> Tuple[np.ndarray, np.ndarray]:
    """(development rows, test rows): the test rows are held out of the whole sweep. With eval.protocol official
    they are the data set's own test list (official_split), never a stratified draw: an official test image must
    not serve as a development row."""
    groups = split_groups(data.table, data.rows, cfg.eval)
    if cfg.eval.protocol == "official":
        train, test = official_split(data.table, data.rows, groups)
        logger.info("sweep: the held-out rows are the data set's own test list (%d images; test_fraction unused)",
                    len(test))
        return data.rows[train], data.rows[test]
    labels = stratify_labels(data.table, cfg.eval.stratify, data.rows)
    dev_idx, test_idx = stratified_subset(np.arange(len(data.rows)), labels, spec.test_fraction, spec.seed, groups)
    return data.rows[dev_idx], data.rows[test_idx]


def sweep_splits(data: TrainData, cfg: Config, spec: SweepSpec, dev_rows: np.ndarray, test_rows: np.ndarray,
                 cfgs: List[Config]) -> List[Split]:
    """The validation folds of the development rows (spec.folds, spec.seed; inner validation as the most any
    configuration of the sweep needs): the same for the in-process sweep and every worker of a shared study."""
    eval_cfg = copy.deepcopy(cfg.eval)
    eval_cfg.protocol, eval_cfg.folds, eval_cfg.seeds = "kfold", spec.folds, [spec.seed]
    val_fraction = max(inner_val_fraction(c) for c in cfgs)
    splits, _ = make_splits(data.table, dev_rows, eval_cfg, val_fraction)
    if any(np.isin(np.concatenate([s.train, s.val, s.test]), test_rows).any() for s in splits):
        raise RuntimeError("a validation split contains held-out test rows")  # a bug, never a user error
    return splits


@dataclass
class Validated:
    """One configuration's cross-validation: its mean validation metrics and their spread, each head family's
    validated epochs (what the winner is retrained for) and mean learning curves."""

    metrics: Dict[str, float]  # 'val_<metric>' (mean over folds), 'val_<rank_by>_std', '<epochs_key>' per family
    curves: Dict[str, List[float]]  # per epoch, mean over folds (the reference's train_loss, val_loss, ...)


def validate_configs(data: TrainData, cfgs: List[Config], splits: List[Split], spec: SweepSpec,
                     bars) -> List[Validated]:
    """Train every configuration on every fold (each head family whose inputs were loaded, all configurations x
    folds as one stack) and score each on its folds' validation rows."""
    families = [(plugin, Validation(*plugin.validate(data, cfgs, splits, bars))) for plugin in loaded_heads(data)]
    out = []
    for c in range(len(cfgs)):
        per_fold = []
        for s in range(len(splits)):
            fold_metrics: Dict[str, float] = {}
            for plugin, validation in families:
                fold_metrics.update({plugin.qualified(k): v for k, v in validation.metrics(c, s).items()})
            per_fold.append(fold_metrics)
        frame = pd.DataFrame(per_fold)
        metrics = {f"val_{col}": float(frame[col].mean()) for col in frame.columns}
        metrics[f"val_{spec.rank_by}_std"] = float(frame[spec.rank_by].std(ddof=1)) if spec.rank_by in frame \
            else float("nan")
        curves: Dict[str, List[float]] = {}
        for plugin, validation in families:
            metrics[plugin.epochs_key] = validation.epochs(c)
            curves.update({plugin.qualified(k): v for k, v in validation.curves(c).items()})
        out.append(Validated(metrics, curves))
    return out


def rank(rows: List[Dict[str, Any]], spec: SweepSpec, direction: int, where: str) -> pd.DataFrame:
    """The ranking table: best first on the validation mean of spec.rank_by (ties keep configuration order)."""
    ranking = pd.DataFrame(rows).sort_values("config", kind="stable")
    key = f"val_{spec.rank_by}"
    if key not in ranking:
        raise ConfigError(f"{where}: metric '{spec.rank_by}' was not computed on these folds")
    ranking = ranking.sort_values(key, ascending=direction < 0, kind="stable")
    ranking.insert(0, "rank", np.arange(1, len(ranking) + 1))
    return ranking.reset_index(drop=True)


def score_winner(data: TrainData, cfg: Config, row: pd.Series, dev_rows: np.ndarray, test_rows: np.ndarray,
                 spec: SweepSpec) -> Dict[str, Any]:
    """The winner retrained on the development rows (each head family for its validated epochs), scored once on
    the test rows: the reference's task -> metric -> value, and each other family's under its name."""
    split = Split(train=dev_rows, test=test_rows, key=spec.seed * 1000 + 998)
    test: Dict[str, Any] = {}
    for plugin in loaded_heads(data):
        plugin.place(test, plugin.score_winner(data, cfg, int(row[plugin.epochs_key]), split), key=plugin.name)
    return test


def winner_epochs(data: TrainData, row: pd.Series) -> Dict[str, int]:
    """The winner's validated epochs, per head family (its epochs_key)."""
    return {p.epochs_key: int(row[p.epochs_key]) for p in loaded_heads(data)}


def write_sweep(out: Path, overwrite: bool, ranking: pd.DataFrame, spec: SweepSpec, cfg: Config, winner_cfg: Config,
                choice: Dict[str, Any], test: Dict[str, Any], epochs: Dict[str, int], n_dev: int, n_test: int,
                run: Dict[str, Any]) -> None:
    """ranking.csv, winner.json, winner.yaml (the winner's whole config: train-heads --config it), the sweep spec
    and the base config, then run.json."""
    key = f"val_{spec.rank_by}"
    with staged_dir(out, overwrite) as tmp:
        ranking.to_csv(tmp / "ranking.csv", index=False)
        (tmp / "sweep.yaml").write_text(yaml.safe_dump(spec.__dict__, sort_keys=False))
        (tmp / "config.yaml").write_text(dump_config(cfg))
        (tmp / "winner.yaml").write_text(dump_config(winner_cfg))
        (tmp / "winner.json").write_text(json_text({
            "config": choice, "rank_by": spec.rank_by, "validation": float(ranking.iloc[0][key]),
            "epochs": epochs, "test": test, "n_dev": n_dev, "n_test": n_test,
            "note": "ranked on validation folds of the development rows (epochs chosen on inner validation rows "
                    "of their training part); the test rows were scored once, after the ranking"}))
        atomic_write_text(tmp / "run.json", json.dumps({"complete": True, **run}))


def track_configs(track: str, name: str, cfgs: List[Config], configs: List[Dict[str, Any]],
                  validated: List[Validated], first: int = 0) -> None:
    """Log each configuration's validation metrics and mean learning curves (every head family's) to MLflow."""
    from pipeline.configio import to_dict
    from pipeline.tracking import Tracker, flatten

    tracker = Tracker(track)
    for c, (cfg, choice, v) in enumerate(zip(cfgs, configs, validated), start=first):
        tracker.log_run(f"{name}-trial-{c}", {**flatten(to_dict(cfg)), "study": name, "trial": c}, v.metrics,
                        v.curves, tags={"resmtnet.kind": "trial", "resmtnet.study": name,
                                        "resmtnet.choice": json.dumps(choice)})


def fit_winner(cache: Path, out: Path, winner_cfg: Config, progress: bool, track: Optional[str]) -> Path:
    """The winner trained by train-heads on every image into OUT/winner (predict --model OUT reads it)."""
    from stages.train_heads import train_heads

    return train_heads(cache, out / WINNER, winner_cfg, overwrite=True, progress=progress, track=track).out


def run_sweep(cache: Path, out: Path, cfg: Config, sweep_path: Path, *, overwrite: bool = False,
              progress: bool = True, train_winner: bool = True, track: Optional[str] = None) -> SweepResult:
    """Every configuration of the sweep file cross-validated on the development rows at once, ranked, the winner
    scored once on the held-out rows, and (train_winner) trained on every image; `track`: each configuration
    and the winner's run logged to MLflow."""
    started = time.perf_counter()
    bars = progress_bars(progress)
    spec = load_sweep(sweep_path)
    data = load_train_data(cache, cfg)
    direction = rank_direction(data, cfg, spec.rank_by, str(sweep_path))
    configs = configurations(spec)
    cfgs = config_variants(cfg, configs)
    dev_rows, test_rows = development_split(data, cfg, spec)
    splits = sweep_splits(data, cfg, spec, dev_rows, test_rows, cfgs)
    validated = validate_configs(data, cfgs, splits, spec, bars)
    ranking = rank([{"config": c, **choice, **v.metrics}
                    for c, (choice, v) in enumerate(zip(configs, validated))], spec, direction, str(sweep_path))
    winner = int(ranking.iloc[0]["config"])
    winner_test = score_winner(data, cfgs[winner], ranking.iloc[0], dev_rows, test_rows, spec)
    seconds = time.perf_counter() - started
    write_sweep(out, overwrite, ranking, spec, cfg, cfgs[winner], configs[winner], winner_test,
                winner_epochs(data, ranking.iloc[0]), len(dev_rows), len(test_rows),
                {"seconds": seconds, "configs": len(configs)})
    logger.info("sweep: %d configurations x %d folds in %.1f s; best %s = %.4f", len(configs), len(splits),
                seconds, spec.rank_by, ranking.iloc[0][f"val_{spec.rank_by}"])
    if track:
        track_configs(track, Path(sweep_path).stem, cfgs, configs, validated)
    model = fit_winner(cache, out, cfgs[winner], progress, track) if train_winner else None
    return SweepResult(ranking, len(configs), seconds, winner_test, model)
