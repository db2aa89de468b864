"""Localisation metrics: FROC (sensitivity at given false positives per image, by three hit rules) and the
distances of one answer per image to the nodule, over the table's lesions (JSRT's nodule and size, or the boxes of
the field's data sets)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pipeline.config import EvalConfig
from pipeline.core.metrics import roc_auc
from pipeline.core.splits import SplitName, patient_groups
from pipeline.core.summary import first_seed_mask, summarise_metrics


#: Localisation metrics and their direction (+1: higher is better), for sweeps ranking on `loc.<metric>`; the
#: FROC sensitivities at the configured levels join them (loc_metric_directions).
LOC_METRICS = {"mean_px": -1, "median_px": -1, "within_radius": 1, "within_100px": 1, "within_200px": 1,
               "x_mae_norm": -1, "y_mae_norm": -1, "presence_auc": 1}


#: FROC operating points (false positives per image): eval.froc_fps's default, its one owner.
FROC_FPS = tuple(EvalConfig().froc_fps)


#: How a candidate hits a lesion: within its radius, within 100 px of the grid, inside its box (box-annotated data).
FROC_HITS = ("radius", "100px", "box")

#: The first stage's candidate counts whose recall is reported: what bounds any re-scoring of K candidates.
RECALL_AT = (5, 10, 20, 50)


def froc_names(fps=FROC_FPS):
    """Metric names of the FROC sensitivities, one per kind of hit and level (box hits only where the data set has
    lesion boxes)."""
    return [f"froc_{hit}_at_{fp:g}fp" for hit in FROC_HITS for fp in fps]


def recall_names(ks=RECALL_AT):
    """Metric names of the first stage's candidate recall at each k."""
    return [f"candidate_recall_at_{k}" for k in ks]


def loc_metric_directions(fps=FROC_FPS) -> Dict[str, int]:
    """Every localisation metric a run reports at these FROC levels, with its direction."""
    return {**LOC_METRICS, **{name: 1 for name in froc_names(fps) + recall_names()}}


def candidate_recall(table, rows: np.ndarray, cand_x: np.ndarray, cand_y: np.ndarray, pixel_mm: float,
                     ks=RECALL_AT, weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """The share of lesions that one of the first k candidates of their image hits (within the lesion's radius,
    FROC's rule; candidates (n, K) best first, K >= max(ks)), for each k: the ceiling of any second look at k
    candidates. Only images whose lesions are all drawn count; `weights` (n,) or (R, n) per row."""
    image, kinds = lesion_hits(table, rows, cand_x, cand_y, pixel_mm)
    w = (np.ones(len(rows)) if weights is None else np.asarray(weights, dtype=float)) * lesions_drawn(table, rows)
    lesion_w = w[..., image]
    total = lesion_w.sum(axis=-1)
    hit = kinds["radius"] & np.isfinite(cand_x[image])
    out = {}
    for k in ks:
        found = hit[:, :k].any(axis=1)
        out[f"candidate_recall_at_{k}"] = np.where(total > 0, (lesion_w * found).sum(axis=-1) /
                                                   np.where(total > 0, total, 1), np.nan)
    return out


def lesions(table, rows: np.ndarray, pixel_mm: float) -> tuple:
    """The lesions of `rows`: (image index into rows, x, y in grid pixels, radius in grid pixels), one per row
    with a known centre (JSRT's one nodule per image; a layout with several boxes per image adds rows here)."""
    x, y = table["x"].to_numpy(float)[rows], table["y"].to_numpy(float)[rows]
    nod = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    radius = table["size_mm"].to_numpy(float)[rows][nod] / 2 / pixel_mm
    return nod, x[nod], y[nod], radius


#: The label column of lesion boxes ('x0,y0,x1,y1;...' in grid pixels; pipeline.data.field.nodule_targets).
BOX_COLUMN = "nodule_boxes"


def box_lesions(table, rows: np.ndarray) -> Optional[tuple]:
    """The lesions of `rows` from their boxes: (image index into rows, centre x, y, half width, half height), or
    None where the table has no lesion boxes (JSRT)."""
    if BOX_COLUMN not in table:
        return None
    out = []
    for i, text in enumerate(table[BOX_COLUMN].to_numpy()[rows]):
        if isinstance(text, str) and text:
            for part in text.split(";"):
                x0, y0, x1, y1 = (float(v) for v in part.split(","))
                out.append((i, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2))
    if not out:
        return None
    return tuple(np.array(col, dtype=int if k == 0 else float) for k, col in enumerate(zip(*out)))


def lesions_drawn(table, rows: np.ndarray) -> np.ndarray:
    """Whether all of each image's lesions are drawn, so FROC can score it: a negative (presence 0) or an image
    with a lesion box or centre. A positive without one is left out (NIH labels 11,207 images Nodule or Mass and
    boxes 164): a correct detection there would count as a false positive and the image in the denominator.
    Without a presence column every image counts."""
    if "presence" not in table:
        return np.ones(len(rows), dtype=bool)
    located = np.zeros(len(rows), dtype=bool)
    if "x" in table and "y" in table:
        located |= np.isfinite(table["x"].to_numpy(float)[rows]) & np.isfinite(table["y"].to_numpy(float)[rows])
    if BOX_COLUMN in table:
        located |= np.array([isinstance(t, str) and bool(t) for t in table[BOX_COLUMN].to_numpy()[rows]], dtype=bool)
    return located | (table["presence"].to_numpy(float)[rows] == 0)


def lesion_hits(table, rows: np.ndarray, cand_x: np.ndarray, cand_y: np.ndarray, pixel_mm: float,
                lesion_list: Optional[tuple] = None) -> tuple:
    """(image of each lesion (index into rows), {kind of hit: (lesions, k) whether each candidate of the lesion's
    image hits it}) for candidates cand_* (n, k) of `rows` (fractions of the grid): within the lesion's radius
    ('radius'), within 100 px of the grid ('100px'), and inside its box ('box') where the table has lesion boxes
    (box_lesions: then they are the lesions, a radius half a box's shorter side); `lesion_list` (as `lesions`
    returns) replaces the table's lesions."""
    gw, gh = table["grid_w"].to_numpy(float)[rows], table["grid_h"].to_numpy(float)[rows]
    boxes = box_lesions(table, rows) if lesion_list is None else None
    if boxes is not None:
        image, lx, ly, half_w, half_h = boxes
        radius = np.minimum(half_w, half_h)
    else:
        image, lx, ly, radius = lesions(table, rows, pixel_mm) if lesion_list is None else lesion_list
    dx = cand_x[image] * gw[image, None] - lx[:, None]
    dy = cand_y[image] * gh[image, None] - ly[:, None]
    dist = np.hypot(dx, dy)
    kinds = {"radius": dist <= radius[:, None], "100px": dist <= 100.0}
    if boxes is not None:
        kinds["box"] = (np.abs(dx) <= half_w[:, None]) & (np.abs(dy) <= half_h[:, None])
    return image, kinds


def candidate_hits(table, rows: np.ndarray, cx: np.ndarray, cy: np.ndarray, pixel_mm: float) -> np.ndarray:
    """(n, k): whether each candidate of rows[i] hits a lesion of its image, as FROC counts a hit (lesion_hits):
    inside the lesion's box where the table has boxes, else within its radius."""
    image, kinds = lesion_hits(table, rows, cx, cy, pixel_mm)
    hits = np.zeros(cx.shape, dtype=bool)
    np.logical_or.at(hits, image, kinds["box"] if "box" in kinds else kinds["radius"])
    return hits


def froc(table, rows: np.ndarray, cand_x: np.ndarray, cand_y: np.ndarray, cand_score: np.ndarray,
         pixel_mm: float, fps=FROC_FPS, weights: Optional[np.ndarray] = None,
         curves: bool = False, lesion_list: Optional[tuple] = None) -> Dict[str, np.ndarray]:
    """Free-response ROC of nodule candidates (rows[i]'s candidates: cand_*[i], fractions of the grid).

    A candidate hits a lesion of its image within the lesion's radius ('radius'), or within 100 px of the 2048
    grid ('100px'). As in LUNA16, a lesion counts as found at a threshold when any candidate scored at or above
    it hits the lesion; a candidate that hits no lesion is a false positive; further hits of a found lesion are
    neither. The curve is read only at thresholds a decision can take (after every candidate of a group of equal
    scores), so it does not depend on the order of the rows. Sensitivity (found lesions / lesions; NaN without
    lesions) at each rate of false positives per image (over every image, with or without a lesion) in `fps`:
    the best sensitivity of a threshold at or below that rate (0 where none is). `weights` (n,) or (R, n) per
    row (bootstrap resamples) give each image its weight; `curves` adds each FROC curve as (2, thresholds)
    false positives per image and sensitivity. `lesion_list` (as `lesions` returns) replaces the table's one
    lesion per row, for images with several. Where the table has lesion boxes (box_lesions), they are the
    lesions, a radius is half a box's shorter side, and a third kind of hit counts: inside the box ('box').
    Only images whose lesions are all drawn count (lesions_drawn: a positive without a box or centre weighs 0).
    """
    n, k = cand_x.shape
    image, kinds = lesion_hits(table, rows, cand_x, cand_y, pixel_mm, lesion_list)
    w = (np.ones(n) if weights is None else np.asarray(weights, dtype=float)) * lesions_drawn(table, rows)
    score = np.where(np.isfinite(cand_score), cand_score, -np.inf)
    present = np.isfinite(score)  # (n, k): a candidate at all
    n_images = w.sum(axis=-1)
    n_lesions = w[..., image].sum(axis=-1)
    out: Dict[str, np.ndarray] = {}
    for hit_name, inside in kinds.items():
        hits = inside & present[image]  # (lesions, k)
        found_at = np.where(hits, score[image], -np.inf).max(axis=1) if k else np.full(len(image), -np.inf)
        hit_any = np.zeros((n, k), dtype=bool)
        np.logical_or.at(hit_any, image, hits)
        fp = present & ~hit_any
        # events: false positives (counted in fpi) and lesion detections (in sensitivity), by score
        ev_score = np.concatenate([score[fp], found_at[np.isfinite(found_at)]])
        ev_w = np.concatenate([w[..., np.nonzero(fp)[0]], w[..., image[np.isfinite(found_at)]]], axis=-1)
        is_fp = np.r_[np.ones(int(fp.sum()), bool), np.zeros(int(np.isfinite(found_at).sum()), bool)]
        order = np.argsort(-ev_score, kind="stable")
        ev_score, ev_w, is_fp = ev_score[order], ev_w[..., order], is_fp[order]
        ends = np.r_[np.flatnonzero(np.diff(ev_score) != 0), len(ev_score) - 1] if len(ev_score) else \
            np.zeros(0, dtype=int)  # the last event of each group of equal scores: a threshold's operating point
        fpi = np.cumsum(ev_w * is_fp, axis=-1)[..., ends] / np.expand_dims(np.where(n_images > 0, n_images, 1), -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = np.cumsum(ev_w * ~is_fp, axis=-1)[..., ends] / np.expand_dims(n_lesions, -1)
        no_lesion = np.broadcast_to(n_lesions <= 0, np.shape(n_images))
        for level in fps:
            reached = np.where(fpi <= level, sens, 0.0)
            value = reached.max(axis=-1) if reached.shape[-1] else np.zeros(np.shape(n_images))
            out[f"froc_{hit_name}_at_{level:g}fp"] = np.where(no_lesion, np.nan, value)
        if curves:
            out[f"froc_{hit_name}_curve"] = np.stack([fpi, sens])
    return out


def loc_metrics(dx_px: np.ndarray, dy_px: np.ndarray, radius_px: np.ndarray, grid: np.ndarray,
                presence: Optional[np.ndarray] = None, presence_score: Optional[np.ndarray] = None,
                weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Localisation errors of nodule rows (pixels of the coordinate grid), optionally weighted (R, n)."""
    dist = np.hypot(dx_px, dy_px)
    w = np.ones_like(dist) if weights is None else weights
    total = w.sum(axis=-1)

    def share(hit):
        return (w @ hit.astype(float)) / np.where(total > 0, total, 1)

    out = {"mean_px": (w @ dist) / np.where(total > 0, total, 1), "within_radius": share(dist <= radius_px),
           "within_100px": share(dist <= 100), "within_200px": share(dist <= 200),
           "x_mae_norm": (w @ np.abs(dx_px / grid)) / np.where(total > 0, total, 1),
           "y_mae_norm": (w @ np.abs(dy_px / grid)) / np.where(total > 0, total, 1)}
    if weights is None:
        out["median_px"] = np.median(dist) if len(dist) else np.nan
    if presence is not None and presence_score is not None:
        out["presence_auc"] = roc_auc(presence, presence_score)
    return out


def nodule_errors(table, rows: np.ndarray, x_frac: np.ndarray, y_frac: np.ndarray, pixel_mm: float) -> tuple:
    """Of `rows` with a known nodule centre: (mask, dx, dy, radius, grid width), all in grid pixels."""
    x, y = table["x"].to_numpy(dtype=float)[rows], table["y"].to_numpy(dtype=float)[rows]
    gw, gh = table["grid_w"].to_numpy(dtype=float)[rows], table["grid_h"].to_numpy(dtype=float)[rows]
    radius = table["size_mm"].to_numpy(dtype=float)[rows] / 2 / pixel_mm
    nod = np.isfinite(x) & np.isfinite(y)
    return nod, x_frac[nod] * gw[nod] - x[nod], y_frac[nod] * gh[nod] - y[nod], radius[nod], gw[nod]


def localisation_metrics(table, rows: np.ndarray, x_frac: np.ndarray, y_frac: np.ndarray,
                         presence_score: Optional[np.ndarray], pixel_mm: float,
                         weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """loc_metrics of predicted centres (fractions of the grid) for `rows`, and the presence AUC where known;
    `weights` (len(rows),) or (R, len(rows)) for bootstrap resamples."""
    nod, dx, dy, radius, grid = nodule_errors(table, rows, x_frac, y_frac, pixel_mm)
    res = loc_metrics(dx, dy, radius, grid, weights=None if weights is None else weights[..., nod])
    pres = table["presence"].to_numpy(dtype=float)[rows]
    known = np.isfinite(pres)
    if presence_score is not None and known.any():
        res["presence_auc"] = roc_auc(pres[known], presence_score[known],
                                      None if weights is None else weights[..., known])
    return res


def localisation_summary(table: pd.DataFrame, rows: np.ndarray, split: np.ndarray, x: np.ndarray, y: np.ndarray,
                         presence: Optional[np.ndarray], names: Sequence[SplitName], cfg,
                         cands: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None,
                         first_stage: Optional[Tuple[np.ndarray, np.ndarray]] = None
                         ) -> Dict[str, Dict[str, object]]:
    """Localisation metrics of out-of-fold centres (summarise_metrics): errors in pixels of the grid, the FROC
    sensitivities of the candidates (cx, cy, score), each (n, k), and the recall of the first stage's candidates
    (cx, cy, best first) at RECALL_AT."""
    def metrics_of(sel, weights):
        out = localisation_metrics(table, rows[sel], x[sel], y[sel], None if presence is None else presence[sel],
                                   cfg.eval.pixel_mm, weights)
        if cands is not None:
            out.update(froc(table, rows[sel], *(c[sel] for c in cands), cfg.eval.pixel_mm, cfg.eval.froc_fps,
                            weights))
        if first_stage is not None:
            out.update(candidate_recall(table, rows[sel], *(c[sel] for c in first_stage), cfg.eval.pixel_mm,
                                        weights=weights))
        return out

    def count(sel, metric):
        return int(nodule_errors(table, rows[sel], x[sel], y[sel], cfg.eval.pixel_mm)[0].sum())

    patients = patient_groups(table, cfg.eval)
    return summarise_metrics(metrics_of, split, len(names), first_seed_mask(split, names), cfg.eval.bootstrap,
                             cfg.train.seed, count, None if patients is None else patients[rows],
                             cfg.eval.bootstrap_exact_rows)


def detection_scores(table, rows: np.ndarray, x: np.ndarray, y: np.ndarray, presence: Optional[np.ndarray],
                     cands: Tuple[np.ndarray, np.ndarray, np.ndarray], cfg) -> Dict[str, float]:
    """metric -> value of a detector's word on `rows` (a sweep's validation metrics, a winner's test scores): one
    answer per image (x, y fractions of the grid, presence) and its candidates (cx, cy, score; each (n, k)):
    errors, presence AUC, FROC."""
    res = localisation_metrics(table, rows, x, y, presence, cfg.eval.pixel_mm)
    res.update(froc(table, rows, *cands, cfg.eval.pixel_mm, cfg.eval.froc_fps))
    return {k: float(v) for k, v in res.items()}
