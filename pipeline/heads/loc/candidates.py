"""The localisation head's candidates: the peaks of a score map (non-maximum suppression), their decoding into one
answer per image, and the second stage that re-scores them from the map's vectors around each peak."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from pipeline.heads.loc.settings import LocSettings
from pipeline.core.metrics import sigmoid
from pipeline.core.train import floor_std

logger = logging.getLogger(__name__)


def candidates(scores: np.ndarray, k: int = 10, nms_cells: int = 2) -> tuple:
    """Score maps (n, H, W) -> the k best local peaks per image, by non-maximum suppression: the best cell,
    refined by a soft-argmax over the 3x3 cells around it, then every cell within `nms_cells` of it is
    suppressed, k times. Returns x and y as fractions of the image and the peak scores (logits), each (n, k)."""
    n, h, w = scores.shape
    xs, ys, ss = np.full((n, k), np.nan), np.full((n, k), np.nan), np.full((n, k), -np.inf)
    for i in range(n):
        work = scores[i].astype(np.float64).copy()
        for j in range(min(k, h * w)):
            pi, pj = np.unravel_index(int(np.argmax(work)), (h, w))
            if not np.isfinite(work[pi, pj]):
                break
            i0, i1, j0, j1 = max(pi - 1, 0), min(pi + 2, h), max(pj - 1, 0), min(pj + 2, w)
            win = scores[i, i0:i1, j0:j1].astype(np.float64)
            p = np.exp(win - win.max())
            p /= p.sum()
            ii, jj = np.mgrid[i0:i1, j0:j1]
            xs[i, j], ys[i, j], ss[i, j] = ((p * jj).sum() + 0.5) / w, ((p * ii).sum() + 0.5) / h, scores[i, pi, pj]
            work[max(pi - nms_cells, 0):pi + nms_cells + 1, max(pj - nms_cells, 0):pj + nms_cells + 1] = -np.inf
    return xs, ys, ss


def decode_maps(scores: np.ndarray, method: str = "argmax") -> tuple:
    """Score maps (n, H, W) -> (x, y) as fractions of the image, and the presence probability."""
    n, h, w = scores.shape
    flat = scores.reshape(n, -1)
    presence = sigmoid(flat.max(axis=1))
    if method == "softargmax":
        p = np.exp(flat - flat.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        jj, ii = np.meshgrid(np.arange(w), np.arange(h))
        cx, cy = p @ jj.ravel(), p @ ii.ravel()
        return (cx + 0.5) / w, (cy + 0.5) / h, presence
    xs, ys, _ = candidates(scores, k=1)  # the peak cell, refined by a soft-argmax over the 3x3 cells around it
    return xs[:, 0], ys[:, 0], presence


@dataclass
class Detections:
    """The localisation head's word on each image: its answer (x, y as fractions of the image, P(nodule)) and its
    candidates (cx, cy, logit score; (n, k), best first), from one decoding (detect)."""

    x: np.ndarray
    y: np.ndarray
    presence: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    cs: np.ndarray

    @property
    def cands(self) -> tuple:
        return self.cx, self.cy, self.cs

    @classmethod
    def empty(cls, n: int, k: int) -> "Detections":
        """n images without detections yet (NaN), to fill batch by batch (put)."""
        return cls(*(np.full(n, np.nan) for _ in range(3)), *(np.full((n, k), np.nan) for _ in range(3)))

    def put(self, rows: np.ndarray, part: "Detections") -> None:
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(part, f.name)

    @classmethod
    def concat(cls, parts: Sequence["Detections"]) -> "Detections":
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


#: The second stage's inputs besides the candidate's cell vector: its first-stage logit, that logit minus the
#: image's best, its rank, and its position (x, y, distance from the centre column).
RESCORE_BASE = 6


def candidate_features(maps: np.ndarray, cands: tuple, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(n, k, RESCORE_BASE + C): what the second stage sees of each candidate of maps (n, C, H, W): the base
    features and the standardised map vector of the candidate's cell (its neighbourhood in the backbone's view)."""
    cx, cy, cs = cands
    n, c, h, w = maps.shape
    k = cs.shape[1]
    present = np.isfinite(cs)
    logit = np.where(present, cs, 0.0)
    base = np.stack([logit, logit - logit[:, :1], np.broadcast_to(np.arange(k, dtype=float), cs.shape),
                     np.nan_to_num(cx, nan=0.5), np.nan_to_num(cy, nan=0.5), np.abs(np.nan_to_num(cx, nan=0.5) - 0.5)],
                    axis=-1)
    ci = np.clip((np.nan_to_num(cy, nan=0.5) * h).astype(int), 0, h - 1)
    cj = np.clip((np.nan_to_num(cx, nan=0.5) * w).astype(int), 0, w - 1)
    vec = (maps[np.arange(n)[:, None], :, ci, cj].astype(np.float64) - mean) / std  # (n, k, C)
    return np.concatenate([base, vec], axis=-1)


@dataclass
class Rescorer:
    """The second stage: a logistic regression that re-scores each candidate from candidate_features."""

    map_mean: np.ndarray  # (C,) standardisation of the cell vectors (the training rows')
    map_std: np.ndarray
    center: np.ndarray  # (F,) standardisation of the features
    scale: np.ndarray
    coef: np.ndarray  # (F,)
    intercept: float

    def __call__(self, maps: np.ndarray, cands: tuple) -> np.ndarray:
        """Logits (n, k) of the candidates of maps (-inf where there is no candidate)."""
        f = (candidate_features(maps, cands, self.map_mean, self.map_std) - self.center) / self.scale
        return np.where(np.isfinite(cands[2]), f @ self.coef + self.intercept, -np.inf)

    def tensors(self) -> Dict[str, torch.Tensor]:
        arrays = {"map_mean": self.map_mean, "map_std": self.map_std, "center": self.center, "scale": self.scale,
                  "coef": self.coef, "intercept": np.array([self.intercept])}
        return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor]) -> "Rescorer":
        a = {k: v.numpy().astype(np.float64) for k, v in t.items()}
        return cls(a["map_mean"], a["map_std"], a["center"], a["scale"], a["coef"], float(a["intercept"][0]))


def fit_rescorer(maps: np.ndarray, cands: tuple, hits: np.ndarray, c: float) -> Optional[Rescorer]:
    """Fit the second stage on candidates of maps (n, C, H, W) and whether each hits a lesion (hits (n, k)): the
    caller passes rows whose first-stage scores come from a model that never trained on them (a fold ensemble's
    validation rows), and never test rows. None (with a warning) where the candidates are all hits or misses."""
    from sklearn.linear_model import LogisticRegression

    m = maps.astype(np.float32)
    mean = m.mean(axis=(0, 2, 3)).astype(np.float64)
    std = floor_std(m.std(axis=(0, 2, 3))).astype(np.float64)
    f = candidate_features(maps, cands, mean, std)
    keep = np.isfinite(cands[2])
    x, y = f[keep], hits[keep].astype(int)
    center, scale = x.mean(axis=0), floor_std(x.std(axis=0))
    if len(np.unique(y)) < 2:
        logger.warning("heads.loc.rescore: the second stage's %d training candidates are all %s, so it cannot "
                       "learn; the first stage's scores stand (more nodules or heads.loc.candidates would help)",
                       len(y), "hits" if y.all() else "misses")
        return None
    clf = LogisticRegression(C=c, max_iter=5000).fit((x - center) / scale, y)
    return Rescorer(mean, std, center, scale, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]))


def detect(scores: np.ndarray, cfg: LocSettings, maps: Optional[np.ndarray] = None,
           rescorer: Optional[Rescorer] = None) -> Detections:
    """Score maps (n, H, W) -> Detections: candidates by non-maximum suppression; the answer at the map's peak
    (cfg.decode) with P(nodule) from its maximum, or, with a second stage (rescorer, on the maps (n, C, H, W)),
    the candidates re-scored and re-ordered, the answer the best of them and P(nodule) its probability."""
    cx, cy, cs = candidates(scores, cfg.candidates, cfg.nms_cells)
    if rescorer is None:
        x, y, presence = decode_maps(scores, cfg.decode)
        return Detections(x, y, presence, cx, cy, cs)
    cs = rescorer(maps, (cx, cy, cs))
    order = np.argsort(-cs, axis=1, kind="stable")
    cx, cy, cs = (np.take_along_axis(a, order, axis=1) for a in (cx, cy, cs))
    presence = sigmoid(cs[:, 0])
    return Detections(cx[:, 0], cy[:, 0], presence, cx, cy, cs)
