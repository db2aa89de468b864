"""MIMIC-CXR-JPG (Johnson et al. 2019): the mimic-cxr-2.0.0-metadata, -chexpert and -split tables."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.data.field import (column_name, finish_field, keep_present, read_table, relative_images, require_columns,
                                 set_findings)
from pipeline.data.labels import LabelMaps
from pipeline.data.table import Layout, find_file, register_layout
from pipeline.data.layouts.chexpert import CHEXPERT_FINDINGS


MIMIC_PREFIX = "mimic-cxr-2.0.0-"
MIMIC_TABLES = ("metadata", "chexpert", "split")


# MIMIC-CXR-JPG


def _mimic_table(root: Path, which: str) -> Optional[Path]:
    for suffix in (".csv", ".csv.gz"):
        found = find_file(root, f"{MIMIC_PREFIX}{which}{suffix}")
        if found is not None:
            return found
    return None


def _mimic_marker(path: Path) -> Optional[Path]:
    if path.is_file():
        return path if path.name.lower().startswith(f"{MIMIC_PREFIX}metadata.csv") else None
    return _mimic_table(path, "metadata")


def load_mimic(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    columns = ("dicom_id", "subject_id", "study_id", "ViewPosition")
    meta = read_table(src.metadata, columns=columns)
    require_columns(meta, columns, src.metadata)
    rel = ("p" + meta["subject_id"].str[:2] + "/p" + meta["subject_id"] + "/s" + meta["study_id"] + "/"
           + meta["dicom_id"] + ".jpg")
    files = str(src.root / "files") + "/"
    image = pd.Series(np.where(rel.isin(relative_images(src.root / "files")), files + rel, None), dtype=object)
    meta = keep_present(meta, image, files + rel, src.metadata)
    view = meta["ViewPosition"].str.strip().str.upper()
    frame = pd.DataFrame({"id": meta["dicom_id"], "image": meta["image"], "patient_id": meta["subject_id"],
                          "study_id": meta["study_id"], "view": view.where(view != ""), "split": None})
    split_path = _mimic_table(src.root, "split")
    if split_path is not None:
        table = read_table(split_path, columns=("dicom_id", "split"))
        require_columns(table, ("dicom_id", "split"), split_path)
        split = frame["id"].map(table.drop_duplicates("dicom_id").set_index("dicom_id")["split"])
        frame["split"] = split.where(split.fillna("") != "")
    chexpert = _mimic_table(src.root, "chexpert")
    values = pd.DataFrame(index=frame.index)
    if chexpert is not None:
        table = read_table(chexpert, columns=("subject_id", "study_id") + CHEXPERT_FINDINGS)
        require_columns(table, ("subject_id", "study_id") + CHEXPERT_FINDINGS, chexpert)
        table = table[table["study_id"].isin(set(frame["study_id"]))].drop_duplicates("study_id", keep="last")
        per_study = table.set_index("study_id")[list(CHEXPERT_FINDINGS)].apply(
            lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
        values = per_study.reindex(frame["study_id"]).reset_index(drop=True)
    set_findings(frame, CHEXPERT_FINDINGS, values)
    return finish_field(frame, "mimic", src.root, src.metadata, labels, check_images, skip_bad)


# MIMIC-CXR's CheXpert labels leave an unmentioned finding blank, as CheXpert's do
register_layout(Layout("mimic", _mimic_marker, load_mimic, f"{MIMIC_PREFIX}metadata.csv(.gz)",
                       tuple(column_name(f) for f in CHEXPERT_FINDINGS), "negative", f"{MIMIC_PREFIX}split.csv.gz",
                       "Lung Lesion"))
