"""Evaluation protocols and their splits, which never leak: folds by patient, stratified, the data sets' own
splits, external validation; the controls (eval.control) that replace the features by noise."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pipeline.config import CHOICES, EvalConfig
from pipeline.errors import ConfigError
from pipeline.plugins import LAYOUTS, PROTOCOLS
from pipeline.data.combine import DATASET_COLUMN, PATIENT_COLUMN
from pipeline.core.train import Split

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


def seed_fold_columns(names: Sequence[SplitName], split: np.ndarray) -> Dict[str, np.ndarray]:
    """The `seed` and `fold` columns of entries by their split index (predictions.csv, candidates.csv)."""
    return {"seed": np.array([n.seed for n in names])[split], "fold": np.array([n.fold for n in names])[split]}


def stratify_labels(table: pd.DataFrame, column: str, rows: np.ndarray) -> np.ndarray:
    """The class of each row that folds are stratified on (eval.stratify; 'auto': the data set's own column,
    pipeline.data.table.stratify_column, or none where the table lacks it; with several data sets, the data set)."""
    if column == "auto":
        from pipeline.data.table import stratify_column

        # several data sets (pipeline.data.combine): each is a stratum
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
    from pipeline.data.table import official_source

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


def register_protocol(protocol: Protocol) -> Protocol:
    """Register a protocol under its name (pipeline.plugins.PROTOCOLS)."""
    return PROTOCOLS.register(protocol.name, protocol)


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
    if not 0 <= ecfg.seen_fraction <= 1:
        raise ConfigError(f"eval.seen_fraction {ecfg.seen_fraction} must be in [0, 1]")
    protocol = PROTOCOLS.find(ecfg.protocol, "eval.protocol")
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
