"""CheXpert (Irvin et al. 2019): train.csv and valid.csv with the CheXpert labeller's findings."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.data.field import (column_name, csv_header, finish_field, keep_present, read_table, relative_images,
                                 require_columns, set_findings)
from pipeline.data.labels import LabelMaps
from pipeline.data.table import Layout, find_file, register_layout
from pipeline.errors import DataError


CHEXPERT_FILES = {"train.csv": "train", "valid.csv": "validate"}
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CHEXPERT_FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                     "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                     "Pleural Other", "Fracture", "Support Devices")


# CheXpert


def _chexpert_marker(path: Path) -> Optional[Path]:
    """train.csv / valid.csv whose header has CheXpert's `Path` column (a missing other column is named when the
    table is read)."""
    candidates = [path] if path.is_file() else [p for p in (find_file(path, n) for n in CHEXPERT_FILES)
                                                if p is not None]
    for candidate in candidates:
        if candidate.name.lower() in CHEXPERT_FILES and "Path" in csv_header(candidate):
            return candidate
    return None


def load_chexpert(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """CheXpert's paths start with the archive's folder ('CheXpert-v1.0-small/train/...'): read relative to the
    folder above the data folder; also accepted relative to the data folder, with or without that prefix."""
    parts = []
    for name, split in CHEXPERT_FILES.items():
        path = find_file(src.root, name)
        if path is None:
            continue
        table = read_table(path, columns=CHEXPERT_COLUMNS + CHEXPERT_FINDINGS)
        require_columns(table, CHEXPERT_COLUMNS + CHEXPERT_FINDINGS, path)
        rel = table["Path"].str.strip()
        patient, study = rel.str.extract(r"patient(\d+)")[0], rel.str.extract(r"study(\d+)")[0]
        bad = (patient.isna() | study.isna()).to_numpy()
        if bad.any():
            i = int(bad.argmax())
            raise DataError(f"{path}: row {i + 2}: path '{rel.iloc[i]}' names no patientNNNNN/studyN folder")
        parts.append(table.assign(split=split, rel=rel, patient="patient" + patient, study="study" + study))
    table = pd.concat(parts, ignore_index=True)
    on_disk = relative_images(src.root)
    inner = table["rel"].str.split("/", n=1).str[1].fillna("")
    image = pd.Series(np.where(inner.isin(on_disk), str(src.root) + "/" + inner,
                               np.where(table["rel"].isin(on_disk), str(src.root) + "/" + table["rel"], None)),
                      dtype=object)
    table = keep_present(table, image, str(src.root.parent) + "/" + table["rel"], src.root)
    stem = table["rel"].str.rsplit("/", n=1).str[-1].str.replace(r"\.[^.]*$", "", regex=True)
    frontal = table["Frontal/Lateral"].str.strip().str.lower() == "frontal"
    view = table["AP/PA"].str.strip().str.upper().replace("", "FRONTAL")
    frame = pd.DataFrame({"id": table["patient"] + "_" + table["study"] + "_" + stem, "image": table["image"],
                          "age": table["Age"], "sex": table["Sex"], "patient_id": table["patient"],
                          "study_id": table["study"], "view": view.where(frontal, "LATERAL"),
                          "split": table["split"]})
    values = table[list(CHEXPERT_FINDINGS)].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
    set_findings(frame, CHEXPERT_FINDINGS, values)
    return finish_field(frame, "chexpert", src.root, src.metadata, labels, check_images, skip_bad)


# CheXpert's labeller leaves a finding the report does not mention blank: Irvin et al.'s U-Ones / U-Zeros read
# those as negatives
register_layout(Layout("chexpert", _chexpert_marker, load_chexpert, "train.csv / valid.csv",
                       tuple(column_name(f) for f in CHEXPERT_FINDINGS), "negative",
                       "valid.csv (scored) beside train.csv", "Lung Lesion"))
