"""The patch re-scorer: a logistic regression on the embeddings of the patches cropped around each point (one
vector per point: its sizes side by side, and the first stage's score and rank where the points are candidates),
trained to say whether the point hits a lesion by FROC's rule; and the points of a set of images as candidates."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from pipeline.core.train import floor_std
from pipeline.errors import CacheError

logger = logging.getLogger(__name__)


@dataclass
class PatchPoints:
    """A patch set's points, one per (image, x, y): each size's embedding side by side in `features` (M, S * D),
    rows grouped by image."""

    image: np.ndarray  # (M,) the image's row
    x: np.ndarray  # (M,) grid pixels
    y: np.ndarray
    score: np.ndarray  # (M,) first-stage logit (NaN: none)
    rank: np.ndarray  # (M,) first-stage rank (0: none)
    features: np.ndarray  # (M, S * D) float32
    sizes: List[int]
    dim: int  # D

    @classmethod
    def of(cls, points: Dict[str, np.ndarray], embeddings: np.ndarray, where: str) -> "PatchPoints":
        """From a patch set's per-patch arrays and one backbone's (P, D) embeddings: every point must be cropped at
        every size of the set."""
        sizes = sorted(int(s) for s in np.unique(points["size"]))
        parts = []
        for s in sizes:
            at = np.flatnonzero(points["size"] == s)
            at = at[np.lexsort((points["y"][at], points["x"][at], points["image_row"][at]))]
            parts.append(at)
        first = parts[0]
        for s, at in zip(sizes[1:], parts[1:]):
            if len(at) != len(first) or not all(np.array_equal(points[k][at], points[k][first])
                                                for k in ("image_row", "x", "y")):
                raise CacheError(f"{where}: its points are not all cropped at {s} px; re-extract it with every "
                                 "--patch-sizes at once")
        features = np.concatenate([embeddings[at] for at in parts], axis=1).astype(np.float32, copy=False)
        return cls(points["image_row"][first].astype(np.int64), points["x"][first], points["y"][first],
                   points["score"][first], points["rank"][first], features, sizes, int(embeddings.shape[1]))

    @property
    def has_first_stage(self) -> bool:
        return bool(np.isfinite(self.score).any())

    def select(self, rows: np.ndarray, max_rank: int = 0) -> np.ndarray:
        """Indices of the points of images `rows` (rank <= max_rank where it is given), grouped by image."""
        keep = np.isin(self.image, rows)
        if max_rank > 0 and self.has_first_stage:
            keep &= self.rank <= max_rank
        return np.flatnonzero(keep)

    def embeddings(self, at: np.ndarray, sizes: List[int]) -> np.ndarray:
        """(len(at), len(sizes) * D): the chosen sizes' embeddings side by side."""
        blocks = [self.features[at, i * self.dim:(i + 1) * self.dim] for i, s in enumerate(self.sizes) if s in sizes]
        return np.concatenate(blocks, axis=1).astype(np.float64)

    def first_stage(self, at: np.ndarray) -> np.ndarray:
        """(len(at), 3): first_stage_inputs of the points `at`."""
        return first_stage_inputs(self.score[at], self.rank[at], self.image[at])


def first_stage_inputs(score: np.ndarray, rank: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(m, 3): what the re-scorer reads of the first stage for each point, in train-heads and predict alike: its
    score (NaN: 0), that score minus the best of its image, and its rank."""
    score = np.nan_to_num(score, nan=0.0)
    best = np.full(int(image.max()) + 1 if len(image) else 0, -np.inf)
    np.maximum.at(best, image, score)
    return np.stack([score, score - best[image], rank], axis=1)


def as_candidates(image: np.ndarray, values: Dict[str, np.ndarray], rows: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-point values of images (image (m,), grouped by image) as (len(rows), K) arrays, one row per `rows`
    entry in that order (NaN-padded; K the most points of one image), and 'slot': each point's (row, column)."""
    order = {int(r): i for i, r in enumerate(rows)}
    which = np.array([order[int(r)] for r in image], dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(which)) + 1] if len(which) else np.zeros(0, dtype=np.int64)
    column = np.arange(len(which)) - np.repeat(starts, np.diff(np.r_[starts, len(which)]))
    k = int(column.max()) + 1 if len(column) else 1
    out = {}
    for name, v in values.items():
        grid = np.full((len(rows), k), np.nan)
        grid[which, column] = v
        out[name] = grid
    out["slot"] = np.stack([which, column], axis=1)
    return out


def suppress(x: np.ndarray, y: np.ndarray, score: np.ndarray, radius: float) -> np.ndarray:
    """Candidates (n, k) in grid pixels: the scores with every point within `radius` of a better one of its image
    set to NaN (greedy non-maximum suppression, best first; radius 0: none)."""
    out = score.copy()
    if radius <= 0:
        return out
    for i in range(score.shape[0]):
        live = np.flatnonzero(np.isfinite(score[i]))
        order = live[np.argsort(-score[i, live], kind="stable")]
        xs, ys = x[i, order], y[i, order]
        near = np.hypot(xs[:, None] - xs[None, :], ys[:, None] - ys[None, :]) < radius
        gone = np.zeros(len(order), dtype=bool)
        for j in range(len(order)):
            if not gone[j]:
                gone[j + 1:] |= near[j, j + 1:]
        out[i, order[gone]] = np.nan
    return out


@dataclass
class Logistic:
    """A logistic regression on standardised inputs."""

    center: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.center) / self.scale) @ self.coef + self.intercept

    def arrays(self, prefix: str) -> Dict[str, np.ndarray]:
        return {f"{prefix}center": self.center, f"{prefix}scale": self.scale, f"{prefix}coef": self.coef,
                f"{prefix}intercept": np.array([self.intercept])}

    @classmethod
    def of(cls, a: Dict[str, np.ndarray], prefix: str) -> "Logistic":
        return cls(a[f"{prefix}center"], a[f"{prefix}scale"], a[f"{prefix}coef"], float(a[f"{prefix}intercept"][0]))

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, c: float) -> "Logistic":
        from sklearn.linear_model import LogisticRegression

        center, scale = x.mean(axis=0), floor_std(x.std(axis=0))
        clf = LogisticRegression(C=c, max_iter=5000).fit((x - center) / scale, y)
        return cls(center, scale, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]))


#: Inner folds of the training images for the stacked regression's out-of-fold patch logits.
STACK_FOLDS = 3


@dataclass
class PatchRescorer:
    """A fitted re-scorer: the patch regression and, when stacked, the combining regression."""

    patch: Logistic
    combine: str
    stack: Optional[Logistic] = None

    def __call__(self, embeddings: np.ndarray, first: Optional[np.ndarray]) -> np.ndarray:
        """Logits of points from their embeddings and first-stage inputs (PatchPoints.embeddings / first_stage)."""
        if self.combine == "joint":
            return self.patch(np.concatenate([embeddings, first], axis=1))
        logit = self.patch(embeddings)
        return logit if self.stack is None else self.stack(np.concatenate([first, logit[:, None]], axis=1))

    def tensors(self) -> Dict[str, torch.Tensor]:
        arrays = {**self.patch.arrays("patch."), **(self.stack.arrays("stack.") if self.stack else {})}
        return {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in arrays.items()}

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor], combine: str) -> "PatchRescorer":
        a = {k: v.numpy().astype(np.float64) for k, v in t.items()}
        return cls(Logistic.of(a, "patch."), combine, Logistic.of(a, "stack.") if "stack.coef" in a else None)


def fit_patch_rescorer(embeddings: np.ndarray, first: Optional[np.ndarray], image: np.ndarray, hits: np.ndarray,
                       c: float, combine: str, seed: int = 0) -> Optional[PatchRescorer]:
    """Fit on training points (embeddings, first-stage inputs or None, their images, whether each hits a lesion);
    'stack' fits the patch regression on STACK_FOLDS folds of the images for out-of-fold logits, the combining
    regression on those, then the patch regression on every point. None (with a warning) when the points are all
    hits or all misses."""
    y = hits.astype(int)
    if len(np.unique(y)) < 2:
        logger.warning("heads.patch: the %d training points are all %s, so the re-scorer cannot learn", len(y),
                       "hits" if y.all() else "misses")
        return None
    if first is None or combine == "none":
        return PatchRescorer(Logistic.fit(embeddings, y, c), "none")
    if combine == "joint":
        return PatchRescorer(Logistic.fit(np.concatenate([embeddings, first], axis=1), y, c), "joint")
    images = np.unique(image)
    fold_of = dict(zip(images, np.random.default_rng(seed).permutation(len(images)) % STACK_FOLDS))
    fold = np.array([fold_of[i] for i in image])
    oof = np.zeros(len(y))
    for k in range(STACK_FOLDS):
        inner = fold != k
        if len(np.unique(y[inner])) < 2:
            oof[~inner] = 0.0
            continue
        oof[~inner] = Logistic.fit(embeddings[inner], y[inner], c)(embeddings[~inner])
    return PatchRescorer(Logistic.fit(embeddings, y, c), "stack",
                         Logistic.fit(np.concatenate([first, oof[:, None]], axis=1), y, 1.0))
