"""Metrics, vectorised over bootstrap resamples.

Every function takes optional `weights`: shape (n,) for one weighted evaluation, or (R, n) for R at once
(a bootstrap resample is a vector of counts). They agree with scikit-learn's metrics with sample_weight
(tests check this); zero divisions give 0 as scikit-learn's zero_division=0, an undefined AUC gives NaN.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import numpy as np


def _weights(n: int, weights: Optional[np.ndarray]) -> np.ndarray:
    return np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """(C, C) or (R, C, C) confusion matrices: rows true class, columns predicted."""
    w = _weights(len(y), weights)
    cell = y.astype(np.int64) * n_classes + pred.astype(np.int64)
    onehot = np.zeros((len(y), n_classes * n_classes))
    onehot[np.arange(len(y)), cell] = 1.0
    return (w @ onehot).reshape(*w.shape[:-1], n_classes, n_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def accuracy(y, pred, n_classes, weights=None):
    cm = confusion(y, pred, n_classes, weights)
    return _safe_div(np.trace(cm, axis1=-2, axis2=-1), cm.sum(axis=(-2, -1)))


def f1_scores(y, pred, n_classes, weights=None) -> Dict[str, np.ndarray]:
    """Weighted (by support) and macro F1 over the classes present in the truth or the predictions."""
    cm = confusion(y, pred, n_classes, weights)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    f1 = _safe_div(2 * tp, support + predicted)
    present = (support + predicted) > 0
    weighted = _safe_div((f1 * support).sum(axis=-1), support.sum(axis=-1))
    macro = _safe_div((f1 * present).sum(axis=-1), present.sum(axis=-1).astype(np.float64))
    return {"f1_weighted": weighted, "f1_macro": macro}


def roc_auc(y: np.ndarray, score: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Area under the ROC curve (ties count one half); NaN where only one class (or no row) is present."""
    w = _weights(len(y), weights)
    if not len(y):  # a subset without rows (say, no malignant or benign nodule among a manifest's few images)
        return np.full(w.shape[:-1], np.nan)
    order = np.argsort(score, kind="mergesort")
    s, pos = score[order], (y[order] > 0.5)
    wpos = np.where(pos, w[..., order], 0.0)
    wneg = np.where(~pos, w[..., order], 0.0)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    gpos = np.add.reduceat(wpos, starts, axis=-1)
    gneg = np.add.reduceat(wneg, starts, axis=-1)
    neg_below = np.cumsum(gneg, axis=-1) - gneg
    num = (gpos * (neg_below + 0.5 * gneg)).sum(axis=-1)
    den = gpos.sum(axis=-1) * gneg.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def average_precision(y: np.ndarray, score: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Average precision, sum over thresholds of (R_t - R_t-1) P_t with tied scores as one threshold
    (scikit-learn's average_precision_score); NaN without a positive."""
    w = _weights(len(y), weights)
    order = np.argsort(-score, kind="mergesort")
    s, pos = score[order], (y[order] > 0.5)
    wpos = np.where(pos, w[..., order], 0.0)
    wall = np.broadcast_to(w[..., order], wpos.shape)
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1] if len(s) else np.zeros(0, dtype=np.int64)
    tp = np.cumsum(wpos, axis=-1)[..., ends]
    seen = np.cumsum(wall, axis=-1)[..., ends]
    total = tp[..., -1:] if len(s) else np.zeros(w.shape[:-1] + (1,))
    precision = _safe_div(tp, seen)
    recall = _safe_div(tp, np.broadcast_to(total, tp.shape))
    gain = np.diff(recall, axis=-1, prepend=0.0)
    with np.errstate(invalid="ignore"):
        return np.where(total[..., 0] > 0, (gain * precision).sum(axis=-1), np.nan)


def mse(y, pred, weights=None):
    w = _weights(len(y), weights)
    return _safe_div(w @ (pred - y) ** 2, w.sum(axis=-1))


def mae(y, pred, weights=None):
    w = _weights(len(y), weights)
    return _safe_div(w @ np.abs(pred - y), w.sum(axis=-1))


#: Memory of one block of bootstrap counts: the resamples of a large data set are scored a block at a time
#: (the metrics make about 15 temporaries of a block's size).
BOOTSTRAP_BYTES = 8 << 20


def bootstrap_counts(n: int, resamples: int, seed: int, max_bytes: int = BOOTSTRAP_BYTES,
                     groups: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """Blocks (r, n) of the counts of each row in R resamples with replacement, at most `max_bytes` each; the
    blocks of one seed, stacked, are the same R resamples whatever the block size (one random stream).

    `groups` (n,) integer codes 0..G-1 (the patient of each row) resample whole groups: G draws of a group with
    replacement, every row of a group counted as often as its group was drawn (the cluster bootstrap), so rows
    that are not independent (several images of one patient) do not narrow the interval. With one row per group,
    in order, these are the plain resamples."""
    rng = np.random.default_rng(seed)
    per = max(1, max_bytes // (8 * max(n, 1)))
    units = n if groups is None else int(groups.max()) + 1 if len(groups) else 0
    for start in range(0, resamples, per):
        counts = rng.multinomial(units, np.full(units, 1.0 / max(units, 1)), size=min(per, resamples - start))
        yield (counts if groups is None else counts[:, groups]).astype(np.float64)
