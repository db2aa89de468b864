"""The evaluation protocol: splits that never leak, decoding of head outputs, metrics per task and per
nodule-size bin (mean +- std over folds, bootstrap CI on pooled out-of-fold predictions), and baselines."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

from .config import EvalConfig
from .errors import ConfigError
from .metrics import accuracy, bootstrap_counts, f1_scores, mae, mse, roc_auc
from .tasks import TaskSpec, labelled
from .train import Layout, Prepared, Split, standardiser

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# splits


@dataclass(frozen=True)
class SplitName:
    seed: int
    fold: int


def stratify_labels(table: pd.DataFrame, column: str, rows: np.ndarray) -> np.ndarray:
    if column not in table:
        raise ConfigError(f"eval.stratify: no column '{column}' in the labels")
    return np.array(["missing" if v is None or v != v else str(v) for v in table[column].to_numpy()[rows]])


def stratified_subset(rows: np.ndarray, labels: np.ndarray, fraction: float,
                      seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Split `rows` into (rest, part) with `part` about `fraction` of them, stratified when possible."""
    n_part = max(1, int(round(fraction * len(rows))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            splitter = StratifiedShuffleSplit(1, test_size=n_part, random_state=seed)
            rest, part = next(splitter.split(rows, labels))
        except ValueError:  # a class too small to stratify: plain shuffle
            order = np.random.default_rng(seed).permutation(len(rows))
            rest, part = order[n_part:], order[:n_part]
    return np.sort(rows[rest]), np.sort(rows[part])


def make_splits(table: pd.DataFrame, rows: np.ndarray, ecfg: EvalConfig, val_fraction: float = 0.0
                ) -> Tuple[List[Split], List[SplitName]]:
    """k-fold (stratified, repeated over seeds) or hold-out splits of `rows`; optional inner validation.

    Test rows never enter training or the inner validation; each split's standardisation uses its
    training rows alone (train.prepare).
    """
    labels = stratify_labels(table, ecfg.stratify, rows)
    splits, names = [], []
    for seed in ecfg.seeds:
        if ecfg.protocol == "kfold":
            if not 2 <= ecfg.folds <= len(rows):
                raise ConfigError(f"eval.folds {ecfg.folds} must be between 2 and the number of images {len(rows)}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small classes: sklearn warns, the folds are still valid
                folds = list(StratifiedKFold(ecfg.folds, shuffle=True, random_state=seed).split(rows, labels))
        elif ecfg.protocol == "holdout":
            if not 0 < ecfg.holdout_fraction < 1:
                raise ConfigError(f"eval.holdout_fraction {ecfg.holdout_fraction} must be in (0, 1)")
            train, test = stratified_subset(np.arange(len(rows)), labels, ecfg.holdout_fraction, seed)
            folds = [(train, test)]
        else:
            raise ConfigError(f"eval.protocol '{ecfg.protocol}' must be kfold or holdout")
        for fold, (train, test) in enumerate(folds):
            train_rows, test_rows = np.sort(rows[train]), np.sort(rows[test])
            val_rows = np.zeros(0, dtype=np.int64)
            if val_fraction > 0:
                inner_labels = stratify_labels(table, ecfg.stratify, train_rows)
                train_rows, val_rows = stratified_subset(train_rows, inner_labels, val_fraction, seed * 7919 + fold)
            splits.append(Split(train=train_rows, test=test_rows, val=val_rows, key=seed * 1000 + fold))
            names.append(SplitName(seed, fold))
    return splits, names


# --------------------------------------------------------------------------------------------------
# decoding outputs


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def decode(outputs: np.ndarray, layout: Layout, reg_mean: np.ndarray, reg_std: np.ndarray) -> Dict[str, np.ndarray]:
    """Raw head outputs (n, O) -> per task: class probabilities (n, C), P(positive) (n,), or value (n,)."""
    out: Dict[str, np.ndarray] = {}
    for task, sl in zip(layout.tasks, layout.slices):
        z = outputs[:, sl]
        if task.kind == "multiclass":
            out[task.name] = softmax(z)
        elif task.kind == "binary":
            out[task.name] = 1.0 / (1.0 + np.exp(-z[:, 0]))
        else:
            r = layout.regression.index(task.name)
            out[task.name] = z[:, 0] * reg_std[r] + reg_mean[r]
    return out


# --------------------------------------------------------------------------------------------------
# metrics


def task_metrics(task: TaskSpec, y: np.ndarray, pred: np.ndarray, norm: Optional[np.ndarray] = None,
                 weights: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Metrics of one task on labelled rows only (weights (n,) or (R, n) for bootstrap resamples)."""
    mask = labelled(task, y)
    w = None if weights is None else weights[..., mask]
    y, pred = y[mask], pred[mask]
    if len(y) == 0:
        return {}
    if task.kind == "multiclass":
        c = len(task.classes)
        hard = pred.argmax(axis=1)
        res = {"accuracy": accuracy(y, hard, c, w), **f1_scores(y, hard, c, w)}
        if task.name == "state" and {"malignant", "benign"} <= set(task.classes):
            mal, ben = task.classes.index("malignant"), task.classes.index("benign")
            nodule = np.isin(y, [mal, ben])
            p = pred[nodule][:, mal] / np.clip(pred[nodule][:, mal] + pred[nodule][:, ben], 1e-12, None)
            res["auc_malignancy"] = roc_auc((y[nodule] == mal).astype(float), p,
                                            None if w is None else w[..., nodule])
        return res
    if task.kind == "binary":
        hard = (pred > 0.5).astype(np.int64)
        truth = y.astype(np.int64)
        return {"accuracy": accuracy(truth, hard, 2, w), **f1_scores(truth, hard, 2, w), "auc": roc_auc(y, pred, w)}
    res = {"mse": mse(y, pred, w), "mae": mae(y, pred, w)}
    if norm is not None:
        nrm = norm[mask]
        res.update(mse_norm=mse(y / nrm, pred / nrm, w), mae_norm=mae(y / nrm, pred / nrm, w))
    return res


def regression_norms(table: pd.DataFrame, tasks: Sequence[TaskSpec], size_norm: str) -> Dict[str, np.ndarray]:
    """Per row, what each regression error is divided by for the paper's normalised Table 2 columns.

    px tasks: their coordinate grid (x / 2048). size: 'grid' divides mm by the grid too, which is what
    reproduces the paper's own figures (its size MAE 1.40 mm is its table's 0.00085 ~ 1.74 / 2048);
    'range' divides by the data's size range instead.
    """
    norms = {}
    for t in tasks:
        if t.kind != "regression":
            continue
        if t.grid_column:
            norms[t.name] = table[t.grid_column].to_numpy(dtype=float)
        elif size_norm == "grid":
            norms[t.name] = table["grid_w"].to_numpy(dtype=float)
        elif size_norm == "range":
            values = table[t.column].to_numpy(dtype=float)
            span = np.nanmax(values) - np.nanmin(values) if np.isfinite(values).any() else 1.0
            norms[t.name] = np.full(len(table), span if span > 0 else 1.0)
        else:
            raise ConfigError(f"eval.size_norm '{size_norm}' must be grid or range")
    return norms


@dataclass
class OutOfFold:
    """Out-of-fold predictions of one model: one entry per (split, test row)."""

    rows: np.ndarray
    split: np.ndarray  # index into the splits
    preds: Dict[str, np.ndarray]

    @classmethod
    def collect(cls, splits: Sequence[Split], per_split: Sequence[Dict[str, np.ndarray]]) -> "OutOfFold":
        """per_split[s][task]: predictions for every row; keep each split's test rows."""
        rows = np.concatenate([s.test for s in splits])
        split = np.concatenate([np.full(len(s.test), i) for i, s in enumerate(splits)])
        tasks = per_split[0].keys()
        preds = {t: np.concatenate([p[t][s.test] for s, p in zip(splits, per_split)]) for t in tasks}
        return cls(rows, split, preds)


def summarise(oof: OutOfFold, tasks: Sequence[TaskSpec], targets: Dict[str, np.ndarray],
              norms: Dict[str, np.ndarray], names: Sequence[SplitName], bootstrap: int, seed: int,
              subset: Optional[np.ndarray] = None) -> Dict[str, Dict[str, Dict[str, object]]]:
    """task -> metric -> {mean, std, folds, pooled, ci95}: mean +- std over splits, pooled on the first
    seed's out-of-fold predictions with a percentile bootstrap CI. `subset` keeps only some rows."""
    keep = np.ones(len(oof.rows), dtype=bool) if subset is None else np.isin(oof.rows, subset)
    first_seed = names[0].seed if names else 0
    pooled = keep & np.array([names[s].seed == first_seed for s in oof.split])
    counts = bootstrap_counts(int(pooled.sum()), bootstrap, seed) if bootstrap and pooled.any() else None
    out: Dict[str, Dict[str, Dict[str, object]]] = {}
    for task in tasks:
        y_all, p_all = targets[task.name][oof.rows], oof.preds[task.name]
        norm = norms.get(task.name)
        norm_all = None if norm is None else norm[oof.rows]

        def at(sel):
            return task_metrics(task, y_all[sel], p_all[sel], None if norm_all is None else norm_all[sel])

        per_split = [at(keep & (oof.split == s)) for s in range(len(names))]
        whole = at(pooled)
        boot = {}
        if counts is not None:
            boot = task_metrics(task, y_all[pooled], p_all[pooled],
                                None if norm_all is None else norm_all[pooled], weights=counts)
        metrics: Dict[str, Dict[str, object]] = {}
        for name, value in whole.items():
            fold_values = np.array([float(m.get(name, np.nan)) for m in per_split], dtype=float)
            finite = fold_values[np.isfinite(fold_values)]
            entry: Dict[str, object] = {
                "mean": float(finite.mean()) if len(finite) else float("nan"),
                "std": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
                "folds": fold_values.tolist(), "pooled": float(value), "n": int(labelled(task, y_all[pooled]).sum()),
            }
            if name in boot:
                dist = np.asarray(boot[name], dtype=float)
                dist = dist[np.isfinite(dist)]
                if len(dist):
                    entry["ci95"] = [float(np.percentile(dist, 2.5)), float(np.percentile(dist, 97.5))]
            metrics[name] = entry
        if metrics:
            out[task.name] = metrics
    return out


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


#: Newton-CG converges in few exact steps on the <= n_train row-space coordinates (about 4x faster than lbfgs).
SOLVER = "newton-cg"


def _row_space(x_train: np.ndarray, x_other: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Coordinates in the row space of the training matrix.

    An L2-penalised linear model's optimal weights lie in that space (representer theorem), so fitting
    on these <= n_train coordinates is the same model as fitting on all D features, much faster when D >> n.
    The orthonormal basis V = X^T U S^-1 comes from the n x n Gram matrix X X^T = U S^2 U^T (an eigenproblem
    of size n instead of an SVD of the n x D matrix).
    """
    eigval, eigvec = np.linalg.eigh(x_train @ x_train.T)
    keep = eigval > eigval.max() * 1e-10  # drop the null space (standardised columns make rank <= n - 1)
    basis = x_train.T @ (eigvec[:, keep] / np.sqrt(eigval[keep]))
    return x_train @ basis, x_other @ basis


def baseline_predictions(prep: Prepared, targets: Dict[str, np.ndarray], kind: str, c: float = 1.0,
                         alpha: float = 1.0) -> List[Dict[str, np.ndarray]]:
    """Per split, predictions for every row: 'majority' (class prior / mean) or 'linear' (logistic / ridge)."""
    tasks = prep.layout.tasks
    results = []
    for s, split in enumerate(prep.splits):
        train = np.concatenate([split.train, split.val])
        x = prep.x[s].numpy().astype(np.float64)
        if kind == "linear":
            z_train, z_all = _row_space(x[train], x)
        preds: Dict[str, np.ndarray] = {}
        for task in tasks:
            y = targets[task.name][train]
            m = labelled(task, y)
            n = len(x)
            if task.kind == "multiclass":
                k = len(task.classes)
                counts = np.bincount(y[m], minlength=k).astype(float)
                prior = counts / max(counts.sum(), 1)
                if kind == "majority" or (counts > 0).sum() < 2:
                    p = np.zeros(k)
                    p[np.argmax(counts)] = 1.0
                    preds[task.name] = np.tile(p if kind == "majority" else prior, (n, 1))
                else:
                    model = LogisticRegression(C=c, solver=SOLVER, max_iter=2000).fit(z_train[m], y[m])
                    proba = np.zeros((n, k))
                    proba[:, model.classes_] = model.predict_proba(z_all)
                    preds[task.name] = proba
            elif task.kind == "binary":
                yb = y[m]
                if kind == "majority" or len(np.unique(yb)) < 2:
                    preds[task.name] = np.full(n, float(yb.mean() > 0.5) if kind == "majority" else yb.mean())
                else:
                    model = LogisticRegression(C=c, solver=SOLVER, max_iter=2000).fit(z_train[m], yb.astype(int))
                    preds[task.name] = model.predict_proba(z_all)[:, 1]
            else:
                if kind == "majority" or m.sum() < 2:
                    preds[task.name] = np.full(n, np.nanmean(y) if m.any() else 0.0)
                else:
                    mean, std = standardiser(y[m][:, None], np.arange(m.sum()))
                    model = Ridge(alpha=alpha).fit(z_train[m], (y[m] - mean[0]) / std[0])
                    preds[task.name] = model.predict(z_all) * std[0] + mean[0]
        results.append(preds)
    return results
