"""The patch re-scorer as a head family ('patch', settings under heads.patch: settings.py): stage one's second look.

It reads a patch set of the cache (extract-features --patches: a trained head's out-of-fold candidates.csv, or a
grid), fits its re-scorer (rescorer.py) on the points of each split's training images, labelled hit / miss by FROC's
rule from those images' lesions only, and re-scores the points of the split's test images: their FROC, distances
and presence AUC are measured out of fold with CIs exactly as the localisation head's, beside the first stage's own
scores of the same candidates (a candidates set) so the second look's gain is read on the same images.

Predict crops each new image's points the same way (apply.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from cache import match_spec
from pipeline.core.froc import (FROC_FPS, candidate_hits, detection_scores, froc, loc_metric_directions,
                                localisation_summary)
from pipeline.core.metrics import sigmoid
from pipeline.core.summary import first_seed_mask
from pipeline.errors import CacheError, ConfigError
from pipeline.features.patches import grid_stride
from pipeline.heads.patch.rescorer import (PatchPoints, PatchRescorer, as_candidates, fit_patch_rescorer,
                                           suppress)
from pipeline.heads.patch.apply import PatchApplied
from pipeline.heads.patch.settings import NAME, PatchSettings
from pipeline.heads.plugin import HeadPlugin, Validation, register_head
from pipeline.reporting import format_entry

logger = logging.getLogger(__name__)


@dataclass
class PatchInputs:
    """What the family reads from a cache: one backbone's embeddings of one patch set, as points."""

    points: PatchPoints
    set: str
    spec: str
    source: str
    provenance: Dict[str, object]


@dataclass
class Found:
    """One fit's word on images `rows`: candidates (n, k; x, y fractions of the grid, logit) best first, and the
    answer (the best candidate) with its probability."""

    rows: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    cs: np.ndarray

    @property
    def cands(self) -> tuple:
        return self.cx, self.cy, self.cs

    @property
    def presence(self) -> np.ndarray:
        return np.where(np.isfinite(self.cs[:, 0]), sigmoid(self.cs[:, 0]), np.nan)

    @classmethod
    def concat(cls, parts: Sequence["Found"]) -> "Found":
        k = max(p.cs.shape[1] for p in parts)

        def pad(a):
            return np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=np.nan)
        return cls(np.concatenate([p.rows for p in parts]), *(np.concatenate([pad(getattr(p, f)) for p in parts])
                                                              for f in ("cx", "cy", "cs")))


@dataclass
class PatchOutcome:
    rows: np.ndarray
    split: np.ndarray
    found: Found
    report: Dict[str, Dict[str, object]]
    froc_curves: Dict[str, Dict[str, list]]


def settings_of(cfg) -> PatchSettings:
    """The family's settings in `cfg` (a sweep's configuration trains it whatever its enabled flag says)."""
    return cfg.heads[NAME]


def _nms_radius(data, s: PatchSettings) -> float:
    if s.nms_px >= 0:
        return s.nms_px
    stride = grid_stride(data.heads[NAME].source)
    if stride is None:
        return 0.0
    table = data.table
    per_pixel = float(np.nanmedian(table["grid_w"].to_numpy(float) / table["width"].to_numpy(float)))
    return 1.5 * float(stride) * per_pixel


def _fractions(data, image: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple:
    t = data.table
    return x / t["grid_w"].to_numpy(float)[image], y / t["grid_h"].to_numpy(float)[image]


def fit(data, cfg, s: PatchSettings, train_rows: np.ndarray) -> Optional[PatchRescorer]:
    """The re-scorer fitted on the points of `train_rows` (only their lesions are read)."""
    pts = data.heads[NAME].points
    at = pts.select(train_rows, s.max_rank)
    rows = np.unique(pts.image[at])
    fx, fy = _fractions(data, pts.image[at], pts.x[at], pts.y[at])
    grid = as_candidates(pts.image[at], {"x": fx, "y": fy}, rows)
    hits = candidate_hits(data.table, rows, grid["x"], grid["y"], cfg.eval.pixel_mm)
    return fit_patch_rescorer(pts.embeddings(at, s.sizes or pts.sizes), _first(pts, s, at), pts.image[at],
                              hits[tuple(grid["slot"].T)], s.c, s.combine, cfg.train.seed)


def _first(pts: PatchPoints, s: PatchSettings, at: np.ndarray) -> Optional[np.ndarray]:
    return pts.first_stage(at) if s.first_stage and pts.has_first_stage else None


def found_by(data, s: PatchSettings, rows: np.ndarray, logits_of) -> Found:
    """The candidates of images `rows` scored by logits_of(point indices) (NaN-free), suppressed and ordered."""
    pts = data.heads[NAME].points
    at = pts.select(rows, s.max_rank)
    grid = as_candidates(pts.image[at], {"x": pts.x[at], "y": pts.y[at], "s": logits_of(at)}, rows)
    score = suppress(grid["x"], grid["y"], grid["s"], _nms_radius(data, s))
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), axis=1, kind="stable")
    x, y, score = (np.take_along_axis(a, order, axis=1) for a in (grid["x"], grid["y"], score))
    image = np.repeat(rows[:, None], x.shape[1], axis=1)
    fx, fy = _fractions(data, image, x, y)
    return Found(rows, fx, fy, np.where(np.isfinite(score), score, np.nan))


def rescore(data, cfg, s: PatchSettings, train_rows: np.ndarray, rows: np.ndarray) -> Found:
    """Fit on `train_rows`, re-score the points of `rows` (without a fit: the first stage's scores)."""
    model = fit(data, cfg, s, train_rows)
    pts = data.heads[NAME].points
    if model is None:
        return first_stage(data, s, rows)
    return found_by(data, s, rows, lambda at: model(pts.embeddings(at, s.sizes or pts.sizes), _first(pts, s, at)))


def first_stage(data, s: PatchSettings, rows: np.ndarray) -> Found:
    """The same points by the first stage's own scores (a grid has none: every point 0)."""
    pts = data.heads[NAME].points
    return found_by(data, s, rows, lambda at: np.nan_to_num(pts.score[at], nan=0.0))


#: A sweep's metrics of the same candidates by the first stage's scores (a candidates set): '<name>.first_<metric>'.
FIRST = "first_"


def scores(data, cfg, s: PatchSettings, train_rows: np.ndarray, rows: np.ndarray) -> Dict[str, float]:
    """Metrics of the points of `rows` re-scored by a fit on `train_rows`, and (FIRST...) by the first stage."""
    heads = {"": rescore(data, cfg, s, train_rows, rows)}
    if data.heads[NAME].points.has_first_stage:
        heads[FIRST] = first_stage(data, s, rows)
    out = {}
    for prefix, f in heads.items():
        res = detection_scores(data.table, f.rows, f.cx[:, 0], f.cy[:, 0], f.presence, f.cands, cfg)
        out.update({prefix + k: v for k, v in res.items()})
    return out


class PatchFamily(HeadPlugin):
    """The patch re-scorer (see the module's docstring)."""

    name, artefact, settings = NAME, NAME, PatchSettings

    def load(self, cache, cfg, specs: Sequence[str]) -> PatchInputs:
        s = settings_of(cfg)
        sets = cache.patch_sets()
        if not sets:
            raise CacheError(f"heads.patch is enabled but cache {cache.path} holds no patch set; add one with "
                             f"extract-features --data DIR --cache {cache.path} --patches CANDIDATES.csv|grid:STRIDE")
        if not s.set and len(sets) > 1:
            raise ConfigError(f"cache {cache.path} holds patch sets {', '.join(sets)}; choose one with --set "
                              "heads.patch.set=NAME")
        name = s.set or next(iter(sets))
        if name not in sets:
            raise ConfigError(f"heads.patch.set '{name}': cache {cache.path} has {', '.join(sets)}")
        patch_set = sets[name]
        present = list(patch_set.entries)
        spec = (cache_match(s.backbone, present, name) if s.backbone else
                next((p for p in specs if p in present), present[0] if present else None))
        if spec is None:
            raise CacheError(f"patch set '{name}' of {cache.path} holds no embeddings")
        _check_memory(name, len(patch_set.points["size"]), patch_set.entries[spec].dim)
        points = PatchPoints.of(patch_set.points, cache.patch_features(name, spec), f"patch set '{name}'")
        unknown = sorted(set(s.sizes) - set(points.sizes))
        if unknown:
            raise ConfigError(f"heads.patch.sizes: patch set '{name}' has no {unknown[0]} px crops (it has "
                              f"{', '.join(map(str, points.sizes))})")
        return PatchInputs(points, name, spec, str(patch_set.attrs.get("source", "")),
                           dict(patch_set.entries[spec].attrs))

    def cross_validate(self, data, cfg, splits, names, reference, progress) -> PatchOutcome:
        s = settings_of(cfg)
        parts = [rescore(data, cfg, s, np.concatenate([sp.train, sp.val]), sp.test) for sp in splits]
        found = Found.concat(parts)
        split = np.concatenate([np.full(len(sp.test), i) for i, sp in enumerate(splits)])
        heads = {"patch": found}
        if data.heads[NAME].points.has_first_stage:
            heads["first-stage"] = Found.concat([first_stage(data, s, sp.test) for sp in splits])
        first = first_seed_mask(split, names)
        report, curves = {}, {}
        for head, f in heads.items():
            # candidate_recall_at_K: the share of nodules among an image's first K points in this order
            report[head] = localisation_summary(data.table, f.rows, split, f.cx[:, 0], f.cy[:, 0], f.presence, names,
                                                cfg, f.cands, (f.cx, f.cy))
            c = froc(data.table, f.rows[first], *(a[first] for a in f.cands), cfg.eval.pixel_mm, cfg.eval.froc_fps,
                     curves=True)
            curves[head] = {k: v.tolist() for k, v in c.items() if k.endswith("_curve")}
        return PatchOutcome(found.rows, split, found, report, curves)

    def refit(self, data, cfg, outcome: PatchOutcome, split, progress):
        inputs = data.heads[NAME]
        s = settings_of(cfg)
        model = fit(data, cfg, s, split.train)
        tensors = model.tensors() if model is not None else {}
        pts = inputs.points
        k = s.max_rank or (int(pts.rank.max()) if pts.has_first_stage else 0)
        return tensors, {"set": inputs.set, "backbone": inputs.spec, "source": inputs.source,
                         "sizes": s.sizes or pts.sizes, "first_stage": s.first_stage, "k": k,
                         "nms_px": _nms_radius(data, s), "combine": model.combine if model is not None else None,
                         "provenance": inputs.provenance}

    def load_head(self, spec, tensors) -> PatchApplied:
        return PatchApplied(spec, tensors)

    def metric_directions(self, cfg) -> Dict[str, int]:
        own = loc_metric_directions(cfg.eval.froc_fps if cfg is not None else FROC_FPS)
        return {**own, **{FIRST + k: v for k, v in own.items()}}

    def validate(self, data, cfgs, splits, progress) -> Validation:
        def metrics(c: int, i: int) -> Dict[str, float]:
            sp = splits[i]
            return scores(data, cfgs[c], settings_of(cfgs[c]), np.concatenate([sp.train, sp.val]), sp.test)
        return Validation(metrics, lambda c: 0)

    def score_winner(self, data, cfg, epochs: int, split) -> Dict[str, float]:
        return scores(data, cfg, settings_of(cfg), np.concatenate([split.train, split.val]), split.test)

    def oof_columns(self, data, outcome: PatchOutcome, rows: np.ndarray, part: slice = slice(None)):
        assert np.array_equal(outcome.rows, rows)  # the same splits, in the same order
        f, mine = outcome.found, rows[part]
        return {"patch_x": np.round(f.cx[part, 0] * data.table["grid_w"].to_numpy(float)[mine], 1),
                "patch_y": np.round(f.cy[part, 0] * data.table["grid_h"].to_numpy(float)[mine], 1),
                "patch_presence_prob": np.round(f.presence[part], 6)}

    def report_lines(self, data, cfg, outcome: PatchOutcome) -> List[str]:
        inputs = data.heads[NAME]
        heads = list(outcome.report)
        pts = inputs.points
        lines = ["", f"Patch re-scorer (patch set {inputs.set}: {len(pts.image)} points of {len(np.unique(pts.image))}"
                 f" images at {', '.join(map(str, pts.sizes))} px, {inputs.spec}; the same candidates by the first "
                 "stage's scores beside it where the set has them):", "",
                 "| metric | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for metric in outcome.report["patch"]:
            lines.append(f"| {metric} | " + " | ".join(format_entry(outcome.report[h].get(metric)) for h in heads)
                         + " |")
        return lines

    def metrics(self, outcome: PatchOutcome) -> Dict[str, Any]:
        return {**outcome.report, "froc_curves": outcome.froc_curves}


#: Bytes per patch and feature the family holds at its peak: the embeddings read and joined by point (float32,
#: twice) and a split's training points in float64 three times over (inputs, standardised, the solver's copy):
#: 27 estimated, 9.2 GiB measured for JSRT's 252,928 x 1,280 grid set.
BYTES_PER_VALUE = 27


def _check_memory(patch_set: str, n: int, dim: int) -> None:
    """Stop before reading a patch set the re-scorer cannot hold: one line with the size and what helps."""
    from pipeline.runtime import available_memory

    need, free = n * dim * BYTES_PER_VALUE, available_memory()
    if free is not None and need > free:
        gib = 1 << 30
        raise ConfigError(f"heads.patch: re-scoring patch set '{patch_set}' ({n} patches x {dim} features) needs "
                          f"about {need / gib:.1f} GiB but this process may use {free / gib:.1f} GiB; extract fewer "
                          "points (fewer candidates, a coarser grid, fewer --patch-sizes) or use a machine with more "
                          "memory")


def cache_match(name: str, present: Sequence[str], patch_set: str) -> str:
    """The stored spec of a patch set's backbone that `name` names."""
    spec = match_spec(name, present)
    if spec is None:
        raise ConfigError(f"heads.patch.backbone '{name}': patch set '{patch_set}' holds "
                          f"{', '.join(present) or 'no embeddings'}")
    return spec


register_head(PatchFamily())
