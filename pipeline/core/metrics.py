"""Metrics, vectorised over bootstrap resamples.

Every function takes optional `weights`: shape (n,) for one weighted evaluation, (R, n) for R at once (a
bootstrap resample is a vector of counts), or `BlockCounts` (R resamples of blocks of rows, for large data).
They agree with scikit-learn's metrics with sample_weight (tests check this); zero divisions give 0 as
scikit-learn's zero_division=0, an undefined AUC gives NaN.

At scale the bootstrap resamples blocks (`block_bootstrap`): every metric that is a ratio of sums over rows
(accuracy, F1 from the confusion matrix, MSE, MAE) is scored from per-block sums, exactly as if the blocks'
rows had been resampled (R x blocks work instead of R x rows); AUROC and average precision, which rank rows,
take their first-order (delta-method) expansion in the rows' weights (for AUROC, DeLong's placement values),
summed per block. Blocks are whole patients when the rows have patients.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterator, Optional

import numpy as np


def sigmoid(z):
    """The logistic function of logits z (an array or a number), clipped to +-60 so that no logit overflows exp."""
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


class BlockCounts:
    """R bootstrap resamples of blocks of rows: `counts` (R, B) of each block, `block` (n,) each row's block.

    It stands where (R, n) weights would (`shape`, `w[..., rows]`, `w @ values`, `w.sum(axis=-1)`), computing
    `w @ values` as counts @ (per-block sums of values); any other use sees the (R, n) expansion."""

    ndim = 2

    def __init__(self, counts: np.ndarray, block: np.ndarray):
        self.counts, self.block = counts, np.asarray(block, dtype=np.int64)

    @property
    def shape(self):
        return self.counts.shape[0], len(self.block)

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis):
            raise IndexError("BlockCounts select rows only: w[..., rows]")
        return BlockCounts(self.counts, self.block[key[1]])

    def per_block(self, values: np.ndarray) -> np.ndarray:
        """(B,) or (B, k): the sums of the rows' values (n,) or (n, k) within each block."""
        values = np.asarray(values, dtype=np.float64)
        blocks = self.counts.shape[1]
        if values.ndim == 1:
            return np.bincount(self.block, weights=values, minlength=blocks)
        # a bincount per column: np.add.at over (n, k) is many times slower at a million rows
        return np.stack([np.bincount(self.block, weights=values[:, j], minlength=blocks)
                         for j in range(values.shape[1])], axis=1).reshape(blocks, values.shape[1])

    def __matmul__(self, values: np.ndarray) -> np.ndarray:
        return self.counts @ self.per_block(values)

    def sum(self, axis: int = -1) -> np.ndarray:
        if axis not in (-1, 1):
            raise ValueError("BlockCounts sum over rows only")
        return self.counts @ np.bincount(self.block, minlength=self.counts.shape[1]).astype(np.float64)

    def __array__(self, dtype=None, copy=None):
        return self.counts[:, self.block].astype(dtype or np.float64)


def _weights(n: int, weights):
    if weights is None:
        return np.ones(n)
    return weights if isinstance(weights, BlockCounts) else np.asarray(weights, dtype=np.float64)


def _linearised(value: float, influence: np.ndarray, weights: BlockCounts) -> np.ndarray:
    """The first-order expansion of a metric in the rows' weights around 1, at each resample: value +
    sum over rows (count - 1) * d metric / d weight; the derivatives sum to 0 (every metric here is
    unchanged by scaling all weights), so this is value + counts @ (per-block sums of the derivatives)."""
    if not np.isfinite(value):
        return np.full(weights.shape[0], np.nan)
    return value + weights @ influence


def _tie_groups(s: np.ndarray) -> np.ndarray:
    """Start of each run of equal values in sorted s."""
    return np.flatnonzero(np.r_[True, s[1:] != s[:-1]])


def auc_influence(y: np.ndarray, score: np.ndarray) -> tuple:
    """(AUROC, d AUROC / d weight of each row at unit weights): (V10 - AUC) / m for a positive, (V01 - AUC) / k
    for a negative, with DeLong's placement values V10 (share of negatives below, ties one half) and V01."""
    pos = y > 0.5
    m, k = int(pos.sum()), int((~pos).sum())
    if not m or not k:
        return float("nan"), np.zeros(len(y))
    order = np.argsort(score, kind="mergesort")
    s, p = score[order], pos[order]
    starts = _tie_groups(s)
    gpos = np.add.reduceat(p.astype(np.float64), starts)
    gneg = np.add.reduceat((~p).astype(np.float64), starts)
    size = np.diff(np.r_[starts, len(s)])
    below = np.cumsum(gneg) - 0.5 * gneg  # negatives scored below a group, its own ties counted one half
    v10 = np.repeat(below / k, size)  # a positive's placement among negatives
    v01 = np.repeat((m - np.cumsum(gpos) + 0.5 * gpos) / m, size)  # a negative's among positives
    auc = float((gpos * below).sum() / (m * k))
    influence = np.empty(len(y))
    influence[order] = np.where(p, (v10 - auc) / m, (v01 - auc) / k)
    return auc, influence


def ap_influence(y: np.ndarray, score: np.ndarray) -> tuple:
    """(average precision, d AP / d weight of each row at unit weights). AP = (1/M) sum over positives i of
    P_i = A_i / B_i (positives / rows scored >= s_i); a row q scored s_q is in A_i, B_i of every i with
    s_i <= s_q, so d AP / d w_q = ([q positive] (P_q - AP + S1_q) - S2_q) / M with S1_q = sum 1 / B_i and
    S2_q = sum P_i / B_i over the positives i with s_i <= s_q."""
    pos = y > 0.5
    m = int(pos.sum())
    if not m:
        return float("nan"), np.zeros(len(y))
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], pos[order]
    starts = _tie_groups(s)
    size = np.diff(np.r_[starts, len(s)])
    gpos = np.add.reduceat(p.astype(np.float64), starts)
    a, b = np.cumsum(gpos), np.cumsum(size).astype(np.float64)
    precision = a / b
    ap = float((gpos * precision).sum() / m)
    # groups are in descending score: "s_i <= s_q" is the group of q and every later one (a reversed cumsum)
    s1 = np.cumsum((gpos / b)[::-1])[::-1]
    s2 = np.cumsum((gpos * precision / b)[::-1])[::-1]
    influence = np.empty(len(y))
    rows_p, rows_s1, rows_s2 = np.repeat(precision, size), np.repeat(s1, size), np.repeat(s2, size)
    influence[order] = (np.where(p, rows_p - ap + rows_s1, 0.0) - rows_s2) / m
    return ap, influence


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """(C, C) or (R, C, C) confusion matrices: rows true class, columns predicted. Unweighted and block-resampled
    matrices are counted by bincount (a one-hot n x C^2 matrix times the weights was most of the summaries' time
    at a million rows); (R, n) weights still multiply the one-hot matrix (they exist up to a few thousand rows)."""
    cells = n_classes * n_classes
    cell = y.astype(np.int64) * n_classes + pred.astype(np.int64)
    if weights is None:
        flat = np.bincount(cell, minlength=cells).astype(np.float64)
    elif isinstance(weights, BlockCounts):
        blocks = weights.counts.shape[1]
        per_block = np.bincount(weights.block * cells + cell, minlength=blocks * cells).astype(np.float64)
        flat = weights.counts @ per_block.reshape(blocks, cells)
    else:
        w = np.asarray(weights, dtype=np.float64)
        onehot = np.zeros((len(y), cells))
        onehot[np.arange(len(y)), cell] = 1.0
        flat = w @ onehot
    return flat.reshape(*flat.shape[:-1], n_classes, n_classes)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def classification_metrics(y, pred, n_classes, weights=None) -> Dict[str, np.ndarray]:
    """Accuracy, and weighted (by support) and macro F1 over the classes present in the truth or the
    predictions, from one confusion matrix."""
    cm = confusion(y, pred, n_classes, weights)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    f1 = _safe_div(2 * tp, support + predicted)
    present = (support + predicted) > 0
    weighted = _safe_div((f1 * support).sum(axis=-1), support.sum(axis=-1))
    macro = _safe_div((f1 * present).sum(axis=-1), present.sum(axis=-1).astype(np.float64))
    return {"accuracy": _safe_div(np.trace(cm, axis1=-2, axis2=-1), cm.sum(axis=(-2, -1))),
            "f1_weighted": weighted, "f1_macro": macro}


def roc_auc(y: np.ndarray, score: np.ndarray, weights=None) -> np.ndarray:
    """Area under the ROC curve (ties count one half); NaN where only one class (or no row) is present."""
    w = _weights(len(y), weights)
    if isinstance(w, BlockCounts):
        return _linearised(*auc_influence(y, score), w)
    if not len(y):  # a subset without rows (say, no malignant or benign nodule among a manifest's few images)
        return np.full(w.shape[:-1], np.nan)
    order = np.argsort(score, kind="mergesort")
    s, pos = score[order], (y[order] > 0.5)
    wpos = np.where(pos, w[..., order], 0.0)
    wneg = np.where(~pos, w[..., order], 0.0)
    starts = _tie_groups(s)
    gpos = np.add.reduceat(wpos, starts, axis=-1)
    gneg = np.add.reduceat(wneg, starts, axis=-1)
    neg_below = np.cumsum(gneg, axis=-1) - gneg
    num = (gpos * (neg_below + 0.5 * gneg)).sum(axis=-1)
    den = gpos.sum(axis=-1) * gneg.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def average_precision(y: np.ndarray, score: np.ndarray, weights=None) -> np.ndarray:
    """Average precision, sum over thresholds of (R_t - R_t-1) P_t with tied scores as one threshold
    (scikit-learn's average_precision_score); NaN without a positive."""
    w = _weights(len(y), weights)
    if isinstance(w, BlockCounts):
        return _linearised(*ap_influence(y, score), w)
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


#: Largest set of bootstrap counts drawn once and kept for the run (2,000 rows x 1,000 resamples: 16 MB; six
#: sets at most): every task and model scored on the same entries resamples them the same way, and drawing them
#: (numpy's multinomial, one binomial per row and resample) cost more than scoring them.
BOOTSTRAP_KEEP_BYTES = 16 << 20


def bootstrap_counts(n: int, resamples: int, seed: int, max_bytes: int = BOOTSTRAP_BYTES,
                     groups: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """Blocks (r, n) of the counts of each row in R resamples with replacement, at most `max_bytes` each; the
    blocks of one seed, stacked, are the same R resamples whatever the block size (one random stream). Up to
    BOOTSTRAP_KEEP_BYTES they are drawn once per (n, R, seed, groups) and kept (read-only).

    `groups` (n,) integer codes 0..G-1 (the patient of each row) resample whole groups: G draws of a group with
    replacement, every row of a group counted as often as its group was drawn (the cluster bootstrap), so rows
    that are not independent (several images of one patient) do not narrow the interval. With one row per group,
    in order, these are the plain resamples."""
    per = max(1, max_bytes // (8 * max(n, 1)))
    if 0 < resamples and resamples * n * 8 <= BOOTSTRAP_KEEP_BYTES:  # (no resamples: nothing to keep or yield)
        kept = _kept_counts(n, resamples, seed, None if groups is None else np.asarray(groups, np.int64).tobytes())
        for start in range(0, resamples, per):
            yield kept[start:start + per]
        return
    yield from _draw_counts(n, resamples, seed, per, groups)


def _draw_counts(n: int, resamples: int, seed: int, per: int, groups: Optional[np.ndarray]) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    units = n if groups is None else int(groups.max()) + 1 if len(groups) else 0
    for start in range(0, resamples, per):
        counts = rng.multinomial(units, np.full(units, 1.0 / max(units, 1)), size=min(per, resamples - start))
        yield (counts if groups is None else counts[:, groups]).astype(np.float64)


@functools.lru_cache(maxsize=6)
def _kept_counts(n: int, resamples: int, seed: int, groups: Optional[bytes]) -> np.ndarray:
    """The (R, n) counts of bootstrap_counts' stream, drawn once per run and read-only (the block bootstrap's R x
    B block counts too: at most 16 MB for 1,000 x 2,000)."""
    codes = None if groups is None else np.frombuffer(groups, dtype=np.int64)
    counts = np.concatenate(list(_draw_counts(n, resamples, seed, max(1, resamples), codes)))
    counts.flags.writeable = False
    return counts


#: Blocks the bootstrap deals its units into at scale (block_bootstrap): the variance of a sum is estimated
#: from 2,000 block sums to about 3% (relative standard error sqrt(2 / B)).
BOOTSTRAP_BLOCKS = 2000


def block_bootstrap(units: np.ndarray, resamples: int, seed: int, blocks: int = BOOTSTRAP_BLOCKS
                    ) -> Iterator[BlockCounts]:
    """R resamples, in blocks of resamples, of blocks of rows: the units (`units` (n,) integer codes 0..U-1, a
    row's patient or the row itself) dealt at random into min(U, blocks) blocks of equal unit counts, the blocks
    drawn with replacement (bootstrap_counts over blocks). With U <= blocks it is the cluster bootstrap."""
    n_units = int(units.max()) + 1 if len(units) else 0
    count = max(1, min(n_units, blocks))
    deal = np.random.default_rng([seed, 1]).permutation(n_units) % count
    yield BlockCounts(_kept_counts(count, resamples, seed, None), deal[units])  # every model, task and bin: the same
