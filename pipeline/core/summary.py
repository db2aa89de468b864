"""The one summariser: metrics per task and per nodule-size bin (the pooled out-of-fold estimate with its bootstrap
CI, and mean +- std over folds), and the linear baselines beside every head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline import runtime
from pipeline.config import EvalConfig
from pipeline.core.metrics import block_bootstrap, bootstrap_counts
from pipeline.core.splits import SplitName
from pipeline.core.tasks import TaskSpec, labelled
from pipeline.core.train import Split
from pipeline.errors import ConfigError


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


class PerSplit:
    """Predictions that are one row per split (the majority baseline's), expanded only where indexed: at 1M rows the
    majority baseline's out-of-fold predictions were 190 MiB of repeated rows."""

    def __init__(self, values: np.ndarray, split: np.ndarray):
        self.values, self.split = values, split  # (splits, ...) and each entry's split

    def __getitem__(self, index) -> np.ndarray:
        return self.values[self.split[index]]

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shape(self) -> tuple:
        return (len(self.split),) + self.values.shape[1:]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.values[self.split], dtype=dtype)


def _join(parts: List[np.ndarray], split: np.ndarray):
    """One task's per-split parts in out-of-fold order: kept as PerSplit where every part is one row broadcast
    (a stride-0 view: np.broadcast_to), else concatenated."""
    if parts and all(p.ndim and len(p) and p.strides[0] == 0 for p in parts):
        return PerSplit(np.stack([p[0] for p in parts]), split)
    return np.concatenate(parts)


@dataclass
class OutOfFold:
    """Out-of-fold predictions of one model: one entry per (split, test row)."""

    rows: np.ndarray
    split: np.ndarray  # index into the splits
    preds: Dict[str, np.ndarray]  # or PerSplit

    @classmethod
    def collect(cls, splits: Sequence[Split], per_split: Sequence[Dict[str, np.ndarray]]) -> "OutOfFold":
        """per_split[s][task]: predictions indexed by row number (an array of every row, or RowValues); keep each
        split's test rows (one task's copies at a time)."""
        return cls._of(splits, per_split[0].keys(), lambda t: [p[t][s.test] for s, p in zip(splits, per_split)])

    @classmethod
    def of_test_rows(cls, splits: Sequence[Split], per_split: Sequence[Dict[str, np.ndarray]]) -> "OutOfFold":
        """per_split[s][task]: predictions for split s's test rows, in their order. Consumes `per_split`: each task's
        per-split arrays are dropped once joined, so at 1M rows a baseline's predictions are not held twice."""
        return cls._of(splits, list(per_split[0].keys()), lambda t: [p.pop(t) for p in per_split])

    @classmethod
    def _of(cls, splits: Sequence[Split], tasks, parts: Callable[[str], List[np.ndarray]]) -> "OutOfFold":
        rows = np.concatenate([s.test for s in splits])
        split = np.concatenate([np.full(len(s.test), i) for i, s in enumerate(splits)])
        return cls(rows, split, {t: _join(parts(t), split) for t in tasks})


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
    rows, split, pooled, keep = oof.rows, oof.split, first_seed_mask(oof.split, names), None
    if subset is not None:  # a size bin: its entries, taken once
        keep = np.isin(rows, subset)
        rows, split, pooled = rows[keep], split[keep], pooled[keep]
    out: Dict[str, Dict[str, Dict[str, object]]] = {}
    for task in tasks:
        # (a PerSplit stays one row per split until indexed)
        y_all, p_all = targets[task.name][rows], oof.preds[task.name] if keep is None else oof.preds[task.name][keep]
        norm = norms.get(task.name)
        norm_all = None if norm is None else norm[rows]

        metrics = summarise_metrics(
            lambda sel, w, task=task, y_all=y_all, p_all=p_all, norm_all=norm_all:
                task_metrics(task, y_all[sel], p_all[sel], None if norm_all is None else norm_all[sel], w),
            split, len(names), pooled, bootstrap, seed, _label_counts(task, y_all),
            None if groups is None else groups[rows], exact_rows)
        if metrics:
            out[task.name] = metrics
    return out


def _label_counts(task: TaskSpec, y: np.ndarray) -> Callable[[np.ndarray, str], int]:
    """summarise_metrics' count(selection, metric) of a task: its label masks made once per selection, not once
    per metric (at a million rows each was a pass over the labels)."""
    last: Dict[str, object] = {}

    def count(sel: np.ndarray, metric: str) -> int:
        if last.get("sel") is not sel:
            ys = y[sel]
            last.update(sel=sel, rows=task.impl.metric_rows(task, ys), labelled=int(labelled(task, ys).sum()))
        rows: Dict[str, np.ndarray] = last["rows"]  # type: ignore[assignment]
        return int(rows[metric].sum()) if metric in rows else int(last["labelled"])  # type: ignore[arg-type]
    return count


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
    """Per split, predictions for its test rows: 'majority' (class prior / mean: one row, broadcast to the test rows
    as a read-only view, which OutOfFold keeps as one row per split) or 'linear' (logistic / ridge on
    the split's standardised features: pipeline.core.linear), fitted on the split's training rows (inner
    validation rows included); with a `budget` (eval.baseline_rows), the linear fit on a seeded subsample of
    that many of them, so that its cost stops growing with the data. `prep`: the pooled head's model.Prepared
    (features held once, per-split statistics); `tick(1)` after each split (progress)."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from pipeline.core.linear import linear_fit

    def fitting_rows(s: int, split: Split) -> np.ndarray:
        fit = np.concatenate([split.train, split.val])
        if which == "linear" and 0 < budget < len(fit):
            fit = np.sort(np.random.default_rng([seed, s]).choice(fit, budget, replace=False))
        return fit

    def answer(task: TaskSpec, fit: np.ndarray, linear, n: int):
        y = targets[task.name][fit]
        m = labelled(task, y)
        return task.impl.baseline(which, y[m], linear, m, n, task, c, alpha)

    if which == "majority":  # the same for every row (Kind.baseline): one row, broadcast
        results = []
        for s, split in enumerate(splits):
            fit, preds = fitting_rows(s, split), {}
            for task in tasks:
                one = answer(task, fit, None, 1).finish([])
                preds[task.name] = np.broadcast_to(one, (len(split.test),) + one.shape[1:])
            results.append(preds)
            tick(1)
        return results

    # A split's linear model (its row-space coordinates, pipeline.core.linear), then each task's fits on it, then
    # every fit scored in one pass over its test rows: jobs on one thread each, the BLAS's threads shared out among
    # them (much of a fit is single-threaded: the factorisation's pivoting, scikit-learn's Newton-CG steps, the
    # scoring's gathers), tasks rather than splits so that the last split does not run on one thread alone. A job
    # waits only for jobs queued before it (the queue is first in, first out: they have started), so none
    # deadlocks; the splits' models are queued `ahead` splits early, so that the threads seldom wait for one: one
    # split early on two threads, every split's model at once on many (about one model held per thread).
    workers = max(1, min(len(splits) * len(tasks), runtime.threads()))
    ahead = max(1, workers - 1)
    fits = [fitting_rows(s, split) for s, split in enumerate(splits)]

    def model(s: int):
        return pool.submit(linear_fit, prep, s, fits[s], splits[s].test)

    with threadpool_limits(max(1, runtime.threads() // workers)), ThreadPoolExecutor(workers) as pool:
        models = [model(s) for s in range(min(ahead, len(splits)))]
        finished = []
        for s, split in enumerate(splits):
            if s + ahead < len(splits):
                models.append(model(s + ahead))
            answers = [pool.submit(lambda t=task, s=s: answer(t, fits[s], models[s].result(), len(splits[s].test)))
                       for task in tasks]
            finished.append(pool.submit(_score_answers, tasks, answers, models[s]))
        results = []
        for s, future in enumerate(finished):  # in split order
            results.append(future.result())
            models[s] = None  # its coordinates and standardised rows (0.1 GiB at 2,000 x 4,768) go now
            tick(1)
    return results


def _score_answers(tasks: Sequence[TaskSpec], answers: Sequence, model) -> Dict[str, np.ndarray]:
    """Each task's predictions of a split's test rows from its baseline (`answers`: futures of Kind.baseline's
    Baseline): every task's fits scored in one pass over the rows (linear.scores)."""
    done = [a.result() for a in answers]
    scores = iter(model.result().scores([f for answer in done for f in answer.fits]))
    return {task.name: answer.finish([next(scores) for _ in answer.fits]) for task, answer in zip(tasks, done)}
