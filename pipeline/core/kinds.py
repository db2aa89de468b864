"""Task kinds: one object per kind owns everything that differs between kinds (pipeline.core.tasks): encoding
targets, masking missing labels, the loss, decoding the head's outputs, scoring (with each metric's direction) and
the baselines. Each is registered in pipeline.plugins.TASK_KINDS; a new kind is one class (here, or in an installed
package with a resmtnet.task_kinds entry point).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pipeline.core.linear import probabilities
from pipeline.core.metrics import average_precision, classification_metrics, mae, mse, roc_auc, sigmoid
from pipeline.core.tasks import (MISSING, MULTILABEL_SEPARATOR, NONE_CLASS, TaskSpec, class_name, is_missing,
                                 missing_mask, per_distinct)
from pipeline.errors import ConfigError
from pipeline.plugins import TASK_KINDS

if TYPE_CHECKING:  # torch is imported by the methods that train, not by code that only reads labels
    import torch


class Baseline(NamedTuple):
    """A task's baseline on one split: the linear fits it needs scored (pipeline.core.linear.Fitted; none for a
    constant) and how their scores, in that order, become its predictions. The summariser scores every task's
    fits of a split in one pass over the rows (`linear.scores`)."""

    fits: Sequence
    finish: Callable[[List[np.ndarray]], np.ndarray]

    @classmethod
    def constant(cls, values: np.ndarray) -> "Baseline":
        return cls([], lambda scores: values)


class Kind:
    """What a kind of task does; subclasses fill in each step. Targets are float arrays (NaN or -1 missing)."""

    name = ""
    #: metric -> direction: +1 where higher is better, -1 for errors (sweeps rank with it).
    metrics: Dict[str, int] = {}
    #: whether a confusion matrix of its predictions means something (train-heads writes one per such task)
    confusion = True
    #: metrics reported per class as '<prefix><class>' (the report shows them in a table of their own)
    per_class: Tuple[str, ...] = ()
    #: a value in the label column's own units (predict names its answer after the column: size -> size_mm),
    #: whose errors are also reported normalised (eval: regression_norms)
    measures = False

    def n_outputs(self, task: TaskSpec) -> int:
        return 1

    def directions(self, task: TaskSpec) -> Dict[str, int]:
        """Every metric this task reports, with its direction."""
        out = dict(self.metrics)
        if task.pair_auc:
            out[task.pair_auc[0]] = 1
        return out

    def metric_rows(self, task: TaskSpec, target: np.ndarray) -> Dict[str, np.ndarray]:
        """Metrics computed on fewer rows than the task's labelled ones, with those rows (a mask): each metric's
        `n` counts them."""
        if not task.pair_auc or not set(task.pair_auc[1:]) <= set(task.classes):
            return {}
        pair = [task.classes.index(task.pair_auc[1]), task.classes.index(task.pair_auc[2])]
        return {task.pair_auc[0]: np.isin(target, pair)}

    def scores(self, task: TaskSpec, y: np.ndarray, pred: np.ndarray) -> Dict[str, tuple]:
        """What ROC and precision-recall curves are drawn of: curve label -> (truth 0/1, score, its AUROC metric,
        its AP metric or None), labelled rows only; {} for a kind without a positive class."""
        return {}

    def values(self, task: TaskSpec, table: pd.DataFrame):
        """The label values the task encodes from a table (its column)."""
        if task.column not in table:
            raise ConfigError(f"task '{task.name}' needs the label column '{task.column}', which the data lacks")
        return table[task.column]

    def encode(self, task: TaskSpec, values: pd.Series, presence: Optional[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def labelled(self, target: np.ndarray) -> np.ndarray:
        return ~np.isnan(target)

    def scale(self, target: np.ndarray, rows: np.ndarray) -> Tuple[float, ...]:
        """(mean, std, ...) the loss sees the target in, from training rows only, and whatever else decode
        needs of them; classes are not scaled."""
        return 0.0, 1.0

    def loss(self, logits: "torch.Tensor", target: "torch.Tensor", smoothing: "torch.Tensor"
             ) -> Tuple["torch.Tensor", "torch.Tensor"]:
        """Per-row loss and label mask (M, B) from logits (M, B, O) and scaled targets (M, B)."""
        raise NotImplementedError

    def decode(self, z: np.ndarray, *scale: float) -> np.ndarray:
        """Raw outputs (n, O) and the scale -> predictions: class probabilities (n, C), P(positive) (n,) or
        value (n,)."""
        raise NotImplementedError

    def flags(self, task: TaskSpec, z: np.ndarray, *scale: float) -> Dict[str, np.ndarray]:
        """Extra per-row columns about the decoding (regression: `<task>_clipped`)."""
        return {}

    def evaluate(self, task: TaskSpec, y: np.ndarray, pred: np.ndarray, norm: Optional[np.ndarray],
                 weights: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
        """Metrics on labelled rows (already selected); weights (n,) or (R, n) for bootstrap resamples."""
        raise NotImplementedError

    def baseline(self, which: str, y: np.ndarray, linear, mask: np.ndarray, n: int, task: TaskSpec,
                 c: float, alpha: float) -> Baseline:
        """'majority' (prior / mean: the same for every row, so the summariser asks for n = 1) or 'linear'
        (logistic / ridge, fitted by `linear`, a pipeline.core.linear model, on its fitting rows where `mask`,
        labels `y`): predictions for the n rows the model scores (a split's test rows), as a Baseline."""
        raise NotImplementedError

    def columns(self, task: TaskSpec, y: Optional[np.ndarray], pred: np.ndarray) -> Dict[str, object]:
        """Output columns for a table of predictions (`y` None: no truth, as in predict)."""
        raise NotImplementedError


def _class_codes(task: TaskSpec, values: pd.Series, missing: float, presence: Optional[np.ndarray]) -> np.ndarray:
    """Class index of each value (`missing` where there is none; the 'none' class for non-nodule images when
    the task has it); a value outside the task's classes is an error."""
    index = {c: float(i) for i, c in enumerate(task.classes)}

    def code(value) -> float:
        if is_missing(value):
            return np.nan
        key = class_name(value)
        if key not in index:
            raise ConfigError(f"task '{task.name}': label '{key}' is not one of its classes {', '.join(task.classes)}")
        return index[key]

    codes = per_distinct(values, code, float)
    absent = np.isnan(codes)
    codes[absent] = missing
    if NONE_CLASS in index and presence is not None:
        codes[absent & (np.asarray(presence) == 0)] = index[NONE_CLASS]
    return codes


class Multiclass(Kind):
    name = "multiclass"
    metrics = {"accuracy": 1, "f1_weighted": 1, "f1_macro": 1}

    def n_outputs(self, task: TaskSpec) -> int:
        return len(task.classes)

    def encode(self, task, values, presence):
        return _class_codes(task, values, MISSING, presence)

    def labelled(self, target):
        return target >= 0

    def loss(self, logits, target, smoothing):
        import torch.nn.functional as F

        mask = target >= 0
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, target.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
        eps = smoothing.view(-1, 1)
        return (1 - eps) * nll - eps * logp.mean(dim=-1), mask  # = cross_entropy(label_smoothing=eps)

    def decode(self, z, *scale):
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def evaluate(self, task, y, pred, norm, weights):
        c = len(task.classes)
        truth, hard = y.astype(np.int64), pred.argmax(axis=1)
        res = classification_metrics(truth, hard, c, weights)
        if task.pair_auc and set(task.pair_auc[1:]) <= set(task.classes):
            pos, neg = task.classes.index(task.pair_auc[1]), task.classes.index(task.pair_auc[2])
            pair = np.isin(truth, [pos, neg])
            p = pred[pair][:, pos] / np.clip(pred[pair][:, pos] + pred[pair][:, neg], 1e-12, None)
            res[task.pair_auc[0]] = roc_auc((truth[pair] == pos).astype(float), p,
                                            None if weights is None else weights[..., pair])
        return res

    def baseline(self, which, y, linear, mask, n, task, c, alpha):
        k = len(task.classes)
        counts = np.bincount(y.astype(np.int64), minlength=k).astype(float)
        if which == "majority" or (counts > 0).sum() < 2:
            p = np.zeros(k)
            p[np.argmax(counts)] = 1.0
            return Baseline.constant(np.tile(p if which == "majority" else counts / max(counts.sum(), 1), (n, 1)))
        classes, fit = linear.logistic(mask, y.astype(np.int64), c)

        def finish(scores):
            proba = np.zeros((n, k))
            proba[:, classes] = probabilities(scores[0])
            return proba
        return Baseline([fit], finish)

    def columns(self, task, y, pred):
        out: Dict[str, object] = {}
        if y is not None:
            names = np.asarray(task.classes + ("",), dtype=object)  # -1 (missing) -> ""
            out[f"{task.name}_true"] = names[np.where(y >= 0, y, -1).astype(np.int64)]
        out[f"{task.name}_pred"] = np.asarray(task.classes, dtype=object)[pred.argmax(axis=1)]
        for c, name in enumerate(task.classes):
            out[f"{task.name}_p_{name}"] = np.round(pred[:, c], 6)
        return out


class Binary(Kind):
    name = "binary"
    metrics = {"accuracy": 1, "f1_weighted": 1, "f1_macro": 1, "auc": 1}

    def encode(self, task, values, presence):
        if task.classes:
            return _class_codes(task, values, np.nan, None)
        out = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, copy=True)
        bad = ~np.isnan(out) & ~np.isin(out, [0.0, 1.0])
        if bad.any():
            raise ConfigError(f"task '{task.name}': binary labels must be 0 or 1, found {out[bad][0]:g}")
        return out

    def loss(self, logits, target, smoothing):
        import torch
        import torch.nn.functional as F

        mask = ~torch.isnan(target)
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), torch.nan_to_num(target),
                                                  reduction="none"), mask

    def decode(self, z, *scale):
        return sigmoid(z[:, 0])

    def evaluate(self, task, y, pred, norm, weights):
        truth, hard = y.astype(np.int64), (pred > 0.5).astype(np.int64)
        return {**classification_metrics(truth, hard, 2, weights),
                "auc": roc_auc(y, pred, weights)}

    def scores(self, task, y, pred):
        known = ~np.isnan(y)
        return {task.name: (y[known], pred[known], "auc", None)}

    def baseline(self, which, y, linear, mask, n, task, c, alpha):
        if which == "majority" or len(np.unique(y)) < 2:
            return Baseline.constant(np.full(n, float(y.mean() > 0.5) if which == "majority" else y.mean()))
        return Baseline([linear.logistic(mask, y.astype(int), c)[1]], lambda scores: probabilities(scores[0])[:, 1])

    def columns(self, task, y, pred):
        out: Dict[str, object] = {}
        if y is not None:
            out[f"{task.name}_true"] = [task.classes[int(v)] if task.classes and v == v else v for v in y] \
                if task.classes else y
        if task.classes:
            out[f"{task.name}_pred"] = np.asarray(task.classes, dtype=object)[(pred > 0.5).astype(np.int64)]
            out[f"{task.name}_p_{task.classes[1]}"] = np.round(pred, 6)
        else:
            out[f"{task.name}_prob"] = np.round(pred, 6)
        return out


class Regression(Kind):
    name = "regression"
    metrics = {"mse": -1, "mae": -1, "rmse": -1, "mse_norm": -1, "mae_norm": -1}
    confusion = False
    measures = True

    def encode(self, task, values, presence):
        out = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, copy=True)
        text = ~pd.isna(values.to_numpy()) & np.isnan(out)
        if text.any():
            raise ConfigError(f"task '{task.name}' is a regression, but column '{task.column}' holds text "
                              f"('{values.to_numpy()[text][0]}'); set train.task_kinds.{task.name}: multiclass")
        return out

    def scale(self, target, rows):
        """(mean, std, lowest, highest) of the training targets: predictions are kept within the training
        targets' range (a head extrapolating from an atypical image says 149 years, not something usable)."""
        part = target[rows]
        part = part[~np.isnan(part)]
        if not len(part):
            return 0.0, 1.0, -np.inf, np.inf
        std = float(part.std())
        return float(part.mean()), std if std > 1e-8 else 1.0, float(part.min()), float(part.max())

    @staticmethod
    def _value(z, mean, std):
        return z[:, 0] * std + mean

    def loss(self, logits, target, smoothing):
        import torch

        mask = ~torch.isnan(target)
        return (logits.squeeze(-1) - torch.nan_to_num(target)) ** 2, mask

    def decode(self, z, mean, std, lowest=-np.inf, highest=np.inf):
        return np.clip(self._value(z, mean, std), lowest, highest)

    def flags(self, task, z, mean, std, lowest=-np.inf, highest=np.inf):
        value = self._value(z, mean, std)
        return {f"{task.name}_clipped": (value < lowest) | (value > highest)}

    def evaluate(self, task, y, pred, norm, weights):
        res = {"mse": mse(y, pred, weights), "mae": mae(y, pred, weights)}
        res["rmse"] = np.sqrt(res["mse"])
        if norm is not None:
            res.update(mse_norm=mse(y / norm, pred / norm, weights), mae_norm=mae(y / norm, pred / norm, weights))
        return res

    def baseline(self, which, y, linear, mask, n, task, c, alpha):
        if which == "majority" or len(y) < 2:
            return Baseline.constant(np.full(n, y.mean() if len(y) else 0.0))
        mean, std = self.scale(y, np.arange(len(y)))[:2]
        return Baseline([linear.ridge(mask, (y - mean) / std, alpha)], lambda scores: scores[0][:, 0] * std + mean)

    def columns(self, task, y, pred):
        out: Dict[str, object] = {}
        if y is not None:
            out[f"{task.name}_true"] = y
        out[f"{task.name}_pred"] = np.round(pred, 4)
        return out


#: uncertain-label policies of a multilabel task (Irvin et al. 2019: U-Ignore, U-Ones, U-Zeros)
UNCERTAIN = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}
#: the value data sets write for an uncertain finding (CheXpert, MIMIC-CXR's CheXpert labels)
UNCERTAIN_VALUE = -1.0


class Multilabel(Kind):
    """Several findings per image: one sigmoid output per finding, BCE over the labelled findings of a row.

    The labels come from one column per finding (1, 0, -1 uncertain, empty unmentioned) or from one column of
    '|'-separated finding names ('Nodule|Effusion'; an empty cell is unlabelled). Metrics per finding (AUROC
    `auc_<finding>`, average precision `ap_<finding>`) and over findings: macro AUROC and AP (the mean of the
    findings that have both classes) and micro AUROC (every labelled finding of every row as one sample).
    """

    name = "multilabel"
    metrics = {"auc_macro": 1, "auc_micro": 1, "ap_macro": 1}
    confusion = False
    per_class = ("auc_", "ap_")

    def n_outputs(self, task):
        return len(task.classes)

    def directions(self, task):
        return {**self.metrics, **{f"{m}{f}": 1 for f in task.classes for m in self.per_class}}

    def values(self, task, table):
        if task.column:
            return super().values(task, table)
        missing = [c for c in task.classes if c not in table]
        if missing:
            raise ConfigError(f"task '{task.name}' needs the finding column(s) {', '.join(missing)}, which the data "
                              "lacks")
        return table[list(task.classes)]

    def encode(self, task, values, presence):
        if isinstance(values, pd.Series):  # one column of '|'-separated names
            out = np.full((len(values), len(task.classes)), np.nan)
            index = {c: k for k, c in enumerate(task.classes)}
            for row, value in enumerate(values):
                if is_missing(value):
                    continue
                out[row] = 0.0
                for name in str(value).split(MULTILABEL_SEPARATOR):
                    if name.strip() in index:
                        out[row, index[name.strip()]] = 1.0
            return out
        out = values.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64, copy=True)
        blank = np.isnan(out)  # nothing said (a bad cell is caught below)
        # a cell judged missing once per distinct value of its column, not once per cell (3 s for CheXpert's 224k x 14)
        said = ~np.array([missing_mask(values[c]) for c in values.columns], dtype=bool).reshape(out.shape[::-1]).T
        bad = (blank & said) | (~blank & ~np.isin(out, [0.0, 1.0, UNCERTAIN_VALUE]))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ConfigError(f"task '{task.name}': finding column '{task.classes[col]}' holds "
                              f"'{values.iat[row, col]}'; it must hold 1, 0, -1 (uncertain) or nothing")
        if task.uncertain not in UNCERTAIN:
            raise ConfigError(f"task '{task.name}': uncertain policy '{task.uncertain}' must be one of "
                              f"{', '.join(UNCERTAIN)}")
        out[out == UNCERTAIN_VALUE] = UNCERTAIN[task.uncertain]
        if task.blank == "negative":
            out[blank] = 0.0
        return out

    def labelled(self, target):
        return ~np.isnan(target).all(axis=-1)

    def loss(self, logits, target, smoothing):
        import torch
        import torch.nn.functional as F

        known = ~torch.isnan(target)
        bce = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
        count = known.sum(dim=-1)
        return (bce * known).sum(dim=-1) / count.clamp_min(1), count > 0

    def decode(self, z, *scale):
        return sigmoid(z)

    def metric_rows(self, task, target):
        known = ~np.isnan(target)
        return {f"{prefix}{finding}": known[:, k] for k, finding in enumerate(task.classes)
                for prefix in ("auc_", "ap_")}

    def scores(self, task, y, pred):
        out = {}
        for k, finding in enumerate(task.classes):
            known = ~np.isnan(y[:, k]) & (y[:, k] >= 0)  # an uncertain label left as -1 ('ignore') is no truth
            out[finding] = (y[known, k], pred[known, k], f"auc_{finding}", f"ap_{finding}")
        return out

    def evaluate(self, task, y, pred, norm, weights):
        per: Dict[str, np.ndarray] = {}
        nan = np.full(weights.shape[:-1], np.nan) if weights is not None else np.float64(np.nan)
        aucs, aps = [], []
        for k, finding in enumerate(task.classes):
            known = ~np.isnan(y[:, k])
            w = None if weights is None else weights[..., known]
            auc, ap = (roc_auc(y[known, k], pred[known, k], w), average_precision(y[known, k], pred[known, k], w)) \
                if known.any() else (nan, nan)
            # AP of a finding without a negative is 1 whatever the scores: undefined, as its AUROC, and out of ap_macro
            negative = (y[known, k] == 0).astype(float)
            weighted = negative.sum() if w is None else w @ negative
            ap = np.where(np.asarray(weighted) > 0, ap, np.nan)
            per[f"auc_{finding}"], per[f"ap_{finding}"] = auc, ap
            aucs.append(auc)
            aps.append(ap)
        rows, cols = np.nonzero(~np.isnan(y))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no finding has both classes
            return {"auc_macro": np.nanmean(np.stack(aucs), axis=0),  # first: the headline (label efficiency)
                    "auc_micro": roc_auc(y[rows, cols], pred[rows, cols],
                                         None if weights is None else weights[..., rows]),
                    "ap_macro": np.nanmean(np.stack(aps), axis=0), **per}

    def baseline(self, which, y, linear, mask, n, task, c, alpha):
        out = np.full((n, len(task.classes)), 0.5)
        fitted: Dict[int, object] = {}  # finding -> its logistic fit, scored with the other tasks' fits
        for k in range(len(task.classes)):
            known = ~np.isnan(y[:, k])
            labels = y[known, k]
            if not len(labels):
                continue
            if which == "majority":
                # the majority answer, 0 or 1: the same constant in every fold unless a finding's prevalence
                # straddles 1/2, so the pooled folds score it as the constant it is (AUROC 0.5, AP the
                # prevalence); each fold's own prevalence as the score made pooled folds rank one another
                # (the test folds richer in a finding are those whose training rows are poorer in it: 0.373)
                out[:, k] = float(labels.mean() > 0.5)
                continue
            if len(np.unique(labels)) < 2:
                out[:, k] = labels.mean()
                continue
            fit = mask.copy()
            fit[mask] = known
            fitted[k] = linear.logistic(fit, labels.astype(int), c)[1]

        def finish(scores):
            for k, z in zip(fitted, scores):
                out[:, k] = probabilities(z)[:, 1]
            return out
        return Baseline(list(fitted.values()), finish)

    def columns(self, task, y, pred):
        out: Dict[str, object] = {}
        for k, finding in enumerate(task.classes):
            if y is not None:
                out[f"{task.name}_{finding}_true"] = y[:, k]
            out[f"{task.name}_{finding}_prob"] = np.round(pred[:, k], 6)
        return out


for _kind in (Multiclass(), Binary(), Regression(), Multilabel()):
    TASK_KINDS.register(_kind.name, _kind)
