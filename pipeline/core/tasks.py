"""Tasks: a label column plus a kind. One object per kind owns everything that differs between kinds.

A `TaskSpec` is data (name, kind, column, classes, units); its `kind` names one of `TASK_KINDS`, the object that
encodes targets, masks missing labels, computes the loss, decodes the head's outputs, scores predictions
(with each metric's direction) and fits the baselines (pipeline.core.kinds). Nothing else branches on a kind.

The paper's eight tasks are built in (`builtin_tasks`); any other label column of a cache becomes a task by
naming it in `train.tasks`: its kind is inferred from the values (`infer_kind`) or set with
`train.task_kinds.<name>`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pipeline.data.labels import LabelMaps
from pipeline.errors import ConfigError
from pipeline.plugins import TASK_KINDS

if TYPE_CHECKING:  # the kinds (pipeline.core.kinds) are imported through their registry when first used
    from pipeline.core.kinds import Kind

NONE_CLASS = "none"  # the extra class of "no nodule" when non_nodule = class
#: A numeric column with integer values and at most this many distinct values is a classification task.
MAX_INTEGER_CLASSES = 10
#: A text column with more distinct values than this is refused (probably an identifier, not a label).
MAX_TEXT_CLASSES = 50
#: Sentinel for "missing" in encoded class targets (they are stored as float, like the rest).
MISSING = -1.0
#: Between the names of a multilabel cell written as one text column ("Effusion|Mass").
MULTILABEL_SEPARATOR = "|"


@dataclass(frozen=True)
class TaskSpec:
    """One head of the multi-task network: what it predicts (column) and how (kind)."""

    name: str
    kind: str  # a key of TASK_KINDS: multiclass | binary | regression | multilabel
    column: str  # the label column ('' for a multilabel task over one column per finding)
    # multiclass: output order; binary: (negative, positive), or () for 0/1; multilabel: the findings (their
    # columns, or the names in a '|'-separated column)
    classes: Tuple[str, ...] = ()
    unit: str = ""  # regression: px (of the coordinate grid), mm, or the column's own unit
    grid_column: str = ""  # regression in px: the column of the grid size (normalises to [0, 1])
    pair_auc: Tuple[str, ...] = ()  # multiclass: (metric name, positive class, negative class), e.g. malignancy
    nodule_attribute: bool = False  # describes the nodule: meaningless (left empty by predict) without one
    # regression: what the normalised errors (mse_norm, mae_norm) divide by: grid (grid_column, the paper's x and
    # y), size (as eval.size_norm says: the paper's size), range (the labels' range in the data set)
    norm: str = "range"
    uncertain: str = "ignore"  # multilabel: CheXpert's uncertain label (-1) is ignored (masked), ones or zeros
    blank: str = "missing"  # multilabel: a blank finding cell is missing (masked) or negative (CheXpert's reading)

    @property
    def impl(self) -> "Kind":
        return TASK_KINDS[self.kind]

    @property
    def n_outputs(self) -> int:
        return self.impl.n_outputs(self)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "TaskSpec":
        return cls(**{**d, "classes": tuple(d.get("classes", ())), "pair_auc": tuple(d.get("pair_auc", ()))})


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def class_name(value: object) -> str:
    """A label value as a class name: 3.0 -> '3', 'M' -> 'M'."""
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    return str(value)


def metric_direction(task: TaskSpec, metric: str) -> int:
    """+1 where a higher value of `metric` is better, -1 where lower is; an unknown metric is an error."""
    directions = task.impl.directions(task)
    if metric not in directions:
        raise ConfigError(f"task '{task.name}' ({task.kind}) has no metric '{metric}'; "
                          f"valid: {', '.join(directions)}")
    return directions[metric]


# --------------------------------------------------------------------------------------------------
# which tasks


def builtin_tasks(maps: LabelMaps, non_nodule: str = "mask") -> Dict[str, TaskSpec]:
    """The paper's heads (subtlety, state, lobe "Z", diagnosis, x, y, size) plus nodule presence.

    non_nodule 'mask': images without a nodule have no subtlety, lobe or diagnosis label (masked out);
    'class': they get the extra class 'none' in those three tasks. State has 'non-nodule' either way.
    """
    if non_nodule not in ("mask", "class"):
        raise ConfigError(f"train.non_nodule '{non_nodule}' must be 'mask' or 'class'")
    extra = (NONE_CLASS,) if non_nodule == "class" else ()
    specs = [
        TaskSpec("subtlety", "multiclass", "subtlety", ("1", "2", "3", "4", "5") + extra, nodule_attribute=True),
        TaskSpec("state", "multiclass", "state", maps.classes["state"],
                 pair_auc=("auc_malignancy", "malignant", "benign")),
        TaskSpec("presence", "binary", "presence"),
        TaskSpec("lobe", "multiclass", "lobe", maps.classes["lobe"] + extra, nodule_attribute=True),
        TaskSpec("diagnosis", "multiclass", "diagnosis", maps.classes["diagnosis"] + extra, nodule_attribute=True),
        TaskSpec("x", "regression", "x", unit="px", grid_column="grid_w", nodule_attribute=True, norm="grid"),
        TaskSpec("y", "regression", "y", unit="px", grid_column="grid_h", nodule_attribute=True, norm="grid"),
        TaskSpec("size", "regression", "size_mm", unit="mm", nodule_attribute=True, norm="size"),
    ]
    return {t.name: t for t in specs}


def per_distinct(values, fn: Callable[[object], object], dtype) -> np.ndarray:
    """fn of every value, called once per distinct value (a million label cells hold a handful), in the order the
    values first appear (so an error names the first offending one); None and NaN are values too."""
    codes, distinct = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=False)
    return np.array([fn(v) for v in distinct], dtype=dtype)[codes]


def missing_mask(values: pd.Series) -> np.ndarray:
    """is_missing of every value: NaN of a float column, and for text or mixed columns each distinct value
    judged once."""
    array = values.to_numpy()
    if array.dtype.kind == "f":
        return np.isnan(array)
    if array.dtype.kind in "iub":
        return np.zeros(len(array), dtype=bool)
    return per_distinct(array, is_missing, bool)


def _known(values: pd.Series) -> pd.Series:
    return values[~missing_mask(values)]


def infer_kind(values: pd.Series) -> Tuple[str, Tuple[str, ...]]:
    """(kind, classes) from a label column: text or a few integer values are classes (two: binary),
    other numbers a regression."""
    known = _known(values)
    numeric = pd.to_numeric(known, errors="coerce")
    if len(known) and numeric.notna().all():
        numbers = numeric.to_numpy(dtype=float)
        distinct = np.unique(numbers)
        if np.all(distinct == np.round(distinct)) and len(distinct) <= MAX_INTEGER_CLASSES:
            if set(distinct) <= {0.0, 1.0} and len(distinct) == 2:
                return "binary", ()
            return ("binary" if len(distinct) == 2 else "multiclass"), tuple(class_name(v) for v in distinct)
        return "regression", ()
    distinct = sorted({class_name(v) for v in known})
    if len(distinct) > MAX_TEXT_CLASSES:
        raise ConfigError(f"label column '{values.name}' has {len(distinct)} distinct text values (an "
                          "identifier?); set train.task_kinds.{values.name} or drop it from train.tasks")
    return ("binary" if len(distinct) == 2 else "multiclass"), tuple(distinct)


def resolve_tasks(names: Sequence[str], table: pd.DataFrame, maps: LabelMaps, non_nodule: str = "mask",
                  kinds: Optional[Mapping[str, str]] = None, where: str = "the data",
                  groups: Optional[Mapping[str, Sequence[str]]] = None, uncertain: str = "ignore",
                  blank: str = "missing") -> List[TaskSpec]:
    """The TaskSpecs of `names`: built-in tasks as defined, a name of `groups` as a multilabel task over those
    finding columns (a layout's `findings`, train.task_groups), any other label column by its inferred kind
    (or train.task_kinds: 'multilabel' reads a column of '|'-separated names).

    Every task without labels in `table` is named in one error, with the label columns that do exist.
    """
    if not names:
        raise ConfigError("train.tasks is empty; name at least one task")
    kinds = dict(kinds or {})
    groups = dict(groups or {})
    for name, kind in kinds.items():
        TASK_KINDS.find(kind, f"train.task_kinds.{name}")
    stray = sorted(set(kinds) - set(names))
    if stray:
        raise ConfigError(f"train.task_kinds names task(s) {', '.join(stray)} that are not in train.tasks")
    builtin = builtin_tasks(maps, non_nodule)
    tasks, missing = [], []
    for name in names:
        if name in groups:
            present = tuple(c for c in groups[name] if c in table and len(_known(table[c])))
            if present:
                tasks.append(TaskSpec(name, "multilabel", "", present, uncertain=uncertain, blank=blank))
            else:
                missing.append(f"{name} (finding columns {', '.join(groups[name])})")
            continue
        spec = builtin.get(name)
        column = spec.column if spec else name
        if column not in table or not len(_known(table[column])):
            missing.append(name if column == name else f"{name} (column '{column}')")
            continue
        if kinds.get(name) == "multilabel":
            classes = tuple(sorted({part.strip() for v in _known(table[column])
                                    for part in str(v).split(MULTILABEL_SEPARATOR) if part.strip()}))
            spec = TaskSpec(name, "multilabel", column, classes, uncertain=uncertain, blank=blank)
        elif spec is None or (name in kinds and kinds[name] != spec.kind):
            kind, classes = infer_kind(table[column])
            if name in kinds and kinds[name] != kind:
                kind = kinds[name]
                classes = tuple(sorted({class_name(v) for v in _known(table[column])})) if kind != "regression" \
                    else ()
                if kind == "binary" and len(classes) != 2:
                    raise ConfigError(f"train.task_kinds.{name}: binary needs two classes, column '{column}' "
                                      f"has {len(classes)}")
                if kind == "binary" and set(classes) == {"0", "1"}:
                    classes = ()
            spec = TaskSpec(name, kind, column, classes, unit=spec.unit if spec else "",
                            grid_column=spec.grid_column if spec else "",
                            nodule_attribute=spec.nodule_attribute if spec else False,
                            norm=spec.norm if spec else "range")
        tasks.append(spec)
    if missing:
        from pipeline.data.table import FILE_COLUMNS

        label_columns = [c for c in table.columns if c not in FILE_COLUMNS and c not in ("relpath", "grid_w", "grid_h")
                         and len(_known(table[c]))]
        raise ConfigError(f"{where} has no labels for task(s) {', '.join(missing)}; label columns there: "
                          f"{', '.join(label_columns)}; drop them from train.tasks or rebuild the cache from "
                          "labelled data")
    return tasks


def encode_targets(table: pd.DataFrame, tasks: Sequence[TaskSpec]) -> Dict[str, np.ndarray]:
    """Per task, a float array over the rows: class index (-1 = missing), 0/1 or value (NaN = missing); a
    multilabel task's is (rows, findings)."""
    presence = table["presence"].to_numpy(dtype=float) if "presence" in table else None
    return {task.name: task.impl.encode(task, task.impl.values(task, table), presence) for task in tasks}


def labelled(task: TaskSpec, target: np.ndarray) -> np.ndarray:
    return task.impl.labelled(target)
