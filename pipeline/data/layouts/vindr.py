"""VinDr-CXR (Nguyen et al. 2022): DICOM images in train/ and test/ with the readers' annotations and image labels."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.data.field import NoImagesOnDisk, column_name, dicom_facts, finish_field, read_readings
from pipeline.data.labels import LabelMaps
from pipeline.data.table import Layout, find_file, register_layout
from pipeline.errors import DataError

logger = logging.getLogger(__name__)

VINDR_FINDINGS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                  "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                  "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Other lesion", "Pleural effusion",
                  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other disease", "COPD",
                  "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
VINDR_SPLITS = ("train", "test")
#: The findings whose boxes are localisation targets.
VINDR_LESIONS = ("Nodule/Mass",)


# VinDr-CXR (its Kaggle copy, VinBigData: pipeline.data.layouts.vinbigdata)


def _vindr_file(root: Path, name: str) -> Optional[Path]:
    for folder in (root, root / "annotations"):
        if folder.is_dir():
            found = find_file(folder, name)
            if found is not None:
                return found
    return None


def _vindr_marker(path: Path) -> Optional[Path]:
    if path.is_file():
        return None  # VinDr is named by its folder: its images are in train/ and test/ beside the tables
    for split in VINDR_SPLITS:
        for name in (f"image_labels_{split}.csv", f"annotations_{split}.csv"):
            found = _vindr_file(path, name)
            if found is not None:
                return found
    return None


def load_vindr(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    root = src.metadata.parent.parent if src.metadata.parent.name.lower() == "annotations" else src.metadata.parent
    parts, missing = [], []
    for split in VINDR_SPLITS:
        label_path = _vindr_file(root, f"image_labels_{split}.csv")
        box_path = _vindr_file(root, f"annotations_{split}.csv")
        if label_path is not None or box_path is not None:
            try:
                parts.append(read_readings(root, split, box_path, label_path, VINDR_FINDINGS, VINDR_LESIONS))
            except NoImagesOnDisk as exc:  # the other folder may hold the images (a partial download)
                missing.append(str(exc))
    if not parts:
        raise DataError(missing[0] if missing else f"{root}: no annotations_train.csv / image_labels_train.csv")
    for text in missing:
        logger.warning("%s", text)
    frame = dicom_facts(pd.concat(parts, ignore_index=True), check_images)
    return finish_field(frame, "vindr", root, src.metadata, labels, check_images, skip_bad)


register_layout(Layout("vindr", _vindr_marker, load_vindr, "annotations_train.csv / image_labels_train.csv",
                       tuple(column_name(f) for f in VINDR_FINDINGS), "missing",
                       "the train/ and test/ folders with their annotations", "Nodule_Mass"))
