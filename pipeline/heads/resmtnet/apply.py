"""Res-MTNet's part of predict: the loaded head's columns for new images (each task's answer, how typical the image's
features are) and the answer's final touches (a lobe on the answer's side)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.core.tasks import TaskSpec
from pipeline.heads.plugin import Applied
from pipeline.heads.resmtnet import PREFIX

logger = logging.getLogger(__name__)


def _masked(values, ok: np.ndarray) -> np.ndarray:
    """A predict column with nothing where an image was unreadable (NaN for numbers, None otherwise); floats as
    float64, as the CSV has always written them."""
    v = np.asarray(values)
    if v.dtype.kind == "f":
        v = v.astype(np.float64)
    if ok.all():
        return v
    if v.dtype.kind in "fiu":
        return np.where(ok, v, np.nan)
    out = v.astype(object)
    out[~ok] = None
    return out


def _column(task: TaskSpec, key: str) -> str:
    """predict's column names of the head: the class or value under the task's name (size as size_mm), P(...) as
    is, all marked as this head's (secondary) answers."""
    if key == f"{task.name}_pred":
        key = task.column if task.impl.measures else task.name
    return PREFIX + key


#: predict warns for an image whose typicality percentile is at least this (unlike every training image)
ATYPICAL = 99.0


class PooledApplied(Applied):
    """The Res-MTNet head in predict: every task from the pooled features, and how typical an image is."""

    leading = ("typicality_percentile",)

    def __init__(self, spec: Dict[str, Any], tensors: Dict[str, Any]):
        from pipeline.heads.resmtnet.model import load_head

        self.head = load_head(spec, tensors)
        self.tasks = self.head.layout.tasks

    def columns(self, features: np.ndarray, ok: np.ndarray, grid: Sequence[float]) -> Dict[str, np.ndarray]:
        preds = self.head.predict(features)
        names = {t.name for t in self.tasks}
        out = {"typicality_percentile": np.where(ok, np.round(self.head.typicality(features), 1), np.nan)}
        for task in self.tasks:
            out.update({_column(task, k): _masked(v, ok)
                        for k, v in task.impl.columns(task, None, preds[task.name]).items()})
        out.update({PREFIX + k: _masked(v, ok) for k, v in preds.items() if k not in names})  # <task>_clipped
        if {"x", "y"} <= names:
            out[f"{PREFIX}x_norm"] = out[f"{PREFIX}x"] / grid[0]
            out[f"{PREFIX}y_norm"] = out[f"{PREFIX}y"] / grid[1]
        return out

    def finish(self, table: pd.DataFrame, found: Optional[np.ndarray], x_norm: Optional[np.ndarray]) -> None:
        """Its position in the image's own pixels; where an answer was given, the lobe on the answer's side and its
        nodule attributes emptied where no nodule is found; a warning per image unlike every training image."""
        typicality = table["typicality_percentile"].to_numpy(dtype=float)
        far = typicality >= ATYPICAL
        for image, value in zip(table["image"].to_numpy()[far], typicality[far]):
            logger.warning("%s: typicality percentile %g: farther from the training images than %g%% of them are "
                           "from one another; its answers extrapolate (another kind of image, or of data set?)",
                           image, value, ATYPICAL)
        if f"{PREFIX}x_norm" in table:
            size = {c: table[c].to_numpy(dtype=float) if c in table else np.full(len(table), np.nan)
                    for c in ("image_width", "image_height")}
            table[f"{PREFIX}x_image"] = table[f"{PREFIX}x_norm"] * size["image_width"]
            table[f"{PREFIX}y_image"] = table[f"{PREFIX}y_norm"] * size["image_height"]
        if found is None:
            return
        lobe = next((t for t in self.tasks if t.name == "lobe" and t.kind == "multiclass"), None)
        if lobe is not None and x_norm is not None:
            table["nodule_lobe"] = self._lobe_on_side(table, lobe.classes, x_norm)
        columns = [f"{PREFIX}{c}" for c in ("x", "y", "x_norm", "y_norm", "x_image", "y_image")]
        columns += [_column(t, f"{t.name}_pred") for t in self.tasks if t.nodule_attribute]
        for col in columns:
            if col in table:  # empty in the CSV: NaN for numbers, None for class names
                numeric = pd.api.types.is_numeric_dtype(table[col])
                table[col] = (table[col].where(found, np.nan) if numeric
                              else table[col].astype(object).where(found, None))

    @staticmethod
    def _lobe_on_side(table: pd.DataFrame, classes: Sequence[str], x_norm: np.ndarray) -> List[Optional[str]]:
        """The head's most probable lobe among those on the side of the answer's position: in a PA chest X-ray
        the patient's right lung (classes R*) is on the image's left (x < 1/2), the left lung (L*) on its right;
        None where there is no position."""
        probs = table[[f"{PREFIX}lobe_p_{c}" for c in classes]].to_numpy(dtype=float)
        out: List[Optional[str]] = []
        for p, x in zip(probs, x_norm):
            if not np.isfinite(x) or not np.isfinite(p).all():
                out.append(None)
                continue
            side = "L" if x > 0.5 else "R"
            allowed = [k for k, c in enumerate(classes) if c.upper().startswith(side)] or list(range(len(classes)))
            out.append(classes[max(allowed, key=lambda k: p[k])])
        return out
