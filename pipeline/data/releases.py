"""The releases most people download, as layouts of `pipeline.data.table` (the shared machinery is in
`pipeline.data.datasets`): Kaggle's VinBigData copy of VinDr-CXR, the RSNA Pneumonia Detection Challenge, the
SIIM-ACR Pneumothorax Segmentation challenge and PadChest, read from their published file and column names.

Their boxes (VinBigData's Nodule/Mass, RSNA's pneumonia boxes, the bounding boxes of SIIM's pneumothorax masks)
are localisation targets as NIH's are (`nodule_boxes`, `x`, `y`, `presence`; FROC counts a candidate inside a
box as a hit). Images without labels (the challenges' test folders) are kept without labels and without a split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.data.datasets import (NODULE_FINDINGS, _attach_boxes, _box_frame, _dicom_facts, _finish, _findings,
                                    _header, _image_paths, _keep_present, _require, read_readings, read_table)
from pipeline.data.labels import LabelMaps
from pipeline.errors import DataError

# --------------------------------------------------------------------------------------------------
# Kaggle VinBigData Chest X-ray Abnormalities Detection (VinDr-CXR's training images, 3 readers each)

VINBIG_COLUMNS = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")
VINBIG_FINDINGS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
                   "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
                   "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "No finding")
NODULE_FINDINGS.update(vinbigdata=("Nodule/Mass",), rsna=("Lung Opacity",), siim=("Pneumothorax",))


def _vinbig_marker(path: Path) -> Optional[Path]:
    from pipeline.data.table import _find_case_insensitive

    found = path if path.is_file() else _find_case_insensitive(path, "train.csv")
    if found is not None and found.name.lower() == "train.csv" and {"image_id", "class_name", "rad_id"} <= set(
            _header(found)):
        return found
    return None


def _unlabelled(root: Path, folder: str, known: pd.Series) -> pd.DataFrame:
    """The images of a challenge's test folder that no table lists: kept without labels or split."""
    paths = _image_paths([root / folder], recursive=True)
    ids = sorted(set(paths) - set(known.str.lower()))
    return pd.DataFrame({"id": [Path(paths[i]).stem for i in ids], "image": [paths[i] for i in ids]})


def load_vinbigdata(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    frame = read_readings(src.root, "train", src.metadata, None, VINBIG_FINDINGS, "vinbigdata")
    frame["split"] = None  # Kaggle's test labels were never published: no official split
    frame = pd.concat([frame, _unlabelled(src.root, "test", frame["id"])], ignore_index=True)
    return _finish(_dicom_facts(frame, check_images), "vinbigdata", src.root, src.metadata, labels, check_images,
                   skip_bad)


# --------------------------------------------------------------------------------------------------
# RSNA Pneumonia Detection Challenge (stage 2)

RSNA_LABELS = "stage_2_train_labels.csv"
RSNA_CLASSES = "stage_2_detailed_class_info.csv"
RSNA_FINDINGS = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")


def load_rsna(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """One image per patient (`patientId`); a row per box, `Target` 0 rows without one; the three classes of
    stage_2_detailed_class_info.csv as findings (Lung Opacity is the pneumonia label); age, sex and view from the
    DICOM headers."""
    from pipeline.data.table import _find_case_insensitive

    table = read_table(src.metadata)
    _require(table, ("patientId", "x", "y", "width", "height", "Target"), src.metadata)
    target = pd.to_numeric(table["Target"], errors="coerce")
    per_patient = target.groupby(table["patientId"], sort=False).max()
    ids = pd.Series(per_patient.index, dtype=object)
    image = ids.str.lower().map(_image_paths([src.root / "stage_2_train_images"]))
    frame = _keep_present(pd.DataFrame({"id": ids, "presence": per_patient.to_numpy()}), image,
                          str(src.root / "stage_2_train_images") + "/" + ids + ".dcm", src.metadata)
    values = pd.DataFrame({"Lung Opacity": frame["presence"]})
    classes = _find_case_insensitive(src.root, RSNA_CLASSES)
    if classes is not None:
        info = read_table(classes)
        _require(info, ("patientId", "class"), classes)
        of = frame["id"].map(info.drop_duplicates("patientId").set_index("patientId")["class"].str.strip())
        for name in RSNA_FINDINGS[1:]:
            values[name] = (of == name).astype(float).where(of.notna())
    _findings(frame, RSNA_FINDINGS, values)
    frame["patient_id"] = frame["id"]
    frame["view"] = None
    boxed = table[target == 1]
    x, y, w, h = (pd.to_numeric(boxed[k], errors="coerce") for k in ("x", "y", "width", "height"))
    boxes = _box_frame(boxed["patientId"], pd.Series("Lung Opacity", index=boxed.index), [x, y, x + w, y + h])
    frame = _attach_boxes(frame, boxes, "rsna", frame["presence"])
    frame = pd.concat([frame, _unlabelled(src.root, "stage_2_test_images", frame["id"])], ignore_index=True)
    frame = _dicom_facts(frame, check_images, ("width", "height", "age", "sex", "view"))
    return _finish(frame, "rsna", src.root, src.metadata, labels, check_images, skip_bad)


# --------------------------------------------------------------------------------------------------
# SIIM-ACR Pneumothorax Segmentation

SIIM_RLE = "train-rle.csv"
#: The challenge's images are 1024 x 1024; its run-length encoding runs down the columns of that grid.
SIIM_SIZE = 1024


def rle_box(encoded: str, height: int = SIIM_SIZE) -> tuple:
    """The bounding box (x_min, y_min, x_max, y_max; max exclusive, in pixels) of a mask in the SIIM challenge's
    relative run-length encoding: pairs of (start after the previous run's end, length) over the image's pixels
    numbered down each column (the challenge's mask_functions.rle2mask, transposed)."""
    numbers = np.array(encoded.split(), dtype=np.int64)
    if len(numbers) < 2 or len(numbers) % 2:
        raise ValueError(f"'{encoded[:40]}' is not pairs of start and length")
    starts, lengths = numbers[0::2], numbers[1::2]
    first = np.cumsum(starts) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    last = first + lengths - 1
    x0, x1 = first // height, last // height
    y0 = np.where(x0 == x1, first % height, 0)
    y1 = np.where(x0 == x1, last % height, height - 1)
    return int(x0.min()), int(y0.min()), int(x1.max()) + 1, int(y1.max()) + 1


def load_siim(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """train-rle.csv (`ImageId, EncodedPixels`: -1 for no pneumothorax, a row per mask) and the DICOMs under
    dicom-images-train/<study>/<series>/; pneumothorax presence and the masks' bounding boxes; age, sex and
    patient from the DICOM headers."""
    table = read_table(src.metadata)
    _require(table, ("ImageId", "EncodedPixels"), src.metadata)
    code = table["EncodedPixels"].str.strip()
    per_image = (code != "-1").groupby(table["ImageId"], sort=False).any().astype(float)
    ids = pd.Series(per_image.index, dtype=object)
    image = ids.str.lower().map(_image_paths([src.root / "dicom-images-train"], recursive=True))
    frame = _keep_present(pd.DataFrame({"id": ids}), image,
                          "dicom-images-train/<study>/<series>/" + ids + ".dcm", src.metadata)
    values = pd.DataFrame({"Pneumothorax": per_image.reindex(frame["id"]).to_numpy()})
    _findings(frame, ("Pneumothorax",), values)
    masks = table[(code != "-1") & table["ImageId"].isin(set(frame["id"]))]
    corners = []
    for row, text in zip(masks.index, masks["EncodedPixels"]):
        try:
            corners.append(rle_box(text))
        except ValueError as exc:
            raise DataError(f"{src.metadata}: row {row + 2}: EncodedPixels {exc}; expected Kaggle's run-length "
                            "encoding or -1") from None
    corners = np.array(corners, dtype=float).reshape(-1, 4)
    boxes = _box_frame(masks["ImageId"], pd.Series("Pneumothorax", index=masks.index), corners.T)
    frame = _attach_boxes(frame, boxes, "siim", values["Pneumothorax"])
    frame["patient_id"] = None
    frame = pd.concat([frame, _unlabelled(src.root, "dicom-images-test", frame["id"])], ignore_index=True)
    frame = _dicom_facts(frame, check_images, ("width", "height", "age", "sex", "patient_id"))
    return _finish(frame, "siim", src.root, src.metadata, labels, check_images, skip_bad)


# --------------------------------------------------------------------------------------------------
# PadChest (BIMCV, 160,868 images)

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
    _require(table, PADCHEST_COLUMNS, src.metadata)
    ids = table["ImageID"].str.strip().str.replace(r"\.png$", "", regex=True, case=False)
    image = ids.str.lower().map(_image_paths([src.root], recursive=True))
    table = _keep_present(table.assign(id=ids), image, str(src.root) + "/" + table["ImageDir"].str.strip() + "/"
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
    _findings(frame, PADCHEST_FINDINGS, dummies)
    return _finish(frame, "padchest", src.root, src.metadata, labels, check_images, skip_bad)


def _register() -> None:
    from pipeline.data.datasets import column_name
    from pipeline.data.table import Layout, _file_named, register_layout

    for name, detect, load, marker, findings, stratify in (
            ("vinbigdata", _vinbig_marker, load_vinbigdata, "train.csv (image_id, class_name, rad_id)",
             VINBIG_FINDINGS, "Nodule_Mass"),
            ("rsna", _file_named(RSNA_LABELS), load_rsna, RSNA_LABELS, RSNA_FINDINGS, "Lung Opacity"),
            ("siim", _file_named(SIIM_RLE), load_siim, SIIM_RLE, ("Pneumothorax",), "Pneumothorax"),
            ("padchest", _padchest_marker, load_padchest, "PADCHEST_chest_x_ray_images_labels_160K*.csv(.gz)",
             PADCHEST_FINDINGS, "nodule")):
        register_layout(Layout(name, detect, load, marker, tuple(column_name(f) for f in findings), "missing", "",
                               stratify))


_register()
