"""Several data sets as one training set: `train-heads --cache A.h5 --cache B.h5`.

Each cache is one data set, named by its file's stem. Their label tables are stacked with a `dataset` column;
image and patient ids get the data set's name in front (`nih/00000001_000.png`), so that two data sets never
share a patient (an image without a patient id is its own patient). A finding cell that a data set leaves
blank means what that data set's convention says (data.blank: CheXpert's blank is negative) and is settled
per data set before stacking, so a finding that a data set does not label at all is missing there (masked in
training and scoring), never negative. Label groups (a multilabel task's findings) are the union over data
sets, in the order first seen; with data.harmonise every data set's findings are first put in one vocabulary.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import pandas as pd

from pipeline.errors import ConfigError

DATASET_COLUMN = "dataset"
#: The label column that eval.group 'auto' splits by when a data set has it (several images per patient).
PATIENT_COLUMN = "patient_id"


def dataset_names(stems: Sequence[str]) -> List[str]:
    """The data sets' names (the caches' file stems); two caches of one name are an error naming the fix."""
    seen: Dict[str, int] = {}
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
    twice = sorted(s for s, k in seen.items() if k > 1)
    if twice:
        raise ConfigError(f"several caches are named {twice[0]}.h5: each --cache is a data set named by its file's "
                          "stem; rename or link them so that the names differ (e.g. nih.h5, chexpert.h5)")
    return list(stems)


def settle_blanks(table: pd.DataFrame, columns: Sequence[str], meaning: str) -> pd.DataFrame:
    """The data set's blank finding cells made what its convention says: 0 where blank means negative (its own
    finding columns only); left blank (missing) otherwise."""
    if meaning != "negative":
        return table
    table = table.copy()
    for column in columns:
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce").fillna(0.0)
    return table


def stack_tables(tables: Sequence[pd.DataFrame], names: Sequence[str]) -> pd.DataFrame:
    """One table of every data set's rows, in the caches' order, with `dataset` and prefixed ids."""
    parts = []
    for table, name in zip(tables, names):
        part = table.copy()
        part[DATASET_COLUMN] = name
        part["id"] = name + "/" + part["id"].astype(str)
        if PATIENT_COLUMN in part:
            part[PATIENT_COLUMN] = (name + "/" + part[PATIENT_COLUMN].astype(str)).where(part[PATIENT_COLUMN].notna())
        parts.append(part)
    stacked = pd.concat(parts, ignore_index=True, sort=False)
    if PATIENT_COLUMN in stacked:  # an image without a patient id (or of a data set without): its own patient
        stacked[PATIENT_COLUMN] = stacked[PATIENT_COLUMN].where(stacked[PATIENT_COLUMN].notna(), stacked["id"])
    return stacked


def union_groups(groups: Sequence[Dict[str, List[str]]]) -> Dict[str, List[str]]:
    """Each label group's members over every data set, in the order first seen."""
    out: Dict[str, List[str]] = {}
    for group in groups:
        for name, members in group.items():
            out.setdefault(name, [])
            out[name] += [m for m in members if m not in out[name]]
    return out
