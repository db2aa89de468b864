"""Stage two's engine: cached features and labels in, cross-validated heads and a refit head out.

`load_train_data` reads what a config asks for from a cache (features, declared tasks, and what each enabled
head family needs); `cross_validate` trains the Res-MTNet head on every split of the protocol through the one
stacked trainer (pipeline.heads.train), beside the baselines on the same splits, then every enabled head family
(pipeline.heads.plugin) on the same splits, and summarises every model with one summariser; `refit` trains the final
heads on all rows for the validated epoch count. train-heads, sweeps and the paper's tables all run through here.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pandas as pd

from cache import FeatureCache
from pipeline import __version__
from pipeline.config import CHOICES, Config
from pipeline.data.labels import load_label_maps
from pipeline.data.table import task_groups
from pipeline.errors import ConfigError
from pipeline.evaluation.evaluate import (OutOfFold, SplitName, baseline_predictions, control_features, make_splits,
                                          regression_norms, size_bins, summarise)
from pipeline.heads.plugin import enabled_heads, head_families
from pipeline.heads.tasks import TaskSpec, encode_targets, resolve_tasks
from pipeline.heads.train import Job, JobResult, Split, fixed_epochs, train_jobs, validated_epochs

logger = logging.getLogger(__name__)

MODEL_NAME = "res-mtnet"
#: progress(total, description, rows=rows per unit) -> a context manager yielding tick(n); stages pass a bar.
Progress = Callable[..., ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(total: int, desc: str, rows: float = 0.0) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def _rows_per_epoch(splits: Sequence[Split]) -> float:
    return float(np.mean([len(s.train) for s in splits])) if splits else 0.0


@dataclass
class TrainData:
    """What stage two reads from a cache: features of the requested backbones, labels and provenance."""

    features: np.ndarray
    table: pd.DataFrame
    rows: np.ndarray  # usable rows (unreadable images excluded)
    tasks: List[TaskSpec]
    targets: Dict[str, np.ndarray]
    specs: List[str]
    provenance: Dict[str, Dict[str, object]]
    cache_attrs: Dict[str, object]
    hashes: List[str] = field(default_factory=list)  # content sha256 of each row's image
    heads: Dict[str, Any] = field(default_factory=dict)  # enabled head family -> what it read (HeadPlugin.load)


#: Working memory stage two needs beside the feature matrix (per-split targets and statistics, the stacked
#: heads and their Adam state, blocks of rows, bootstrap resamples), which tests/test_scale.py measures.
WORKING_BYTES = 1536 << 20
#: How the matrix may be held (the names are the config's choices for train.feature_dtype).
FEATURE_DTYPES = {name: np.dtype(name).type for name in CHOICES["train.feature_dtype"]}


def check_memory(n: int, d: int, dtype: str, where: str) -> None:
    """Stop before reading a feature matrix that, with stage two's working memory, does not fit in what this
    process may allocate (the cgroup's limit included): one line with the size and the settings that help."""
    from pipeline.runtime import available_memory

    matrix = n * d * np.dtype(FEATURE_DTYPES[dtype]).itemsize
    free = available_memory()
    if free is not None and matrix + WORKING_BYTES > free:
        gib = 1 << 30
        smaller = ("set train.feature_dtype=float16 (halves it), or " if dtype == "float32" else "")
        raise ConfigError(f"{where}: stage two needs about {(matrix + WORKING_BYTES) / gib:.1f} GiB ({n} x {d} "
                          f"features in {dtype}: {matrix / gib:.1f} GiB, and {WORKING_BYTES / gib:.1f} GiB of "
                          f"working memory) but this process may use {free / gib:.1f} GiB; {smaller}train on "
                          "fewer backbones or on a machine (or job allocation) with more memory")


def keep_views(table: pd.DataFrame, rows: np.ndarray, views: Sequence[str], where: str) -> np.ndarray:
    """The rows whose `view` label is one of `views` (data.views; case-insensitive, e.g. PA, AP); [] keeps all."""
    if not views:
        return rows
    if "view" not in table:
        raise ConfigError(f"data.views {list(views)}: {where} has no 'view' label column; drop data.views or add "
                          "the column (a manifest's own 'view' column, e.g. PA, AP, LL)")
    wanted = {str(v).upper() for v in views}
    keep = np.array([str(v).upper() in wanted for v in table["view"].to_numpy()[rows]], dtype=bool)
    logger.info("data.views %s: %d of %d images kept, %d of other views left out", sorted(wanted), int(keep.sum()),
                len(rows), int((~keep).sum()))
    if not keep.any():
        raise ConfigError(f"data.views {list(views)}: no image of {where} has one of these views")
    return rows[keep]


def finite_rows(features: np.ndarray, step: int = 4096) -> np.ndarray:
    """Whether each row is finite, in blocks (no full-size temporary)."""
    return np.concatenate([np.isfinite(features[i:i + step]).all(axis=1) for i in range(0, len(features), step)]
                          or [np.zeros(0, dtype=bool)])


def load_train_data(cache_path: Path, cfg: Config) -> TrainData:
    """Read features and labels from a cache; missing backbones or labels are one clear error each, and a
    matrix too large for this process's memory stops before it is read."""
    tcfg = cfg.train
    if not tcfg.features:
        raise ConfigError("train.features is empty; name the backbones whose features to use")
    with FeatureCache(cache_path) as cache:
        specs = [cache.resolve(name) for name in tcfg.features]
        check_memory(len(cache.ids), sum(cache.backbones[s].dim for s in specs), tcfg.feature_dtype,
                     f"cache {cache_path}")
        features = cache.features(specs, FEATURE_DTYPES[tcfg.feature_dtype])
        table = cache.labels()
        bad = cache.bad
        provenance = {s: cache.backbones[s].attrs for s in specs}
        attrs = dict(cache.attrs)
        hashes = [h.decode() if isinstance(h, bytes) else str(h) for h in cache.image_column("sha256")]
        heads = {plugin.name: plugin.load(cache, cfg, specs) for plugin, _ in enabled_heads(cfg)}
    groups = {**task_groups(str(attrs.get("data_layout", ""))), **tcfg.task_groups}
    tasks = resolve_tasks(tcfg.tasks, table, load_label_maps(cfg.data.labels), tcfg.non_nodule, tcfg.task_kinds,
                          where=f"cache {cache_path}", groups=groups, uncertain=cfg.data.uncertain)
    targets = encode_targets(table, tasks)
    rows = np.flatnonzero(~bad & finite_rows(features))
    if len(rows) < len(table):
        logger.warning("leaving out %d image(s) without features (unreadable when cached)", len(table) - len(rows))
    rows = keep_views(table, rows, cfg.data.views, f"cache {cache_path}")
    features = control_features(features, cfg.eval, cfg.train.seed)
    return TrainData(features, table, rows, tasks, targets, specs, provenance, attrs, hashes, heads)


# --------------------------------------------------------------------------------------------------
# cross-validation


@dataclass
class CVResult:
    splits: List[Split]
    names: List[SplitName]
    results: List[JobResult]
    oof: Dict[str, OutOfFold]  # model name -> out-of-fold predictions
    reports: Dict[str, Dict[str, object]] = field(default_factory=dict)
    heads: Dict[str, Any] = field(default_factory=dict)  # head family -> its out-of-fold outcome
    efficiency: Dict[str, object] = field(default_factory=dict)  # label efficiency: size -> its scores
    primary: Dict[str, object] = field(default_factory=dict)  # which head answers in predict (primary_answers)
    timings: Dict[str, float] = field(default_factory=dict)  # seconds per part, and the training's row-epochs

    def families(self) -> List[Tuple[Any, Any]]:
        """(head family, its out-of-fold outcome) of every family that cross-validated, in training order."""
        registry = head_families()
        return [(registry[name], outcome) for name, outcome in self.heads.items()]

    def loss_weights(self, tasks: Sequence[TaskSpec]) -> Dict[str, float]:
        """Each task's final loss weight, mean over the splits."""
        weights = np.mean([r.loss_weights for r in self.results], axis=0)
        return {t.name: float(w) for t, w in zip(tasks, weights)}

    def weights_at_bound(self, tasks: Sequence[TaskSpec]) -> List[str]:
        """Tasks whose loss weight sat at its weighting's bound in any split (it says less than it seems)."""
        return [t.name for k, t in enumerate(tasks)
                if any(k < len(r.weights_at_bound) and r.weights_at_bound[k] for r in self.results)]


def inner_val_fraction(cfg: Config) -> float:
    """The share of training rows held out for early stopping (none in-sample: every row trains)."""
    heads = [cfg.train] + [section for _, section in enabled_heads(cfg)]
    if cfg.eval.protocol == "insample" or not any(h.early_stopping for h in heads):
        return 0.0
    if not 0 < cfg.train.val_fraction < 1:
        raise ConfigError(f"train.val_fraction {cfg.train.val_fraction} must be in (0, 1) with early stopping")
    return cfg.train.val_fraction


def pooled_family(data: TrainData, splits: Sequence[Split]):
    """The Res-MTNet family on these splits (features standardised per split on its training rows)."""
    from pipeline.heads.model import PooledFamily, prepare

    return PooledFamily(prepare(data.features, data.targets, data.tasks, splits))


def run_jobs(family, jobs: Sequence[Job], splits: Sequence[Split], desc: str, progress: Progress = no_progress,
             keep_state: bool = False, device: str = "auto") -> List[JobResult]:
    """The stacked trainer on `jobs` (over `splits`) behind one progress bar of their epochs: every head family's
    training goes through here."""
    with progress(sum(j.cfg.epochs for j in jobs), desc, rows=_rows_per_epoch(splits)) as tick:
        return train_jobs(family, jobs, keep_state=keep_state, progress=tick, device=device)


def fit_pooled(data: TrainData, sections: Sequence, splits: Sequence[Split], desc: str,
               progress: Progress = no_progress, keep_state: bool = False, device: str = "auto"):
    """Every train section (one configuration's `train`) trained on every split as one stack: (the family, its
    results config-major: sections[c] on splits[s] at c * len(splits) + s). Cross-validation, label efficiency,
    the refit and sweeps all train the Res-MTNet head through here."""
    family = pooled_family(data, splits)
    for section in sections:
        family.check(section)
    jobs = [Job(section, s) for section in sections for s in range(len(splits))]
    return family, run_jobs(family, jobs, splits, desc, progress, keep_state, device)


def cross_validate(data: TrainData, cfg: Config, progress: Progress = no_progress) -> CVResult:
    """Train one configuration on every split; evaluate it and the baselines on the same splits."""
    splits, names = make_splits(data.table, data.rows, cfg.eval, inner_val_fraction(cfg))
    clock = time.perf_counter()
    family, results = fit_pooled(data, [cfg.train], splits, "train-heads", progress, device=cfg.train.device)
    timings = {"train": time.perf_counter() - clock,
               "train_row_epochs": float(sum(len(r.history["train_loss"]) * len(s.train)
                                             for r, s in zip(results, splits)))}
    clock = time.perf_counter()
    prep = family.prep
    per_split = [prep.decode(r.outputs, s) for s, r in enumerate(results)]
    oof = {MODEL_NAME: OutOfFold.collect(splits, per_split)}
    if cfg.eval.baselines:
        for which in ("linear", "majority"):
            oof[which] = OutOfFold.collect(splits, baseline_predictions(prep, splits, data.tasks, data.targets, which))
    timings["baselines"] = time.perf_counter() - clock
    cv = CVResult(splits, names, results, oof, timings=timings)
    bound = cv.weights_at_bound(data.tasks)
    if bound:
        logger.warning("%s weighting: the weight of %s sat at its bound in some split (a weight of at most "
                       "lambda * %.3g); lower train.uncertainty_min_log_var to let it rise further",
                       cfg.train.loss_weighting, ", ".join(bound), 0.5 * np.exp(-cfg.train.uncertainty_min_log_var))
    for plugin, _ in enabled_heads(cfg):
        cv.heads[plugin.name] = plugin.cross_validate(data, cfg, splits, names, oof[MODEL_NAME], progress)
    cv.primary = primary_answers(data, cfg, splits, per_split, cv.families())
    clock = time.perf_counter()
    norms = regression_norms(data.table, data.tasks, cfg.eval.size_norm)
    bins = size_bins(data.table["size_mm"].to_numpy(dtype=float), cfg.eval.size_bins) \
        if "size_mm" in data.table else {}
    for model, preds in oof.items():
        cv.reports[model] = {
            "overall": summarise(preds, data.tasks, data.targets, norms, names, cfg.eval.bootstrap, cfg.train.seed),
            "size_bins": {label: summarise(preds, data.tasks, data.targets, norms, names, cfg.eval.bootstrap,
                                           cfg.train.seed, subset=rows) for label, rows in bins.items()},
        }
    cv.timings["summaries"] = time.perf_counter() - clock
    if cfg.eval.train_sizes:
        cv.efficiency = label_efficiency(data, cfg, splits, names, norms, progress)
    return cv


def label_efficiency(data: TrainData, cfg: Config, splits: Sequence[Split], names: Sequence[SplitName],
                     norms: Dict[str, np.ndarray], progress: Progress = no_progress) -> Dict[str, object]:
    """eval.train_sizes: the head trained on nested subsets of each split's training patients (the same
    inner validation rows, the same test rows), scored as the full run is. Per size: the mean patients and
    images trained on, every metric (the first repeat's pooled estimate with its CI, summarise) and each
    repeat's pooled value."""
    from pipeline.config import train_size
    from pipeline.evaluation.evaluate import split_groups

    groups = split_groups(data.table, data.rows, cfg.eval)
    group_of = dict(zip(data.rows.tolist(), groups)) if groups is not None else {}
    jobs, where = [], []
    for s, split in enumerate(splits):
        g = np.array([group_of.get(r, r) for r in split.train.tolist()], dtype=object)
        patients = np.array(sorted(set(g.tolist()), key=str), dtype=object)
        for repeat in range(cfg.eval.train_size_repeats):
            order = np.random.default_rng([cfg.train.seed, s, repeat]).permutation(len(patients))
            for size in cfg.eval.train_sizes:  # nested: every size is a prefix of one order of the patients
                chosen = set(patients[order[:train_size(size, len(patients))]].tolist())
                rows = split.train[np.array([p in chosen for p in g.tolist()], dtype=bool)]
                jobs.append(Split(train=rows, test=split.test, val=split.val, key=split.key))
                where.append((str(size), repeat, s, len(chosen)))
    family, results = fit_pooled(data, [cfg.train], jobs, "label efficiency", progress, device=cfg.train.device)
    out: Dict[str, object] = {}
    for size in dict.fromkeys(str(x) for x in cfg.eval.train_sizes):
        entry: Dict[str, object] = {"repeats": {}}
        for repeat in range(cfg.eval.train_size_repeats):
            idx = [i for i, w in enumerate(where) if w[0] == size and w[1] == repeat]
            oof = OutOfFold.collect([jobs[i] for i in idx], [family.prep.decode(results[i].outputs, i) for i in idx])
            split_names = [names[where[i][2]] for i in idx]
            report = summarise(oof, data.tasks, data.targets, norms, split_names,
                               cfg.eval.bootstrap if repeat == 0 else 0, cfg.train.seed)
            if repeat == 0:
                entry.update(patients=float(np.mean([where[i][3] for i in idx])),
                             images=float(np.mean([len(jobs[i].train) for i in idx])), metrics=report)
            for task, metrics in report.items():
                for metric, value in metrics.items():
                    entry["repeats"].setdefault(f"{task}.{metric}", []).append(value["pooled"])
        out[size] = entry
    return out


# --------------------------------------------------------------------------------------------------
# the final head


@dataclass
class Refit:
    """Heads trained on every usable row (what predict uses): the artefact's tensors and its whole description
    (pipeline.heads.artefact writes both)."""

    tensors: Dict[str, object]
    spec: Dict[str, object]


def refit(data: TrainData, cfg: Config, cv: CVResult, progress: Progress = no_progress) -> Refit:
    """Train the final heads on every usable row for the epoch count validated in the cross-validation
    (median best epoch of its splits; the configured count without early stopping)."""
    split = Split(train=data.rows, test=np.zeros(0, dtype=np.int64), key=cfg.train.seed * 1000 + 999)
    tcfg = fixed_epochs(cfg.train, validated_epochs(cv.results, cfg.train))
    family, (result,) = fit_pooled(data, [tcfg], [split], "refit", progress, keep_state=True,
                                   device=cfg.train.device)
    from pipeline.heads.model import export_head as export_pooled

    tensors, pooled_spec = export_pooled(result.state, family.prep, data.rows, tcfg.hidden, tcfg.blocks,
                                         cfg.train.seed)
    spec: Dict[str, object] = {
        "tool_version": __version__, **pooled_spec,
        # the pooled head's own settings: the head families' sections (train.loc, train.heads) are in their parts
        "train": {k: v for k, v in asdict(tcfg).items() if k != "heads" and not is_dataclass(getattr(tcfg, k))},
        "loss_weights": result.loss_weights,
        "features": data.specs, "trained_rows": int(len(data.rows)),
        "trained_sha256": [data.hashes[r] for r in data.rows] if data.hashes else [],
        "primary": cv.primary,
        # the coordinate grid x and y were learnt in (JSRT: 2048), to express predictions in any image's pixels
        "grid": [float(np.nanmedian(data.table["grid_w"])), float(np.nanmedian(data.table["grid_h"]))],
    }
    for plugin, outcome in cv.families():
        part_tensors, spec[plugin.artefact] = plugin.refit(data, cfg, outcome, split, progress)
        tensors.update(part_tensors)
    spec.update(backbones=dict(data.provenance), cache_image_set_sha256=data.cache_attrs.get("image_set_sha256"))
    return Refit(tensors, spec)


def primary_answers(data: TrainData, cfg: Config, splits: Sequence[Split], pooled: Sequence[Dict[str, np.ndarray]],
                    outcomes: Sequence[Tuple[Any, Any]]) -> Dict[str, object]:
    """Which head answers "is there a nodule" (presence) and "where" (position) in predict: the pooled Res-MTNet
    head, unless a head family (HeadPlugin.choose, given its out-of-fold outcome) does better on the inner
    validation rows of every split (never on test folds); the pooled head without inner validation rows."""
    out: Dict[str, object] = {"position": "pooled", "presence": "pooled"}
    n_val = sum(len(s.val) for s in splits)
    if not outcomes or not n_val:
        out["chosen_on"] = "default (no other head)" if not outcomes else "default (no inner validation rows)"
        return out
    validation: Dict[str, object] = {}
    for plugin, outcome in outcomes:
        choice = dict(plugin.choose(data, cfg, splits, pooled, outcome))
        validation.update(choice.pop("validation", {}))
        for role, head in choice.items():  # the first family that beats the pooled head takes the role
            if out.get(role) == "pooled":
                out[role] = head
    out["chosen_on"] = f"inner validation rows ({n_val} images over {len(splits)} splits)"
    out["validation"] = validation
    return out
