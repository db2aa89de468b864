"""Stage two's engine: cached features and labels in, cross-validated heads and a refit head out.

`load_train_data` reads what a config asks for from a cache (features, declared tasks, and what each enabled
head family needs); `cross_validate` makes the protocol's splits and has every enabled head family
(pipeline.heads.plugin: the reference, Res-MTNet, first) cross-validate on them, then chooses which head answers
in predict; `refit` has each train its final head on all rows and assembles the artefact's description.
train-heads, sweeps and the paper's tables all run through here; `run_jobs` is every family's way to the one
stacked trainer (pipeline.core.train).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from cache import FeatureCache
from pipeline import __version__
from pipeline.config import CHOICES, Config
from pipeline.core.splits import SplitName, control_features, make_splits
from pipeline.core.summary import OutOfFold
from pipeline.core.tasks import TaskSpec, encode_targets, resolve_tasks
from pipeline.core.train import Progress, Split, no_progress
from pipeline.data.labels import load_label_maps
from pipeline.data.table import blank_meaning, task_groups
from pipeline.errors import ConfigError
from pipeline.heads.artefact import HeadManifest, RunFacts
from pipeline.heads.plugin import TaskPredictions, enabled_heads, head_families
from pipeline.runtime import release_freed_memory

logger = logging.getLogger(__name__)


#: No per-row hashes (a cache written before pixel hashes).
NO_HASHES = np.zeros(0, dtype="S64")


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
    # hex sha256 per row as S64 bytes, not str objects (at 1M rows 64 MiB each, not 121 MiB)
    hashes: np.ndarray = field(default_factory=lambda: NO_HASHES)  # content sha256 of each row's image
    heads: Dict[str, Any] = field(default_factory=dict)  # enabled head family -> what it read (HeadPlugin.load)
    pixel_hashes: np.ndarray = field(default_factory=lambda: NO_HASHES)  # decoded-image hashes (none: an older cache)
    # standardisation statistics of row sets of this matrix already computed (model.prepare: rows_key -> mean, std):
    # the refit's, made in the cross-validation's pass over the matrix, cost no second pass
    statistics: Dict[str, Any] = field(default_factory=dict)


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


@dataclass
class _Part:
    """One cache's contribution before tasks are resolved."""

    features: np.ndarray
    table: pd.DataFrame
    groups: Dict[str, List[str]]
    bad: np.ndarray
    specs: List[str]
    provenance: Dict[str, Dict[str, object]]
    attrs: Dict[str, object]
    hashes: np.ndarray
    pixel_hashes: np.ndarray
    heads: Dict[str, Any]


def _read(cache_path: Path, cfg: Config, progress: Progress, into: Optional[np.ndarray] = None) -> _Part:
    """One cache's part; `into`: the rows of a larger matrix its features are read into (several caches)."""
    tcfg = cfg.train
    with FeatureCache(cache_path) as cache:
        specs = [cache.resolve(name) for name in tcfg.features]
        if into is None:
            check_memory(len(cache.ids), sum(cache.backbones[s].dim for s in specs), tcfg.feature_dtype,
                         f"cache {cache_path}")
        with progress(len(cache.ids) * len(specs), "reading features", unit="row") as tick:
            features = cache.features(specs, FEATURE_DTYPES[tcfg.feature_dtype], progress=tick, out=into)
        table = cache.labels()
        table.attrs["layout"] = str(cache.attrs.get("data_layout", ""))  # eval.stratify auto, eval.protocol official
        pixels = cache.pixel_hashes
        part = _Part(features, table, {}, cache.bad, specs, {s: cache.backbones[s].attrs for s in specs},
                     dict(cache.attrs),
                     cache.image_column("sha256").astype("S64"), NO_HASHES if pixels is None else pixels,
                     {plugin.name: plugin.load(cache, cfg, specs) for plugin, _ in enabled_heads(cfg)})
    part.groups = {**task_groups(table.attrs["layout"]), **tcfg.task_groups}
    if cfg.data.harmonise:
        from pipeline.data.findings import harmonise_findings

        part.table, part.groups, _ = harmonise_findings(part.table, part.groups)
    return part


def _other_features(path: Path, first: Path, detail: str) -> ConfigError:
    return ConfigError(f"cache {path} holds other features than {first} ({detail}): several caches train together "
                       "only on the same backbones with the same weights; extract them with the same --backbone and "
                       "weights")


def _read_several(paths: Sequence[Path], cfg: Config, progress: Progress) -> Tuple[_Part, str]:
    """Several caches as one (pipeline.data.combine): the same feature sets, made the same way, read into
    the rows of one matrix (memory: the matrix once, checked as a whole before reading) and stacked; (the
    combined part, the blank policy its tables now follow)."""
    from pipeline.data import combine

    names = combine.dataset_names([Path(p).stem for p in paths])
    sizes = []
    for path in paths:
        with FeatureCache(path) as cache:
            sizes.append((len(cache.ids), sum(cache.backbones[cache.resolve(n)].dim for n in cfg.train.features)))
    for path, (_, dim) in zip(paths[1:], sizes[1:]):
        if dim != sizes[0][1]:
            raise _other_features(path, paths[0], f"{dim} values against {sizes[0][1]}")
    total = sum(n for n, _ in sizes)
    check_memory(total, sizes[0][1], cfg.train.feature_dtype, f"caches {', '.join(map(str, paths))}")
    features = np.empty((total, sizes[0][1]), dtype=FEATURE_DTYPES[cfg.train.feature_dtype])
    starts = np.cumsum([0] + [n for n, _ in sizes])
    parts = [_read(path, cfg, progress, into=features[a:b]) for path, a, b in zip(paths, starts[:-1], starts[1:])]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        if any(part.provenance[s].get("params_sha256") != first.provenance[a].get("params_sha256")
               for s, a in zip(part.specs, first.specs)):
            raise _other_features(path, paths[0], f"{', '.join(part.specs)} made otherwise")
    loaded = [name for part in parts for name, value in part.heads.items() if value is not None]
    if loaded:
        raise ConfigError(f"head family {loaded[0]} reads its own data from a cache; several caches train the pooled "
                          "heads only: leave it out or train it on one cache")
    tables = [combine.settle_blanks(part.table, [m for members in part.groups.values() for m in members],
                                    blank_meaning(part.table.attrs["layout"], cfg.data.blank)) for part in parts]
    table = combine.stack_tables(tables, names)
    layouts = {part.table.attrs["layout"] for part in parts}
    table.attrs["layout"] = layouts.pop() if len(layouts) == 1 else ""
    attrs = {**first.attrs, "data_layout": table.attrs["layout"],
             "data_root": ", ".join(str(part.attrs.get("data_root", "?")) for part in parts),
             "image_set_sha256": [part.attrs.get("image_set_sha256") for part in parts], "datasets": names}
    pixels = np.concatenate([p.pixel_hashes for p in parts]) if all(len(p.pixel_hashes) for p in parts) else NO_HASHES
    return _Part(features, table, combine.union_groups([part.groups for part in parts]),
                 np.concatenate([part.bad for part in parts]), first.specs, first.provenance, attrs,
                 np.concatenate([part.hashes for part in parts]), pixels, first.heads), "missing"


def load_train_data(cache_path, cfg: Config, progress: Progress = no_progress) -> TrainData:
    """Read features and labels from a cache, or from several (a list: one data set each, stacked with a `dataset`
    column; pipeline.data.combine); missing backbones or labels are one clear error each, and a matrix too
    large for this process's memory stops before it is read (`progress` ticks rows as they are)."""
    if not cfg.train.features:
        raise ConfigError("train.features is empty; name the backbones whose features to use")
    paths = [Path(cache_path)] if isinstance(cache_path, (str, Path)) else [Path(p) for p in cache_path]
    if len(paths) == 1:
        part = _read(paths[0], cfg, progress)
        blank = blank_meaning(part.table.attrs["layout"], cfg.data.blank)
    else:
        part, blank = _read_several(paths, cfg, progress)
    where = f"cache {paths[0]}" if len(paths) == 1 else f"caches {', '.join(map(str, paths))}"
    table, features = part.table, part.features
    tasks = resolve_tasks(cfg.train.tasks, table, load_label_maps(cfg.data.labels), cfg.train.non_nodule,
                          cfg.train.task_kinds, where=where, groups=part.groups, uncertain=cfg.data.uncertain,
                          blank=blank)
    targets = encode_targets(table, tasks)
    rows = np.flatnonzero(~part.bad & finite_rows(features))
    if len(rows) < len(table):
        logger.warning("leaving out %d image(s) without features (unreadable when cached)", len(table) - len(rows))
    rows = keep_views(table, rows, cfg.data.views, where)
    features = control_features(features, cfg.eval, cfg.train.seed)
    release_freed_memory()  # the label table's temporary Python strings
    return TrainData(features, table, rows, tasks, targets, part.specs, part.provenance, part.attrs, part.hashes,
                     part.heads, part.pixel_hashes)


# --------------------------------------------------------------------------------------------------
# cross-validation


@dataclass
class CVResult:
    splits: List[Split]
    names: List[SplitName]
    heads: Dict[str, Any] = field(default_factory=dict)  # head family -> its out-of-fold outcome, in training order
    reports: Dict[str, Dict[str, object]] = field(default_factory=dict)  # model -> its report of the tasks
    reference: Optional[TaskPredictions] = None  # the reference family's out-of-fold task predictions
    primary: Dict[str, object] = field(default_factory=dict)  # which head answers in predict (primary_answers)
    timings: Dict[str, float] = field(default_factory=dict)  # seconds per part, and the training's row-epochs

    def families(self) -> List[Tuple[Any, Any]]:
        """(head family, its out-of-fold outcome) of every family that cross-validated, in training order."""
        registry = head_families()
        return [(registry[name], outcome) for name, outcome in self.heads.items()]

    def test_rows(self) -> OutOfFold:
        """Every split's test rows in the splits' order (`rows`, `split`): the rows of every out-of-fold output."""
        return OutOfFold.collect(self.splits, [{} for _ in self.splits])


def inner_val_fraction(cfg: Config) -> float:
    """The share of training rows held out for early stopping (none in-sample: every row trains)."""
    if cfg.eval.protocol == "insample" or not any(getattr(h, "early_stopping", 0) for _, h in enabled_heads(cfg)):
        return 0.0
    if not 0 < cfg.train.val_fraction < 1:
        raise ConfigError(f"train.val_fraction {cfg.train.val_fraction} must be in (0, 1) with early stopping")
    return cfg.train.val_fraction


def cross_validate(data: TrainData, cfg: Config, progress: Progress = no_progress) -> CVResult:
    """Every enabled head family cross-validated on the protocol's splits (the reference first: the others are
    given its out-of-fold predictions), then the choice of the head that answers in predict."""
    splits, names = make_splits(data.table, data.rows, cfg.eval, inner_val_fraction(cfg))
    cv = CVResult(splits, names)
    for plugin, _ in enabled_heads(cfg):
        outcome = plugin.cross_validate(data, cfg, splits, names, cv.reference, progress)
        cv.heads[plugin.name] = outcome
        predictions = plugin.task_predictions(outcome)  # the reference's (one family: tests/test_registries.py)
        if predictions is not None:
            cv.reference = predictions
        cv.reports.update(plugin.task_reports(outcome))
        cv.timings.update(getattr(outcome, "timings", {}))
        release_freed_memory()
    cv.primary = primary_answers(data, cfg, splits, cv.reference, cv.families())
    cv.primary["presence_auc"] = presence_evidence(cv)
    return cv


def presence_evidence(cv: CVResult) -> Optional[Dict[str, object]]:
    """How well the head that answers presence in predict did here: the reference's out-of-fold AUC with its CI,
    or the inner-validation AUC another family was chosen on; None without a presence task. Predict warns when it
    is near chance."""
    head = cv.primary.get("presence")
    if head == cv.reference.answer:
        entry = cv.reports.get(cv.reference.model, {}).get("overall", {}).get("presence", {}).get("auc")
        return None if not entry else {"value": entry["pooled"], "ci95": entry.get("ci95"), "on": "out-of-fold"}
    value = cv.primary.get("validation", {}).get(head, {}).get("presence_auc")
    return None if value is None else {"value": value, "ci95": None, "on": "inner validation"}


# --------------------------------------------------------------------------------------------------
# the final head


@dataclass
class Refit:
    """Heads trained on every usable row (what predict uses): each family's tensors by its name and the manifest
    (pipeline.heads.artefact writes both)."""

    tensors: Dict[str, Dict[str, object]]
    manifest: HeadManifest


def refit(data: TrainData, cfg: Config, cv: CVResult, progress: Progress = no_progress) -> Refit:
    """Every family that cross-validated trains its final head on every usable row (for the epochs its
    cross-validation validated); the description adds what the features, the training rows and the coordinate
    grid were."""
    split = Split(train=data.rows, test=np.zeros(0, dtype=np.int64), key=cfg.train.seed * 1000 + 999)
    tensors: Dict[str, Dict[str, object]] = {}
    families: Dict[str, Dict[str, object]] = {}
    for plugin, outcome in cv.families():
        tensors[plugin.name], families[plugin.name] = plugin.refit(data, cfg, outcome, split, progress)
    run = RunFacts(
        features=list(data.specs), in_dim=int(data.features.shape[1]),
        grid=[float(np.nanmedian(data.table["grid_w"])), float(np.nanmedian(data.table["grid_h"]))],
        primary=dict(cv.primary), backbones=dict(data.provenance), trained_rows=int(len(data.rows)),
        trained_sha256=[h.decode() for h in data.hashes[data.rows]] if len(data.hashes) else [],
        # the decoded images too: a DICOM (or re-encoded) copy of a training image is a training image
        trained_pixels_sha256=[h.decode() for h in data.pixel_hashes[data.rows]] if len(data.pixel_hashes) else [],
        cache_image_set_sha256=data.cache_attrs.get("image_set_sha256"), tool_version=__version__)
    return Refit(tensors, HeadManifest(run, families))


def primary_answers(data: TrainData, cfg: Config, splits: Sequence[Split], reference: TaskPredictions,
                    outcomes: Sequence[Tuple[Any, Any]]) -> Dict[str, object]:
    """Which head answers "is there a nodule" (presence) and "where" (position) in predict: the reference
    family, unless another family (HeadPlugin.choose, given its out-of-fold outcome) does better on the inner
    validation rows of every split (never on test folds); the reference without inner validation rows."""
    out: Dict[str, object] = {"position": reference.answer, "presence": reference.answer}
    others = [(p, o) for p, o in outcomes if p.artefact != reference.answer]
    n_val = sum(len(s.val) for s in splits)
    if not others or not n_val:
        out["chosen_on"] = "default (no other head)" if not others else "default (no inner validation rows)"
        return out
    validation: Dict[str, object] = {}
    for plugin, outcome in others:
        choice = dict(plugin.choose(data, cfg, splits, reference, outcome))
        validation.update(choice.pop("validation", {}))
        for role, head in choice.items():  # the first family that beats the reference takes the role
            if out.get(role) == reference.answer:
                out[role] = head
    out["chosen_on"] = f"inner validation rows ({n_val} images over {len(splits)} splits)"
    out["validation"] = validation
    return out
