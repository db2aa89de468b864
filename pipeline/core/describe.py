"""What a data set's table offers as tasks (inspect-data): each label column's kind, counts and missing values."""
from __future__ import annotations

from typing import List

import pandas as pd

from pipeline.core.tasks import infer_kind
from pipeline.data.table import FILE_COLUMNS
from pipeline.errors import ConfigError


def describe(table: pd.DataFrame, patient_column: str = "patient_id") -> List[str]:
    """inspect-data's lines: every label column with the kind a task on it would have, its counts (classes, or
    the range of a number) and missing values; the patients and images per patient where a column says."""
    lines = [f"{len(table)} images ({table.attrs.get('layout', '?')} layout) from {table.attrs.get('root', '?')}"]
    skip = set(FILE_COLUMNS) | {"relpath", "grid_w", "grid_h", patient_column}
    empty = []
    for col in (c for c in table.columns if c not in skip):
        values = table[col]
        missing = int(sum(v is None or v != v or v == "" for v in values))
        if missing == len(values):
            empty.append(col)
            continue
        try:
            kind, classes = infer_kind(values)
        except ConfigError:
            lines.append(f"  {col}: text, {values.nunique()} distinct values (an identifier?), {missing} missing")
            continue
        if kind == "regression":
            numbers = pd.to_numeric(values, errors="coerce")
            lines.append(f"  {col}: regression, {numbers.min():g} to {numbers.max():g} (median "
                         f"{numbers.median():g}), {missing} missing")
        else:
            counts = values.dropna().map(lambda v: str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
            parts = ", ".join(f"{k}={v}" for k, v in counts[counts != ""].value_counts().sort_index().items())
            lines.append(f"  {col}: {kind}, {parts}, {missing} missing")
    for group, members in table.attrs.get("task_groups", {}).items():
        lines.append(f"  task '{group}': multilabel over {len(members)} finding columns ({', '.join(members)}); "
                     f"train.tasks: [{group}]")
    if empty:
        lines.append(f"  no labels: {', '.join(empty)}")
    if patient_column in table:
        per = table[patient_column].dropna()
        per = per[per != ""].value_counts()
        if len(per):
            lines.append(f"  {patient_column}: {len(per)} patients, images per patient {per.min()} to {per.max()} "
                         f"(median {per.median():g}); splits keep a patient's images together (eval.group)")
    return lines
