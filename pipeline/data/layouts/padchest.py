"""PadChest (BIMCV, 160,868 images): PADCHEST_chest_x_ray_images_labels_160K*.csv(.gz) and its label lists."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.data.field import (column_name, finish_field, image_paths, keep_present, read_table, require_columns,
                                 set_findings)
from pipeline.data.labels import LabelMaps
from pipeline.data.table import Layout, register_layout


PADCHEST_COLUMNS = ("ImageID", "ImageDir", "PatientID", "PatientSex_DICOM", "PatientBirth", "StudyDate_DICOM",
                    "Projection", "Labels")
#: The findings trained by default (the multi-label task `findings`), as PadChest spells them: frequent
#: radiological findings of its label hierarchy; every label an image has is kept in the `labels` column.
PADCHEST_FINDINGS = ("normal", "pulmonary fibrosis", "chronic changes", "kyphosis", "pseudonodule",
                     "ground glass pattern", "alveolar pattern", "interstitial pattern", "laminar atelectasis",
                     "pleural effusion", "apical pleural thickening", "infiltrates", "heart insufficiency",
                     "hemidiaphragm elevation", "aortic elongation", "scoliosis", "nodule", "cardiomegaly",
                     "costophrenic angle blunting", "aortic atheromatosis", "hiatal hernia", "COPD signs",
                     "pneumonia", "mass", "atelectasis", "consolidation", "emphysema", "pneumothorax")
PADCHEST_VIEWS = {"L": "LATERAL", "AP_HORIZONTAL": "AP"}


def _padchest_marker(path: Path) -> Optional[Path]:
    candidates = [path] if path.is_file() else sorted(path.glob("[Pp][Aa][Dd][Cc][Hh][Ee][Ss][Tt]*.csv*"))
    for candidate in candidates:
        if candidate.name.upper().startswith("PADCHEST") and candidate.name.lower().endswith((".csv", ".csv.gz")):
            return candidate
    return None


def load_padchest(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """The labels table (one row per image; `Labels` a Python-list string such as "['pneumonia', 'infiltrates']")
    and the 16-bit PNGs in the numbered folders `ImageDir` names; age from the study date and the birth year."""
    table = read_table(src.metadata, columns=PADCHEST_COLUMNS)
    require_columns(table, PADCHEST_COLUMNS, src.metadata)
    ids = table["ImageID"].str.strip().str.replace(r"\.png$", "", regex=True, case=False)
    image = ids.str.lower().map(image_paths([src.root], recursive=True))
    table = keep_present(table.assign(id=ids), image, str(src.root) + "/" + table["ImageDir"].str.strip() + "/"
                         + table["ImageID"].str.strip(), src.metadata)
    said = table["Labels"].str.findall(r"'\s*([^']*?)\s*'").map(lambda names: [n for n in names if n])
    text = said.map("|".join)
    dummies = text.str.get_dummies("|").reindex(columns=list(PADCHEST_FINDINGS), fill_value=0).astype(float)
    dummies = dummies.where(pd.Series((text != "").to_numpy(), index=text.index), axis=0)
    born = pd.to_numeric(table["PatientBirth"].str.strip(), errors="coerce")
    year = pd.to_numeric(table["StudyDate_DICOM"].str.strip().str[:4], errors="coerce")
    view = table["Projection"].str.strip().str.upper()
    frame = pd.DataFrame({"id": table["id"], "image": table["image"], "age": year - born,
                          "sex": table["PatientSex_DICOM"], "patient_id": table["PatientID"].str.strip(),
                          "view": view.replace(PADCHEST_VIEWS).where(view != ""), "labels": text.where(text != "")})
    frame["age"] = frame["age"].where(frame["age"].between(0, 130))  # a missing birth year reads as 0
    set_findings(frame, PADCHEST_FINDINGS, dummies)
    return finish_field(frame, "padchest", src.root, src.metadata, labels, check_images, skip_bad)


register_layout(Layout("padchest", _padchest_marker, load_padchest, "PADCHEST_chest_x_ray_images_labels_160K*.csv(.gz)",
                       tuple(column_name(f) for f in PADCHEST_FINDINGS), "missing", "", "nodule"))
