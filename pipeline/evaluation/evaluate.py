"""The evaluation protocol: splits that never leak, decoding of head outputs, metrics per task and per
nodule-size bin (the pooled out-of-fold estimate with its bootstrap CI, and mean +- std over folds), and
baselines."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pipeline.config import CHOICES, EvalConfig
from pipeline.errors import ConfigError
from pipeline.evaluation.combine import DATASET_COLUMN, PATIENT_COLUMN
from pipeline.evaluation.metrics import block_bootstrap, bootstrap_counts
from pipeline.heads.tasks import TaskSpec, labelled
from pipeline.heads.train import Split

CONTROLS = CHOICES["eval.control"]
#: The first line of every output of a run scored on rows it was trained on.
INSAMPLE_WARNING = ("WARNING: training-set scores (eval.protocol {protocol}): the head was scored on rows it was "
                    "trained on; these numbers are not an estimate of performance on new images.")

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# splits


@dataclass(frozen=True)
class SplitName:
    seed: int
    fold: int


def stratify_labels(table: pd.DataFrame, column: str, rows: np.ndarray) -> np.ndarray:
    """The class of each row that folds are stratified on (eval.stratify; 'auto': the data set's own column,
    pipeline.data.table.stratify_column, or none where the table lacks it; with several data sets, the data set)."""
    if column == "auto":
        from pipeline.data.table import stratify_column

        # several data sets (pipeline.evaluation.combine): each is a stratum
        column = DATASET_COLUMN if DATASET_COLUMN in table else stratify_column(str(table.attrs.get("layout", "")))
        if column not in table:
            return np.full(len(rows), "missing")
    if column not in table:
        raise ConfigError(f"eval.stratify: no column '{column}' in the labels")
    return np.array(["missing" if v is None or v != v else str(v) for v in table[column].to_numpy()[rows]])


def patient_groups(table: pd.DataFrame, ecfg: EvalConfig) -> Optional[np.ndarray]:
    """The patient of every table row where splits keep patients together (split_groups over all rows), else
    None: what the bootstrap resamples, so that its intervals respect the same dependence the splits do."""
    return split_groups(table, np.arange(len(table)), ecfg)


def split_groups(table: pd.DataFrame, rows: np.ndarray, ecfg: EvalConfig) -> Optional[np.ndarray]:
    """The patient of each row when splits must keep a patient's images together (eval.group: 'auto' uses the
    `patient_id` column when there is one, 'none' never groups, any other value names the column); None where
    no patient has two images (JSRT), so those data sets keep their plain stratified folds."""
    column = PATIENT_COLUMN if ecfg.group == "auto" else ecfg.group
    if ecfg.group == "none" or (ecfg.group == "auto" and column not in table):
        return None
    if column not in table:
        raise ConfigError(f"eval.group: no column '{column}' in the labels; use 'auto', 'none' or one of "
                          f"{', '.join(c for c in table.columns if c not in ('id', 'relpath'))}")
    values = table[column].to_numpy()[rows]
    missing = np.array([v is None or v != v or v == "" for v in values])
    # an image without a patient id is its own patient
    groups = np.where(missing, np.array([f"__row{r}" for r in rows], dtype=object), values.astype(str))
    return groups if len(np.unique(groups)) < len(groups) else None


def patient_summary(table: pd.DataFrame, rows: np.ndarray, splits: Sequence["Split"], ecfg: EvalConfig
                    ) -> Optional[str]:
    """One line for the report where splits keep patients together: patients and images, per test fold."""
    groups = split_groups(table, rows, ecfg)
    if groups is None:
        return None
    of = dict(zip(rows.tolist(), groups))
    folds = ", ".join(f"{len({of[r] for r in s.test.tolist()})}/{len(s.test)}" for s in splits)
    column = PATIENT_COLUMN if ecfg.group == "auto" else ecfg.group
    return (f"Patients: no patient's images are in two of training, inner validation and test of a split "
            f"(column {column}): {len(np.unique(groups))} patients, {len(rows)} images; test patients/images per "
            f"split: {folds}.")


def stratified_subset(rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int,
                      groups: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Split `rows` into (rest, part) with `part` about `fraction` of them, stratified when possible; with
    `groups` (aligned with rows), no group is in both parts."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

    n_part = max(1, int(round(fraction * len(rows))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if groups is not None:
            k = max(2, int(round(1 / max(fraction, 1e-9))))
            try:
                rest, part = next(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(rows, labels, groups))
            except ValueError:  # fewer patients than parts: one patient's images are the part
                first = np.unique(groups)[np.random.default_rng(seed).integers(len(np.unique(groups)))]
                part, rest = np.flatnonzero(groups == first), np.flatnonzero(groups != first)
            return np.sort(rows[rest]), np.sort(rows[part])
        try:
            splitter = StratifiedShuffleSplit(1, test_size=n_part, random_state=seed)
            rest, part = next(splitter.split(rows, labels))
        except ValueError:  # a class too small to stratify: plain shuffle
            order = np.random.default_rng(seed).permutation(len(rows))
            rest, part = order[n_part:], order[:n_part]
    return np.sort(rows[rest]), np.sort(rows[part])


#: The label column of a data set's own split (train / validate / test), and the values it scores.
SPLIT_COLUMN = "split"


def official_split(table: pd.DataFrame, rows: np.ndarray, groups: Optional[np.ndarray]
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) positions in `rows` of the data set's own split: its test list is scored (CheXpert, which
    publishes no test labels: its validation list), every other listed row trains (inner validation is drawn
    from them); rows in no list are left out."""
    from pipeline.data.table import LAYOUTS, official_source

    layout = str(table.attrs.get("layout", ""))
    source = official_source(layout)
    if SPLIT_COLUMN not in table or (layout in LAYOUTS and layout != "manifest" and not source):
        having = ", ".join(name for name, entry in LAYOUTS.items() if entry.official)
        raise ConfigError(f"eval.protocol official needs the data set's own split, which the {layout or 'cached'} "
                          f"layout does not publish ({having} do; a manifest a 'split' column of train / validate / "
                          "test); use eval.protocol: kfold")
    split = np.array([str(v).strip().lower() if isinstance(v, str) else ""
                      for v in table[SPLIT_COLUMN].to_numpy()[rows]])
    scored = "test" if (split == "test").any() else "validate"
    test = np.flatnonzero(split == scored)
    train = np.flatnonzero((split != scored) & (split != ""))
    if not len(test) or not len(train):
        where = (f"{layout}'s official split comes from {source}: is it there?" if source else
                 f"the '{SPLIT_COLUMN}' column needs both")
        raise ConfigError(f"eval.protocol official: {len(train)} training and {len(test)} {scored} images here; "
                          f"{where} Or use eval.protocol: kfold")
    if scored != "test":
        logger.warning("eval.protocol official: no test list in this data set; scoring its %s list (%d images)",
                       scored, len(test))
    left = len(rows) - len(test) - len(train)
    if left:
        logger.warning("eval.protocol official: %d image(s) are in no list of the data set's split; left out", left)
    if groups is not None:
        both = np.intersect1d(groups[train], groups[test])
        if len(both):
            logger.warning("eval.protocol official: %d patient(s) have images in both the official training and "
                           "test lists (first: %s)", len(both), both[0])
    return train, test


@dataclass
class SplitContext:
    """What a protocol splits: the usable rows, their stratification labels and patient groups (None: one image
    per patient), the table and the eval section."""

    table: pd.DataFrame
    rows: np.ndarray
    labels: np.ndarray
    groups: Optional[np.ndarray]
    ecfg: EvalConfig

    def groups_of(self, subset: np.ndarray) -> Optional[np.ndarray]:
        if self.groups is None:
            return None
        position = {int(r): i for i, r in enumerate(self.rows)}
        return self.groups[[position[int(r)] for r in subset]]


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol (eval.protocol): its folds of one seed as (train, test) positions into ctx.rows;
    whether inner validation rows are drawn from the training rows; the training rows a fold also scores (none for
    an honest protocol) and whether a config scores training rows at all (its outputs then carry
    INSAMPLE_WARNING)."""

    name: str
    folds: Callable[[SplitContext, int], List[Tuple[np.ndarray, np.ndarray]]]
    inner_validation: bool = True
    also_scored: Callable[[SplitContext, int, int, np.ndarray], np.ndarray] = \
        lambda ctx, seed, fold, train: np.zeros(0, dtype=np.int64)
    scores_training_rows: Callable[[EvalConfig], bool] = lambda ecfg: False


#: The protocols by name (config.CHOICES['eval.protocol'] lists the built-ins, so validating them imports nothing;
#: config.REGISTRIES makes every registered name valid).
PROTOCOLS: Dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    PROTOCOLS[protocol.name] = protocol
    return protocol


def _kfold(ctx: SplitContext, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds (eval.folds); a patient's images never in two folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    k, rows = ctx.ecfg.folds, ctx.rows
    if not 2 <= k <= len(rows):
        raise ConfigError(f"eval.folds {k} must be between 2 and the number of images {len(rows)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small classes: sklearn warns, the folds are still valid
        if ctx.groups is None:
            return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(rows, ctx.labels))
        if k > len(np.unique(ctx.groups)):
            raise ConfigError(f"eval.folds {k} is more than the {len(np.unique(ctx.groups))} patients")
        return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(rows, ctx.labels, ctx.groups))


def _holdout(ctx: SplitContext, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    if not 0 < ctx.ecfg.holdout_fraction < 1:
        raise ConfigError(f"eval.holdout_fraction {ctx.ecfg.holdout_fraction} must be in (0, 1)")
    return [stratified_subset(np.arange(len(ctx.rows)), ctx.labels, ctx.ecfg.holdout_fraction, seed, ctx.groups)]


def _seen_rows(ctx: SplitContext, seed: int, fold: int, train: np.ndarray) -> np.ndarray:
    """contaminated: the share eval.seen_fraction of a fold's training rows that it scores as well."""
    share = ctx.ecfg.seen_fraction
    if share <= 0:
        return np.zeros(0, dtype=np.int64)
    if share >= 1:
        return train
    return stratified_subset(train, stratify_labels(ctx.table, ctx.ecfg.stratify, train), share,
                             seed * 104729 + fold, ctx.groups_of(train))[1]


def _datasets_of(ctx: SplitContext) -> np.ndarray:
    if DATASET_COLUMN not in ctx.table:
        raise ConfigError(f"eval.protocol {ctx.ecfg.protocol} scores data sets a model never trained on: give "
                          "several caches, one per data set (train-heads --cache nih.h5 --cache chexpert.h5)")
    return ctx.table[DATASET_COLUMN].to_numpy()[ctx.rows].astype(str)


def _external(ctx: SplitContext, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """external: train (inner validation included) on every data set but eval.test_on, score that one once."""
    names = _datasets_of(ctx)
    if ctx.ecfg.test_on not in set(names):
        raise ConfigError(f"eval.test_on '{ctx.ecfg.test_on}' must name one of the data sets: "
                          f"{', '.join(dict.fromkeys(names))} (each cache's file stem)")
    return [(np.flatnonzero(names != ctx.ecfg.test_on), np.flatnonzero(names == ctx.ecfg.test_on))]


def _leave_one_dataset_out(ctx: SplitContext, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """leave-one-dataset-out: one split per data set, in the caches' order, scored on it after training on the
    others."""
    names = _datasets_of(ctx)
    if len(set(names)) < 2:
        raise ConfigError("eval.protocol leave-one-dataset-out needs at least two data sets (caches)")
    return [(np.flatnonzero(names != d), np.flatnonzero(names == d)) for d in dict.fromkeys(names)]


register_protocol(Protocol("kfold", _kfold))
register_protocol(Protocol("holdout", _holdout))
register_protocol(Protocol("official", lambda ctx, seed: [official_split(ctx.table, ctx.rows, ctx.groups)]))
register_protocol(Protocol("insample", lambda ctx, seed: [(np.arange(len(ctx.rows)), np.arange(len(ctx.rows)))],
                           inner_validation=False, scores_training_rows=lambda ecfg: True))
register_protocol(Protocol("contaminated", _kfold, also_scored=_seen_rows,
                           scores_training_rows=lambda ecfg: ecfg.seen_fraction > 0))
register_protocol(Protocol("external", _external))
register_protocol(Protocol("leave-one-dataset-out", _leave_one_dataset_out))


def make_splits(table: pd.DataFrame, rows: np.ndarray, ecfg: EvalConfig, val_fraction: float = 0.0
                ) -> Tuple[List[Split], List[SplitName]]:
    """The splits of `rows` that eval.protocol names (PROTOCOLS), repeated over eval.seeds; optional inner
    validation drawn from each fold's training rows (patients kept together).

    kfold (stratified) and holdout: test rows never enter training or the inner validation. official: the
    data set's own test list, scored once per seed (official_split). insample: one
    split per seed trained and scored on every row (no inner validation). contaminated: the k folds, each
    scoring its test rows plus a share (eval.seen_fraction) of its training rows. Each split's
    standardisation uses its training rows alone (model.prepare).
    """
    if ecfg.protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol '{ecfg.protocol}' must be one of {', '.join(PROTOCOLS)}")
    if not 0 <= ecfg.seen_fraction <= 1:
        raise ConfigError(f"eval.seen_fraction {ecfg.seen_fraction} must be in [0, 1]")
    protocol = PROTOCOLS[ecfg.protocol]
    labels = stratify_labels(table, ecfg.stratify, rows)
    if (labels == "missing").all() and len(labels) and ecfg.stratify != "auto":
        logger.warning("eval.stratify: column '%s' has no labels here; the splits are not stratified",
                       ecfg.stratify)
    ctx = SplitContext(table, rows, labels, split_groups(table, rows, ecfg), ecfg)
    splits, names = [], []
    for seed in ecfg.seeds:
        for fold, (train, test) in enumerate(protocol.folds(ctx, seed)):
            train_rows, test_rows = np.sort(rows[train]), np.sort(rows[test])
            val_rows = np.zeros(0, dtype=np.int64)
            if val_fraction > 0 and protocol.inner_validation:
                inner_labels = stratify_labels(table, ecfg.stratify, train_rows)
                train_rows, val_rows = stratified_subset(train_rows, inner_labels, val_fraction, seed * 7919 + fold,
                                                         ctx.groups_of(train_rows))
            seen = protocol.also_scored(ctx, seed, fold, train_rows)
            if len(seen):
                test_rows = np.sort(np.concatenate([test_rows, seen]))
            splits.append(Split(train=train_rows, test=test_rows, val=val_rows, key=seed * 1000 + fold))
            names.append(SplitName(seed, fold))
    return splits, names


def scores_training_rows(ecfg: EvalConfig) -> bool:
    """Whether a protocol scores rows the head was trained on (its outputs then carry INSAMPLE_WARNING)."""
    return PROTOCOLS[ecfg.protocol].scores_training_rows(ecfg)


def seen_share(splits: Sequence[Split]) -> float:
    """The share of scored rows that their split trained on (inner validation rows are not trained on), over
    every split: 0 for honest protocols; contaminated with 5 folds and early stopping: 167 of 217 (77%)."""
    scored = sum(len(s.test) for s in splits)
    seen = sum(len(np.intersect1d(s.test, s.train)) for s in splits)
    return seen / scored if scored else 0.0


def control_features(features: np.ndarray, ecfg: EvalConfig, seed: int) -> np.ndarray:
    """eval.control: 'noise' replaces the features by seeded Gaussian noise of the same shape (labels and
    unreadable rows stay as they are): a row of "no information" for any table."""
    if ecfg.control not in CONTROLS:
        raise ConfigError(f"eval.control '{ecfg.control}' must be one of {', '.join(CONTROLS)}")
    if ecfg.control == "none":
        return features
    noise = np.random.default_rng(seed + 7777).standard_normal(features.shape, dtype=np.float32)
    return np.where(np.isfinite(features), noise, features)


# --------------------------------------------------------------------------------------------------
# metrics


def task_metrics(task: TaskSpec, y: np.ndarray, pred: np.ndarray, norm: Optional[np.ndarray] = None,
                 weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Metrics of one task on labelled rows only (weights (n,) or (R, n) for bootstrap resamples)."""
    mask = labelled(task, y)
    if not mask.any():
        return {}
    return task.impl.evaluate(task, y[mask], pred[mask], None if norm is None else norm[mask],
                              None if weights is None else weights[..., mask])


def regression_norms(table: pd.DataFrame, tasks: Sequence[TaskSpec], size_norm: str) -> Dict[str, np.ndarray]:
    """Per row, what each regression error is divided by for the normalised columns (mse_norm, mae_norm), as
    the task's `norm` says: 'grid', its coordinate grid (the paper's x / 2048); 'size', the paper's size, by
    eval.size_norm: 'grid' divides mm by the grid too, which is what reproduces the paper's own figures (its
    size MAE 1.40 mm is its table's 0.00085 ~ 1.74 / 2048), 'range' by the data's size range; 'range' (any other
    regression, e.g. age): the range of the task's labels in the data set.
    """
    if size_norm not in ("grid", "range"):
        raise ConfigError(f"eval.size_norm '{size_norm}' must be grid or range")
    norms = {}
    for t in tasks:
        if not t.impl.measures:
            continue
        how = size_norm if t.norm == "size" else t.norm
        if how == "grid":
            norms[t.name] = table[t.grid_column or "grid_w"].to_numpy(dtype=float)
        else:
            values = table[t.column].to_numpy(dtype=float)
            span = np.nanmax(values) - np.nanmin(values) if np.isfinite(values).any() else 1.0
            norms[t.name] = np.full(len(table), span if span > 0 else 1.0)
    return norms


@dataclass
class OutOfFold:
    """Out-of-fold predictions of one model: one entry per (split, test row)."""

    rows: np.ndarray
    split: np.ndarray  # index into the splits
    preds: Dict[str, np.ndarray]

    @classmethod
    def collect(cls, splits: Sequence[Split], per_split: Sequence[Dict[str, np.ndarray]]) -> "OutOfFold":
        """per_split[s][task]: predictions for every row; keep each split's test rows."""
        return cls.of_test_rows(splits, [{t: v[s.test] for t, v in p.items()} for s, p in zip(splits, per_split)])

    @classmethod
    def of_test_rows(cls, splits: Sequence[Split], per_split: Sequence[Dict[str, np.ndarray]]) -> "OutOfFold":
        """per_split[s][task]: predictions for split s's test rows, in their order."""
        rows = np.concatenate([s.test for s in splits])
        split = np.concatenate([np.full(len(s.test), i) for i, s in enumerate(splits)])
        tasks = per_split[0].keys()
        return cls(rows, split, {t: np.concatenate([p[t] for p in per_split]) for t in tasks})


def summarise_metrics(metrics_of: Callable[[np.ndarray, Optional[np.ndarray]], Dict[str, np.ndarray]],
                      split: np.ndarray, n_splits: int, pooled: np.ndarray, bootstrap: int, seed: int,
                      count: Callable[[np.ndarray, str], int], groups: Optional[np.ndarray] = None,
                      exact_rows: int = EvalConfig.bootstrap_exact_rows) -> Dict[str, Dict[str, object]]:
    """metric -> {pooled, ci95, n, folds, fold_mean, fold_std}: the headline is the value on the `pooled` entries
    (the first seed's out-of-fold predictions) with its percentile bootstrap CI; the per-split values and
    their mean ± std describe the spread over splits (they are not the estimate the CI belongs to).

    metrics_of(selection, weights) scores the selected entries (weights (R, n_selected) for resamples);
    count(selection, metric) is the number of entries the metric is computed on; `groups` (one per entry: the
    patient, as split_groups gives it) makes the bootstrap resample patients, not images. Up to `exact_rows`
    pooled entries the resamples are of entries (or patients); above, of blocks of them (metrics.block_bootstrap:
    the cost no longer grows as resamples x rows). Every model and head uses this one.
    """
    per_split = [metrics_of(split == s, None) for s in range(n_splits)]
    whole = metrics_of(pooled, None)
    boot: Dict[str, np.ndarray] = {}
    if bootstrap and pooled.any():
        n = int(pooled.sum())
        codes = None if groups is None else pd.factorize(np.asarray(groups)[pooled])[0]
        resamples = (bootstrap_counts(n, bootstrap, seed, groups=codes) if n <= exact_rows else
                     block_bootstrap(np.arange(n) if codes is None else codes, bootstrap, seed))
        blocks = [metrics_of(pooled, counts) for counts in resamples]
        boot = {k: np.concatenate([np.atleast_1d(b[k]) for b in blocks]) for k in blocks[0]}
    out: Dict[str, Dict[str, object]] = {}
    for name, value in whole.items():
        fold_values = np.array([float(m.get(name, np.nan)) for m in per_split], dtype=float)
        finite = fold_values[np.isfinite(fold_values)]
        entry: Dict[str, object] = {
            "pooled": float(value), "n": count(pooled, name), "folds": fold_values.tolist(),
            "fold_mean": float(finite.mean()) if len(finite) else float("nan"),
            "fold_std": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
        }
        if name in boot:
            dist = np.asarray(boot[name], dtype=float)
            dist = dist[np.isfinite(dist)]
            if len(dist):
                entry["ci95"] = [float(np.percentile(dist, 2.5)), float(np.percentile(dist, 97.5))]
        out[name] = entry
    return out


def first_seed_mask(split: np.ndarray, names: Sequence[SplitName]) -> np.ndarray:
    first = names[0].seed if names else 0
    return (np.array([n.seed for n in names]) == first)[split] if len(split) else np.zeros(0, dtype=bool)


def summarise(oof: OutOfFold, tasks: Sequence[TaskSpec], targets: Dict[str, np.ndarray],
              norms: Dict[str, np.ndarray], names: Sequence[SplitName], bootstrap: int, seed: int,
              subset: Optional[np.ndarray] = None, groups: Optional[np.ndarray] = None,
              exact_rows: int = EvalConfig.bootstrap_exact_rows) -> Dict[str, Dict[str, Dict[str, object]]]:
    """task -> metric -> entry (summarise_metrics) of one model's out-of-fold predictions; `subset` keeps
    only some rows (a size bin); `groups` (one per table row, patient_groups) resamples patients."""
    keep = np.ones(len(oof.rows), dtype=bool) if subset is None else np.isin(oof.rows, subset)
    out: Dict[str, Dict[str, Dict[str, object]]] = {}
    for task in tasks:
        y_all, p_all = targets[task.name][oof.rows], oof.preds[task.name]
        norm = norms.get(task.name)
        norm_all = None if norm is None else norm[oof.rows]

        metrics = summarise_metrics(
            lambda sel, w, task=task, y_all=y_all, p_all=p_all, norm_all=norm_all:
                task_metrics(task, y_all[sel & keep], p_all[sel & keep],
                             None if norm_all is None else norm_all[sel & keep], w),
            oof.split, len(names), first_seed_mask(oof.split, names) & keep, bootstrap, seed,
            lambda sel, metric, task=task, y_all=y_all: int(
                task.impl.metric_rows(task, y_all[sel]).get(metric, labelled(task, y_all[sel])).sum()),
            None if groups is None else groups[oof.rows], exact_rows)
        if metrics:
            out[task.name] = metrics
    return out


def size_bin_labels(edges: Sequence[float]) -> List[str]:
    edges = list(edges)
    return ([f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])] + [f">={edges[-1]:g}"]
            if edges else ["all"])


def size_bins(sizes: np.ndarray, edges: Sequence[float]) -> Dict[str, np.ndarray]:
    """Rows of nodules per size bin (<10, 10-20, 20-30, >=30 mm by default); rows without a size are in none."""
    labels = size_bin_labels(edges)
    index = np.digitize(sizes, edges)
    return {lab: np.flatnonzero((index == i) & np.isfinite(sizes)) for i, lab in enumerate(labels)}


# --------------------------------------------------------------------------------------------------
# baselines


def baseline_predictions(prep, splits: Sequence[Split], tasks: Sequence[TaskSpec], targets: Dict[str, np.ndarray],
                         which: str, c: float = 1.0, alpha: float = 1.0, budget: int = 0, seed: int = 0,
                         tick: Callable[[int], None] = lambda n: None) -> List[Dict[str, np.ndarray]]:
    """Per split, predictions for its test rows: 'majority' (class prior / mean) or 'linear' (logistic / ridge on
    the split's standardised features: pipeline.evaluation.linear), fitted on the split's training rows (inner
    validation rows included); with a `budget` (eval.baseline_rows), the linear fit on a seeded subsample of
    that many of them, so that its cost stops growing with the data. `prep`: the pooled head's model.Prepared
    (features held once, per-split statistics); `tick(1)` after each split (progress)."""
    from pipeline.evaluation.linear import linear_fit

    results = []
    for s, split in enumerate(splits):
        fit = np.concatenate([split.train, split.val])
        if which == "linear" and 0 < budget < len(fit):
            fit = np.sort(np.random.default_rng([seed, s]).choice(fit, budget, replace=False))
        linear = linear_fit(prep, s, fit, split.test) if which == "linear" else None
        n = len(split.test)
        preds: Dict[str, np.ndarray] = {}
        for task in tasks:
            y = targets[task.name][fit]
            m = labelled(task, y)
            preds[task.name] = task.impl.baseline(which, y[m], linear, m, n, task, c, alpha)
        results.append(preds)
        tick(1)
    return results
