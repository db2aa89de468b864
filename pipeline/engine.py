"""Stage two's engine: cached features and labels in, cross-validated heads and a refit head out.

`load_train_data` reads what a config asks for from a cache (features, declared tasks, spatial maps);
`cross_validate` trains the Res-MTNet head (and the localisation head when enabled) on every split of the
protocol through the one stacked trainer (pipeline.train), beside the baselines on the same splits, and
summarises every model with one summariser; `refit` trains the final heads on all rows for the validated
epoch count. train-heads, sweeps and the paper's tables all run through here.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from cache import GROUPS, FeatureCache

from .config import CHOICES, Config
from .data import task_groups
from .errors import CacheError, ConfigError
from .evaluate import (OutOfFold, SplitName, baseline_predictions, control_features, first_seed_mask, make_splits,
                       regression_norms, size_bins, summarise, summarise_metrics)
from .labels import load_label_maps
from .tasks import TaskSpec, encode_targets, resolve_tasks
from .train import Job, JobResult, Split, fixed_epochs, train_jobs, validated_epochs

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
    maps: Optional[np.ndarray] = None  # (N, C, H, W) spatial maps for the localisation head
    loc_spec: str = ""
    loc_provenance: Dict[str, object] = field(default_factory=dict)


def _load_maps(cache: FeatureCache, cfg: Config, specs: Sequence[str]) -> Tuple[np.ndarray, str, Dict]:
    """The spatial maps the localisation head trains on (train.loc.backbone, or the first feature backbone
    that has maps)."""
    present = cache.entries(GROUPS.spatial)
    wanted = cfg.train.loc.backbone
    if wanted:
        spec = cache.resolve(wanted, GROUPS.spatial)
    else:
        spec = next((s for s in specs if s in present), None) or next(iter(present), None)
        if spec is None:
            raise CacheError(f"train.loc is enabled but cache {cache.path} holds no spatial maps; add them with: "
                             + cache.add_command([specs[0]], spatial=True))
    return cache.spatial(spec).astype(np.float16, copy=False), spec, present[spec].attrs


#: Working memory stage two needs beside the feature matrix (per-split targets and statistics, the stacked
#: heads and their Adam state, blocks of rows, bootstrap resamples), which tests/test_scale.py measures.
WORKING_BYTES = 1536 << 20
#: How the matrix may be held (the names are the config's choices for train.feature_dtype).
FEATURE_DTYPES = {name: np.dtype(name).type for name in CHOICES["train.feature_dtype"]}


def check_memory(n: int, d: int, dtype: str, where: str) -> None:
    """Stop before reading a feature matrix that, with stage two's working memory, does not fit in what this
    process may allocate (the cgroup's limit included): one line with the size and the settings that help."""
    from .runtime import available_memory

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
        maps, loc_spec, loc_provenance = _load_maps(cache, cfg, specs) if tcfg.loc.enabled else (None, "", {})
    groups = {**task_groups(str(attrs.get("data_layout", ""))), **tcfg.task_groups}
    tasks = resolve_tasks(tcfg.tasks, table, load_label_maps(cfg.data.labels), tcfg.non_nodule, tcfg.task_kinds,
                          where=f"cache {cache_path}", groups=groups, uncertain=cfg.data.uncertain)
    targets = encode_targets(table, tasks)
    rows = np.flatnonzero(~bad & finite_rows(features))
    if len(rows) < len(table):
        logger.warning("leaving out %d image(s) without features (unreadable when cached)", len(table) - len(rows))
    rows = keep_views(table, rows, cfg.data.views, f"cache {cache_path}")
    features = control_features(features, cfg.eval, cfg.train.seed)
    if maps is not None and cfg.eval.control == "noise":
        maps = np.random.default_rng(cfg.train.seed + 7778).standard_normal(maps.shape).astype(np.float16)
    return TrainData(features, table, rows, tasks, targets, specs, provenance, attrs, hashes, maps, loc_spec,
                     loc_provenance)


# --------------------------------------------------------------------------------------------------
# cross-validation


@dataclass
class LocOutcome:
    """Out-of-fold results of the localisation head, and its metrics beside the pooled regression's."""

    rows: np.ndarray
    split: np.ndarray
    x: np.ndarray  # fractions of the grid
    y: np.ndarray
    presence: np.ndarray
    scores: np.ndarray  # (n, H, W) score maps, first seed
    fits: List[LocFit]  # one per split
    report: Dict[str, Dict[str, object]]
    froc_curves: Dict[str, Dict[str, list]] = field(default_factory=dict)  # head -> froc_<hit>_curve: [fpi, sens]


@dataclass
class CVResult:
    splits: List[Split]
    names: List[SplitName]
    results: List[JobResult]
    oof: Dict[str, OutOfFold]  # model name -> out-of-fold predictions
    reports: Dict[str, Dict[str, object]] = field(default_factory=dict)
    loc: Optional[LocOutcome] = None
    efficiency: Dict[str, object] = field(default_factory=dict)  # label efficiency: size -> its scores
    primary: Dict[str, object] = field(default_factory=dict)  # which head answers in predict (primary_answers)
    timings: Dict[str, float] = field(default_factory=dict)  # seconds per part, and the training's row-epochs

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
    heads = [cfg.train] + ([cfg.train.loc] if cfg.train.loc.enabled else [])
    if cfg.eval.protocol == "insample" or not any(h.early_stopping for h in heads):
        return 0.0
    if not 0 < cfg.train.val_fraction < 1:
        raise ConfigError(f"train.val_fraction {cfg.train.val_fraction} must be in (0, 1) with early stopping")
    return cfg.train.val_fraction


def pooled_family(data: TrainData, splits: Sequence[Split]):
    """The Res-MTNet family on these splits (features standardised per split on its training rows)."""
    from .model import PooledFamily, prepare

    return PooledFamily(prepare(data.features, data.targets, data.tasks, splits))


def loc_family(data: TrainData, splits: Sequence[Split]):
    from .localise import LocFamily, prepare_loc

    return LocFamily(prepare_loc(data.maps, data.table, splits))


@dataclass
class LocFit:
    """One configuration's localisation head on one split: the mean score maps (logits) of its members, and the
    scores of the rows a member was validated on and never trained on. One member, or with
    train.loc.fold_ensemble K, K members, each trained without one of K folds of the split's training rows
    (patients kept together) and early-stopped on it: the ensemble of the fold models."""

    scores: np.ndarray  # (N, H, W): every row
    val_rows: np.ndarray
    val_scores: np.ndarray  # (len(val_rows), H, W)
    members: List[JobResult]
    member_splits: List[Split]
    rescorer: Optional[object] = None  # pipeline.localise.Rescorer (train.loc.rescore)

    def validation(self, rows: np.ndarray) -> np.ndarray:
        """The score maps of `rows` (each among val_rows) from the member validated on them."""
        where = {int(r): i for i, r in enumerate(self.val_rows)}
        return self.val_scores[[where[int(r)] for r in rows]]

    def detect(self, data: "TrainData", lcfg, rows: np.ndarray, validation: bool = False):
        """Detections (pipeline.localise.detect) of `rows`: from the members' mean, or (`validation`) from the
        member validated on each row."""
        from .localise import detect

        scores = self.validation(rows) if validation else self.scores[rows]
        return detect(scores, lcfg, None if self.rescorer is None else data.maps[rows], self.rescorer)


def member_splits(data: TrainData, cfg: Config, lcfg, split: Split) -> List[Split]:
    """The splits a localisation head's members train on: the split itself, or its training rows (inner
    validation included) in lcfg.fold_ensemble folds, each member validated on one (its test rows: the split's)."""
    k = int(lcfg.fold_ensemble)
    if k < 2:
        return [split]
    import copy

    ecfg = copy.deepcopy(cfg.eval)
    ecfg.protocol, ecfg.folds, ecfg.seeds = "kfold", k, [int(split.key) % (2 ** 31)]
    rows = np.sort(np.concatenate([split.train, split.val]))
    inner, _ = make_splits(data.table, rows, ecfg)
    return [Split(train=s.train, test=split.test, val=s.test, key=split.key * 37 + i + 1)
            for i, s in enumerate(inner)]


def fit_localisation(data: TrainData, cfg: Config, pairs: Sequence[Tuple[object, Split]], desc: str,
                     progress: Progress = no_progress, keep_state: bool = False) -> List[LocFit]:
    """Train the localisation head of every (train.loc section, split) pair, all members stacked in one run."""
    splits: List[Split] = []
    jobs: List[Job] = []
    owner: List[int] = []
    for i, (lcfg, split) in enumerate(pairs):
        for member in member_splits(data, cfg, lcfg, split):
            jobs.append(Job(lcfg, len(splits)))
            splits.append(member)
            owner.append(i)
    with progress(sum(j.cfg.epochs for j in jobs), desc, rows=_rows_per_epoch(splits)) as tick:
        results = train_jobs(loc_family(data, splits), jobs, keep_state=keep_state, progress=tick,
                             device=cfg.train.device)
    fits = []
    for i in range(len(pairs)):
        mine = [j for j, o in enumerate(owner) if o == i]
        scores = results[mine[0]].outputs if len(mine) == 1 else np.mean([results[j].outputs for j in mine], axis=0)
        val_rows = np.concatenate([splits[j].val for j in mine])
        val_scores = np.concatenate([results[j].outputs[splits[j].val] for j in mine])
        fit = LocFit(scores, val_rows, val_scores, [results[j] for j in mine], [splits[j] for j in mine])
        lcfg, split = pairs[i]
        if lcfg.rescore:
            fit.rescorer = _fit_second_stage(data, cfg, lcfg, fit, np.setdiff1d(val_rows, split.val))
        fits.append(fit)
    return fits


def _fit_second_stage(data: TrainData, cfg: Config, lcfg, fit: LocFit, rows: np.ndarray):
    """The candidate re-scorer of one split, trained on `rows`: training rows whose first-stage scores come from
    the member that never trained on them (the split's own inner validation and test rows left out, so its
    scores there stay honest)."""
    from .localise import candidate_hits, candidates, fit_rescorer

    cands = candidates(fit.validation(rows), lcfg.candidates, lcfg.nms_cells)
    hits = candidate_hits(data.table, rows, cands[0], cands[1], cfg.eval.pixel_mm)
    with_lesion = np.isfinite(data.table["x"].to_numpy(float)[rows]) if "x" in data.table else np.zeros(len(rows), bool)
    # the first stage's recall bounds what any re-scoring can reach: said per split
    logger.info("second stage: %d candidates of %d images, %d hits; %d of %d images with a lesion have a hit among "
                "their %d candidates", int(np.isfinite(cands[2]).sum()), len(rows), int(hits.sum()),
                int((hits.any(axis=1) & with_lesion).sum()), int(with_lesion.sum()), lcfg.candidates)
    return fit_rescorer(data.maps[rows], cands, hits, lcfg.rescore_c)


def final_loc_config(lcfg, epochs: int):
    """The train.loc section a head is retrained with on more rows: for its validated `epochs`, or unchanged
    for a fold ensemble, whose members early-stop on their own folds."""
    return lcfg if lcfg.fold_ensemble >= 2 else fixed_epochs(lcfg, epochs)


def localisation_summary(table: pd.DataFrame, rows: np.ndarray, split: np.ndarray, x: np.ndarray, y: np.ndarray,
                         presence: Optional[np.ndarray], names: Sequence[SplitName], cfg: Config,
                         cands: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
                         ) -> Dict[str, Dict[str, object]]:
    """Localisation metrics of out-of-fold centres (summarise_metrics): errors in pixels of the grid, and the
    FROC sensitivities of the candidates (cx, cy, score), each (n, k)."""
    from .localise import froc, localisation_metrics, nodule_errors

    def metrics_of(sel, weights):
        out = localisation_metrics(table, rows[sel], x[sel], y[sel], None if presence is None else presence[sel],
                                   cfg.eval.pixel_mm, weights)
        if cands is not None:
            out.update(froc(table, rows[sel], *(c[sel] for c in cands), cfg.eval.pixel_mm, cfg.eval.froc_fps,
                            weights))
        return out

    def count(sel):
        return int(nodule_errors(table, rows[sel], x[sel], y[sel], cfg.eval.pixel_mm)[0].sum())

    return summarise_metrics(metrics_of, split, len(names), first_seed_mask(split, names), cfg.eval.bootstrap,
                             cfg.train.seed, count)


def localise(data: TrainData, cfg: Config, splits: Sequence[Split], names: Sequence[SplitName],
             pooled: OutOfFold, progress: Progress = no_progress) -> LocOutcome:
    """Cross-validate the localisation head on the same splits as the pooled heads and compare the two."""
    from .localise import Detections, froc

    lcfg = cfg.train.loc
    fits = fit_localisation(data, cfg, [(lcfg, s) for s in splits], "localisation head", progress)
    table = data.table
    oof = OutOfFold.collect(splits, [{"scores": f.scores} for f in fits])
    det = Detections.concat([f.detect(data, lcfg, s.test) for f, s in zip(fits, splits)])
    x, y, presence, cands = det.x, det.y, det.presence, det.cands
    first = first_seed_mask(oof.split, names)
    report = {"heatmap": localisation_summary(table, oof.rows, oof.split, x, y, presence, names, cfg, cands)}
    curves = {"heatmap": froc(table, oof.rows[first], *(c[first] for c in cands), cfg.eval.pixel_mm,
                              cfg.eval.froc_fps, curves=True)}
    if "x" in pooled.preds and "y" in pooled.preds:
        px = pooled.preds["x"] / table["grid_w"].to_numpy(float)[pooled.rows]
        py = pooled.preds["y"] / table["grid_h"].to_numpy(float)[pooled.rows]
        pp = pooled.preds.get("presence")
        # the pooled head gives one candidate per image, scored by its presence probability
        one = (px[:, None], py[:, None], (pp if pp is not None else np.ones(len(px)))[:, None])
        report["pooled-regression"] = localisation_summary(table, pooled.rows, pooled.split, px, py, pp, names,
                                                           cfg, one)
        pfirst = first_seed_mask(pooled.split, names)
        curves["pooled-regression"] = froc(table, pooled.rows[pfirst], *(c[pfirst] for c in one),
                                           cfg.eval.pixel_mm, cfg.eval.froc_fps, curves=True)
    return LocOutcome(oof.rows, oof.split, x, y, presence, oof.preds["scores"][first], fits, report,
                      {k: {n: v.tolist() for n, v in c.items() if n.endswith("_curve")} for k, c in curves.items()})


def cross_validate(data: TrainData, cfg: Config, progress: Progress = no_progress) -> CVResult:
    """Train one configuration on every split; evaluate it and the baselines on the same splits."""
    splits, names = make_splits(data.table, data.rows, cfg.eval, inner_val_fraction(cfg))
    family = pooled_family(data, splits)
    family.check(cfg.train)
    clock = time.perf_counter()
    with progress(len(splits) * cfg.train.epochs, "train-heads", rows=_rows_per_epoch(splits)) as tick:
        results = train_jobs(family, [Job(cfg.train, s) for s in range(len(splits))], progress=tick,
                             device=cfg.train.device)
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
    if data.maps is not None:
        cv.loc = localise(data, cfg, splits, names, oof[MODEL_NAME], progress)
    cv.primary = primary_answers(data, cfg, splits, per_split, cv.loc)
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
    from .config import train_size
    from .evaluate import split_groups

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
    family = pooled_family(data, jobs)
    with progress(len(jobs) * cfg.train.epochs, "label efficiency", rows=_rows_per_epoch(jobs)) as tick:
        results = train_jobs(family, [Job(cfg.train, i) for i in range(len(jobs))], progress=tick,
                             device=cfg.train.device)
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
    """Heads trained on every usable row (what predict uses), with what is needed to apply them."""

    tensors: Dict[str, object]
    spec: Dict[str, object]


def refit(data: TrainData, cfg: Config, cv: CVResult, progress: Progress = no_progress) -> Refit:
    """Train the final heads on every usable row for the epoch count validated in the cross-validation
    (median best epoch of its splits; the configured count without early stopping)."""
    split = Split(train=data.rows, test=np.zeros(0, dtype=np.int64), key=cfg.train.seed * 1000 + 999)
    tcfg = fixed_epochs(cfg.train, validated_epochs(cv.results, cfg.train))
    family = pooled_family(data, [split])
    with progress(tcfg.epochs, "refit", rows=float(len(split.train))) as tick:
        (result,) = train_jobs(family, [Job(tcfg, 0)], keep_state=True, progress=tick, device=cfg.train.device)
    from .localise import export_head as export_loc
    from .model import export_head as export_pooled

    tensors, pooled_spec = export_pooled(result.state, family.prep, data.rows, tcfg.hidden, tcfg.blocks,
                                         cfg.train.seed)
    spec: Dict[str, object] = {
        **pooled_spec,
        "train": {k: v for k, v in asdict(tcfg).items() if k != "loc"}, "loss_weights": result.loss_weights,
        "features": data.specs, "trained_rows": int(len(data.rows)),
        "trained_sha256": [data.hashes[r] for r in data.rows] if data.hashes else [],
        "primary": cv.primary,
        # the coordinate grid x and y were learnt in (JSRT: 2048), to express predictions in any image's pixels
        "grid": [float(np.nanmedian(data.table["grid_w"])), float(np.nanmedian(data.table["grid_h"]))],
    }
    if data.maps is not None:
        lcfg = final_loc_config(cfg.train.loc, validated_epochs([m for f in cv.loc.fits for m in f.members],
                                                                cfg.train.loc))
        (fit,) = fit_localisation(data, cfg, [(lcfg, split)], "refit localisation", progress, keep_state=True)
        loc_tensors, loc_spec = export_loc([m.state for m in fit.members], [s.train for s in fit.member_splits],
                                           data.maps, lcfg, fit.rescorer)
        tensors.update(loc_tensors)
        spec["localisation"] = {"backbone": data.loc_spec, **loc_spec}
    return Refit(tensors, spec)


def primary_answers(data: TrainData, cfg: Config, splits: Sequence[Split], pooled: Sequence[Dict[str, np.ndarray]],
                    loc: Optional[LocOutcome]) -> Dict[str, object]:
    """Which head answers "is there a nodule" and "where" in predict, chosen on the inner validation rows of
    every split (never on test folds): the localisation head where it finds more nodules within 100 px
    (position) or has the higher presence AUC (presence) there than the pooled Res-MTNet head; the pooled head
    otherwise, and without a localisation head or inner validation rows."""
    out: Dict[str, object] = {"position": "pooled", "presence": "pooled"}
    val = [s.val for s in splits]
    if loc is None or not sum(len(v) for v in val):
        out["chosen_on"] = "default (no localisation head)" if loc is None else "default (no inner validation rows)"
        return out
    from .localise import Detections, localisation_metrics

    rows = np.concatenate(val)
    grid_w, grid_h = (data.table[c].to_numpy(float)[rows] for c in ("grid_w", "grid_h"))
    decoded = Detections.concat([f.detect(data, cfg.train.loc, v, validation=True) for f, v in zip(loc.fits, val)])
    hx, hy, hp = decoded.x, decoded.y, decoded.presence
    have = {k for k in ("x", "y", "presence") if k in pooled[0]}
    pp = np.concatenate([p["presence"][v] for p, v in zip(pooled, val)]) if "presence" in have else None
    scores = {"localisation": localisation_metrics(data.table, rows, hx, hy, hp, cfg.eval.pixel_mm)}
    if {"x", "y"} <= have:
        px = np.concatenate([p["x"][v] for p, v in zip(pooled, val)]) / grid_w
        py = np.concatenate([p["y"][v] for p, v in zip(pooled, val)]) / grid_h
        scores["pooled"] = localisation_metrics(data.table, rows, px, py, pp, cfg.eval.pixel_mm)
    elif pp is not None:
        pres = data.table["presence"].to_numpy(float)[rows]
        known = np.isfinite(pres)
        from .metrics import roc_auc

        scores["pooled"] = {"presence_auc": roc_auc(pres[known], pp[known]) if known.any() else np.nan}

    def value(head: str, metric: str) -> float:
        v = float(scores.get(head, {}).get(metric, np.nan))
        return v if v == v else -1.0

    if value("localisation", "within_100px") > value("pooled", "within_100px"):
        out["position"] = "localisation"
    if value("localisation", "presence_auc") > value("pooled", "presence_auc"):
        out["presence"] = "localisation"
    out["chosen_on"] = f"inner validation rows ({len(rows)} images over {len(splits)} splits)"
    out["validation"] = {head: {m: float(v) for m, v in res.items() if m in ("within_100px", "presence_auc")}
                         for head, res in scores.items()}
    return out
