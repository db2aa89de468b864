"""Kaggle's VinBigData Chest X-ray Abnormalities Detection: VinDr-CXR's training images, 3 readers each (train.csv).
Images without labels (the challenge's test folder) are kept without labels and without a split."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.data.field import column_name, csv_header, dicom_facts, finish_field, read_readings, unlabelled_images
from pipeline.data.labels import LabelMaps
from pipeline.data.table import Layout, find_file, register_layout


VINBIG_COLUMNS = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")
VINBIG_FINDINGS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                   "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                   "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding")
#: The findings whose boxes are localisation targets.
VINBIG_LESIONS = ("Nodule/Mass",)


def _vinbig_marker(path: Path) -> Optional[Path]:
    found = path if path.is_file() else find_file(path, "train.csv")
    if found is not None and found.name.lower() == "train.csv" and {"image_id", "class_name", "rad_id"} <= set(
            csv_header(found)):
        return found
    return None


def load_vinbigdata(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    frame = read_readings(src.root, "train", src.metadata, None, VINBIG_FINDINGS, VINBIG_LESIONS)
    frame["split"] = None  # Kaggle's test labels were never published: no official split
    frame = pd.concat([frame, unlabelled_images(src.root, "test", frame["id"])], ignore_index=True)
    return finish_field(dicom_facts(frame, check_images), "vinbigdata", src.root, src.metadata, labels, check_images,
                        skip_bad)


register_layout(Layout("vinbigdata", _vinbig_marker, load_vinbigdata, "train.csv (image_id, class_name, rad_id)",
                       tuple(column_name(f) for f in VINBIG_FINDINGS), "missing", "", "Nodule_Mass"))
