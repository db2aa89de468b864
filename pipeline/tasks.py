"""Task specs: which label column each head predicts, how, and how its targets are encoded."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd

from .errors import ConfigError
from .labels import LabelMaps

NONE_CLASS = "none"  # the extra class of "no nodule" when non_nodule = class


@dataclass(frozen=True)
class TaskSpec:
    """One head of the multi-task network."""

    name: str
    kind: str  # multiclass | binary | regression
    column: str
    classes: Tuple[str, ...] = ()  # multiclass: class names in output order
    unit: str = ""  # regression: px (of the coordinate grid) or mm
    grid_column: str = ""  # regression in px: the column of the grid size (normalises to [0, 1])

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.kind == "multiclass" else 1

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "TaskSpec":
        return cls(**{**d, "classes": tuple(d.get("classes", ()))})


def paper_tasks(maps: LabelMaps, non_nodule: str = "mask") -> Dict[str, TaskSpec]:
    """The paper's heads (subtlety, state, lobe "Z", diagnosis, x, y, size) plus nodule presence.

    non_nodule 'mask': images without a nodule have no subtlety, lobe or diagnosis label (masked out);
    'class': they get the extra class 'none' in those three tasks. State has 'non-nodule' either way.
    """
    if non_nodule not in ("mask", "class"):
        raise ConfigError(f"train.non_nodule '{non_nodule}' must be 'mask' or 'class'")
    extra = (NONE_CLASS,) if non_nodule == "class" else ()
    specs = [
        TaskSpec("subtlety", "multiclass", "subtlety", ("1", "2", "3", "4", "5") + extra),
        TaskSpec("state", "multiclass", "state", maps.classes["state"]),
        TaskSpec("presence", "binary", "presence"),
        TaskSpec("lobe", "multiclass", "lobe", maps.classes["lobe"] + extra),
        TaskSpec("diagnosis", "multiclass", "diagnosis", maps.classes["diagnosis"] + extra),
        TaskSpec("x", "regression", "x", unit="px", grid_column="grid_w"),
        TaskSpec("y", "regression", "y", unit="px", grid_column="grid_h"),
        TaskSpec("size", "regression", "size_mm", unit="mm"),
    ]
    return {t.name: t for t in specs}


def select_tasks(available: Dict[str, TaskSpec], names: Sequence[str]) -> List[TaskSpec]:
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)} in train.tasks; valid: {', '.join(available)}")
    if not names:
        raise ConfigError("train.tasks is empty; name at least one task")
    return [available[n] for n in names]


def _class_value(value: object) -> str:
    if isinstance(value, float):
        return str(int(value)) if value == int(value) else str(value)
    return str(value)


def encode_targets(table: pd.DataFrame, tasks: Sequence[TaskSpec]) -> Dict[str, np.ndarray]:
    """Per task, an array over the rows: class index (-1 = missing), or float (NaN = missing)."""
    out: Dict[str, np.ndarray] = {}
    presence = table["presence"].to_numpy(dtype=float) if "presence" in table else None
    for task in tasks:
        if task.column not in table:
            raise ConfigError(f"task '{task.name}' needs the label column '{task.column}', which the data lacks")
        values = table[task.column]
        if task.kind == "multiclass":
            index = {c: i for i, c in enumerate(task.classes)}
            codes = np.full(len(table), -1, dtype=np.int64)
            for row, value in enumerate(values):
                if value is None or (isinstance(value, float) and np.isnan(value)):
                    if NONE_CLASS in index and presence is not None and presence[row] == 0:
                        codes[row] = index[NONE_CLASS]
                    continue
                key = _class_value(value)
                if key not in index:
                    raise ConfigError(f"task '{task.name}': label '{key}' is not one of its classes "
                                      f"{', '.join(task.classes)}")
                codes[row] = index[key]
            out[task.name] = codes
        else:
            out[task.name] = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, copy=True)
    return out


def labelled(task: TaskSpec, target: np.ndarray) -> np.ndarray:
    return target >= 0 if task.kind == "multiclass" else ~np.isnan(target)
