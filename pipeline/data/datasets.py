"""The field's chest X-ray data sets as layouts of `pipeline.data.table`: NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG and
VinDr-CXR, read from their published file and column names.

Every layout adds to the normalised table (pipeline.data.table): `patient_id` (text; splits keep a patient's images
together), `view` (PA, AP, LATERAL, ...: data.views), `split` (train / validate / test: the data set's official
split, eval.protocol official), one numeric column per finding (1 positive, 0 negative, -1 uncertain as
CheXpert writes it, NaN unmentioned) declared as the layout's multi-label task `findings`, and `age` / `sex`
where the data set has them. Box annotations (NIH, VinDr) are kept as text in `boxes`:
`finding:x_min,y_min,x_max,y_max` in image pixels, `;` between boxes, every reader's box as published. Their
nodules and masses become localisation targets (`nodule_targets`): `nodule_boxes` (the lesions, same format
without the finding), `x`, `y` (the centre of the largest lesion) and `presence` (the image's Nodule or Mass
finding), so the localisation head trains on them and FROC counts a candidate inside a lesion's box as a hit.

Images listed in the metadata but absent from disk (a partial download: NIH ships 12 archives) are left out
with one warning naming how many and the first; none found at all is an error.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.data.labels import LabelMaps
from pipeline.errors import DataError

logger = logging.getLogger(__name__)

NIH_ENTRY = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position")
NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NIH_NO_FINDING = "No Finding"
NIH_SPLITS = {"train_val_list.txt": "train", "test_list.txt": "test"}
NIH_BOXES = "BBox_List_2017.csv"

CHEXPERT_FILES = {"train.csv": "train", "valid.csv": "validate"}
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CHEXPERT_FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                     "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                     "Pleural Other", "Fracture", "Support Devices")

MIMIC_PREFIX = "mimic-cxr-2.0.0-"
MIMIC_TABLES = ("metadata", "chexpert", "split")

VINDR_FINDINGS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                  "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                  "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Other lesion", "Pleural effusion",
                  "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other disease", "COPD",
                  "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
VINDR_SPLITS = ("train", "test")
#: The findings whose boxes are localisation targets, per layout.
NODULE_FINDINGS = {"nih": ("Nodule", "Mass"), "vindr": ("Nodule/Mass",)}
#: VinDr: readers' boxes of one lesion overlap at least this much (intersection over union).
MERGE_IOU = 0.2

Box = tuple  # (finding, x_min, y_min, x_max, y_max)


def format_boxes(boxes, with_finding: bool = True) -> Optional[str]:
    """Boxes as the table's text ('finding:x0,y0,x1,y1;...'), None for none."""
    parts = [(f"{b[0]}:" if with_finding else "") + ",".join(f"{v:g}" for v in b[1:]) for b in boxes]
    return ";".join(parts) or None


def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    h = max(0.0, min(a[4], b[4]) - max(a[2], b[2]))
    union = (a[3] - a[1]) * (a[4] - a[2]) + (b[3] - b[1]) * (b[4] - b[2]) - w * h
    return w * h / union if union > 0 else 0.0


def merge_readers(boxes: List[Box], readers: List[str], n_readers: int) -> List[Box]:
    """One box per lesion from several readers' boxes: boxes overlapping a group's first box (IoU >= MERGE_IOU)
    join its group; a group drawn by a strict majority of the image's readers is a lesion, its box the mean of
    the group's boxes."""
    groups: List[List[int]] = []
    for i, box in enumerate(boxes):
        home = next((g for g in groups if _iou(boxes[g[0]], box) >= MERGE_IOU), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    out = []
    for group in groups:
        if len({readers[i] for i in group}) * 2 > n_readers:
            corners = [sum(boxes[i][k] for i in group) / len(group) for k in range(1, 5)]
            out.append((boxes[group[0]][0], *corners))
    return out


def nodule_targets(lesions: List[Box], presence: float) -> Dict[str, object]:
    """The localisation columns of an image from its lesion boxes: nodule_boxes, x and y of the largest
    lesion's centre, presence (the finding's label; 1 where there is a lesion)."""
    if not lesions:
        return {"nodule_boxes": None, "presence": presence}
    big = max(lesions, key=lambda b: (b[3] - b[1]) * (b[4] - b[2]))
    return {"nodule_boxes": format_boxes(lesions, with_finding=False), "x": (big[1] + big[3]) / 2,
            "y": (big[2] + big[4]) / 2, "presence": 1.0}


def column_name(finding: str) -> str:
    """A finding's label column: its published name, '/' replaced (HDF5 reads it as a group): Nodule_Mass."""
    return finding.replace("/", "_")


def read_table(path: Path, where: str = "", columns: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """A published CSV (or .csv.gz) as text cells ('' = empty), only `columns` where given (a missing one is
    named by _require), with a one-line error for a damaged file."""
    wanted = None if columns is None else {c.lower() for c in columns}
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, index_col=False,
                            usecols=None if wanted is None else (lambda c: str(c).strip().lower() in wanted))
    except (OSError, ValueError, pd.errors.ParserError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the table ({exc}){where}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _require(table: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; is this the published file?")


def _numbers(values: pd.Series, field: str, ids: pd.Series, meta: Path) -> pd.Series:
    """Numeric cells (empty = missing, as pipeline.data.table reads one); any other text names its image."""
    from pipeline.data.table import MISSING_TEXT

    text = values.astype(str).str.strip()
    empty = text.str.lower().isin(MISSING_TEXT)
    numbers = pd.to_numeric(text.where(~empty), errors="coerce")
    bad = (numbers.isna() & ~empty).to_numpy()
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"{meta}: image {ids.iloc[i]}: {field} '{text.iloc[i]}' is not a number; fix the value or "
                        "leave it empty")
    return numbers.astype(float)


def _ids(names: pd.Series, meta: Path, first_row: int = 2) -> pd.Series:
    """Image ids from published file names (extension dropped), checked as pipeline.data.table.clean_id checks
    one: an empty id or a path separator names its row."""
    from pipeline.data.table import _ID_EXTENSION, clean_id

    ids = names.str.strip().str.replace(_ID_EXTENSION, "", regex=True)
    bad = ((ids == "") | ids.str.contains(r"[/\\\x00]") | ids.isin((".", ".."))).to_numpy()
    if bad.any():
        i = int(bad.argmax())
        clean_id(names.iloc[i], f"{meta}: row {i + first_row}")
    return ids


class NoImagesOnDisk(DataError):
    """None of a table's listed images is on disk."""


def _keep_present(frame: pd.DataFrame, image: pd.Series, expected: pd.Series, source: object) -> pd.DataFrame:
    """The rows whose image is on disk (`image`: its path, NaN where absent), with `image` set; a partial download
    (NIH ships 12 archives) warns once naming the first absent image where it was looked for (`expected`); none
    on disk is an error."""
    present = image.notna().to_numpy()
    if not present.any():
        raise NoImagesOnDisk(f"{source}: none of the {len(frame)} listed images is on disk (first: "
                             f"{expected.iloc[0] if len(expected) else '?'}); unpack the images next to the metadata")
    if not present.all():
        logger.warning("%s: %d of %d listed images are not on disk (first: %s); they are left out",
                       source, int((~present).sum()), len(frame), expected.iloc[int((~present).argmax())])
    return frame.loc[present].assign(image=image[present].astype(str)).reset_index(drop=True)


def _finish(frame: pd.DataFrame, layout: str, root: Path, meta: Path, labels: LabelMaps, check_images: bool,
            skip_bad: bool) -> pd.DataFrame:
    """The normalised table (pipeline.data.table.finish_frame) from a layout's frame: age as a number, sex through
    the label maps (a value other than M / F / male / female, VinDr's 'O', is missing)."""
    from pipeline.data.table import Source, finish_frame

    if "age" in frame and frame["age"].dtype == object:
        frame["age"] = _numbers(frame["age"].fillna(""), "age", frame["id"], meta)
    if "sex" in frame:
        key = frame["sex"].fillna("").astype(str).str.strip().str.lower()
        known = {k: labels.map("sex", k, str(meta)) for k in set(key) & {"m", "f", "male", "female"}}
        frame["sex"] = key.map(known)
    return finish_frame(frame, Source(layout, root, meta), check_images, skip_bad)


def _image_paths(folders: Sequence[Path], recursive: bool = False) -> Dict[str, str]:
    """Lower-cased stem -> path of the images in `folders` (one walk each; the first folder wins a stem)."""
    from pipeline.data.table import scan_images

    found: Dict[str, str] = {}
    for folder in reversed(list(folders)):
        found.update(scan_images(folder, recursive))
    return found


def _relative_images(root: Path) -> set:
    """The posix paths, relative to `root`, of every image file below it (one walk)."""
    from pipeline.data.table import walk_images

    return {os.path.relpath(os.path.join(top, name), root).replace(os.sep, "/")
            for top, name in walk_images(root, recursive=True)}


CORNERS = ("x_min", "y_min", "x_max", "y_max")


def _box_frame(image=(), finding=(), corners=((), (), (), ()), reader=None) -> pd.DataFrame:
    """Published boxes as one frame: image, finding, x_min, y_min, x_max, y_max (numbers), reader."""
    frame = pd.DataFrame({"image": np.asarray(image, dtype=object), "finding": np.asarray(finding, dtype=object)})
    for name, values in zip(CORNERS, corners):
        frame[name] = pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce").to_numpy(float)
    frame["reader"] = "consensus" if reader is None else np.asarray(reader, dtype=object)
    return frame


def _attach_boxes(frame: pd.DataFrame, boxes: pd.DataFrame, layout: str, presence: pd.Series,
                  readers: Optional[pd.Series] = None) -> pd.DataFrame:
    """`boxes` (every box as published, by image id), and the localisation targets of the layout's lesion
    findings (nodule_targets): readers' boxes merged by the majority rule where `readers` counts each image's
    readers, else every box a lesion. Only the images in `frame` are visited."""
    boxes = boxes[boxes["image"].isin(set(frame["id"]))]
    coords = [np.char.mod("%g", boxes[c].to_numpy()) for c in CORNERS]
    text = boxes["finding"] + ":" + pd.Series([",".join(t) for t in zip(*coords)], index=boxes.index, dtype=object)
    frame["boxes"] = frame["id"].map(text.groupby(boxes["image"], sort=False).agg(";".join))
    columns: Dict[str, dict] = {"nodule_boxes": {}, "x": {}, "y": {}}
    lesions = boxes[boxes["finding"].isin(NODULE_FINDINGS[layout])]
    for image, group in lesions.groupby("image", sort=False):
        drawn = list(zip(group["finding"], *(group[c] for c in CORNERS)))
        kept = drawn if readers is None else merge_readers(drawn, list(group["reader"]), int(readers.get(image, 1)))
        for key, value in nodule_targets(kept, 1.0).items():
            if key in columns:
                columns[key][image] = value
    for key, values in columns.items():
        frame[key] = frame["id"].map(values)
    frame["presence"] = np.where(frame["nodule_boxes"].notna(), 1.0, presence.to_numpy(dtype=float))
    return frame


def _dicom_facts(frame: pd.DataFrame, check_images: bool, facts: Sequence[str] = ("width", "height", "age", "sex")
                 ) -> pd.DataFrame:
    """Facts only the DICOM headers hold (age, sex, view, patient_id), read with each image's size (one read per
    file, with check_images); a column the table already fills keeps its value. An unreadable file is reported
    when the table's images are probed."""
    from pipeline.data.images import dicom_header

    if not check_images:
        return frame
    values: Dict[str, list] = {k: [] for k in facts}
    for path in frame["image"]:
        try:
            header = dicom_header(path)
        except DataError:
            header = {}
        for k in facts:
            values[k].append(header.get(k, math.nan if k in ("width", "height", "age") else None))
    for k in facts:
        read = pd.Series(values[k], index=frame.index, dtype=float if k in ("width", "height", "age") else object)
        frame[k] = frame[k].where(frame[k].notna() & (frame[k] != ""), read) if k in frame else read
    return frame


def _findings(frame: pd.DataFrame, names: Sequence[str], values: pd.DataFrame) -> pd.DataFrame:
    """One float column per finding (column_name) from `values` (by published name, aligned with `frame`), NaN
    where it has none."""
    for f in names:
        frame[column_name(f)] = values[f].to_numpy(dtype=float) if f in values else math.nan
    return frame


# --------------------------------------------------------------------------------------------------
# NIH ChestX-ray14


def _nih_age(text: pd.Series) -> pd.Series:
    """'58' or the first release's '058Y' in years; months / days ('003M') are under a year."""
    from pipeline.data.images import AGE_UNITS

    parts = text.str.strip().str.upper().str.extract(r"^(\d+)([YMD]?)$")
    return pd.to_numeric(parts[0]) / parts[1].map(AGE_UNITS)


def _nih_boxes(root: Path) -> pd.DataFrame:
    from pipeline.data.table import _find_case_insensitive

    path = _find_case_insensitive(root, NIH_BOXES)
    if path is None:
        return _box_frame()
    # the header 'Bbox [x,y,w,h]' is split by its own commas, and rows end in empty cells
    try:
        table = pd.read_csv(path, header=None, skiprows=1, usecols=range(6), dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read the boxes ({exc}); expected image, finding, x, y, w, h per row") from None
    x, y, w, h = (pd.to_numeric(table[k].str.strip(), errors="coerce") for k in range(2, 6))
    bad = ~np.isfinite(np.column_stack([x, y, w, h]).astype(float)).all(axis=1)
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"{path}: row {i + 2}: box '{','.join(table.iloc[i, 2:6])}' is not four numbers")
    ids = table[0].str.strip().str.replace(r"\.png$", "", regex=True, case=False)
    return _box_frame(ids, table[1].str.strip(), [x, y, x + w, y + h])


def _nih_splits(root: Path) -> Dict[str, str]:
    from pipeline.data.table import _find_case_insensitive

    split: Dict[str, str] = {}
    for name, value in NIH_SPLITS.items():
        path = _find_case_insensitive(root, name)
        if path is not None:
            split.update({Path(line.strip()).stem: value for line in path.read_text().splitlines() if line.strip()})
    return split


def load_nih(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    table = read_table(src.metadata, columns=NIH_COLUMNS)
    _require(table, NIH_COLUMNS, src.metadata)
    table = table.assign(id=_ids(table["Image Index"], src.metadata), row=np.arange(2, len(table) + 2))
    folders = sorted(p for p in src.root.iterdir() if p.is_dir() and p.name.lower().startswith("images"))
    image = table["id"].str.lower().map(_image_paths(folders, recursive=True))
    looked = ", ".join(str(p.relative_to(src.root)) + "/" for p in folders) or "no images*/ folder"
    table = _keep_present(table, image, table["Image Index"].str.strip() + f" (looked for in {looked})", src.root)
    found = table["Finding Labels"].str.replace(r"\s*\|\s*", "|", regex=True).str.strip()
    dummies = found.str.get_dummies("|")
    unknown = [c for c in dummies.columns if c not in NIH_FINDINGS and c != NIH_NO_FINDING]
    if unknown:
        row = table["row"].iloc[int(dummies[unknown[0]].to_numpy().argmax())]
        raise DataError(f"{src.metadata}: row {row}: finding '{unknown[0]}' is not one of ChestX-ray14's "
                        f"{', '.join(NIH_FINDINGS)} or '{NIH_NO_FINDING}'")
    said = (found != "").to_numpy()
    frame = pd.DataFrame({"id": table["id"], "image": table["image"], "age": _nih_age(table["Patient Age"]),
                          "sex": table["Patient Gender"],
                          "patient_id": table["Patient ID"].str.strip().str.lstrip("0").replace("", "0"),
                          "view": table["View Position"].str.strip().str.upper(),
                          "split": table["id"].map(_nih_splits(src.root)),
                          "follow_up": pd.to_numeric(table["Follow-up #"].str.strip(), errors="coerce")})
    values = dummies.reindex(columns=list(NIH_FINDINGS), fill_value=0).astype(float)
    _findings(frame, NIH_FINDINGS, values.where(pd.Series(said, index=values.index), axis=0))
    lesion = dummies.reindex(columns=list(NODULE_FINDINGS["nih"]), fill_value=0).any(axis=1).astype(float)
    frame = _attach_boxes(frame, _nih_boxes(src.root), "nih", lesion.where(said))
    return _finish(frame, "nih", src.root, src.metadata, labels, check_images, skip_bad)


# --------------------------------------------------------------------------------------------------
# CheXpert


def _header(path: Path) -> List[str]:
    """The column names of a CSV's first line ([] when it cannot be read)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return [c.strip() for c in handle.readline().split(",")]
    except (OSError, UnicodeDecodeError):
        return []


def _chexpert_marker(path: Path) -> Optional[Path]:
    """train.csv / valid.csv whose header has CheXpert's `Path` column (a missing other column is named when the
    table is read)."""
    from pipeline.data.table import _find_case_insensitive

    candidates = [path] if path.is_file() else [p for p in (_find_case_insensitive(path, n) for n in CHEXPERT_FILES)
                                                if p is not None]
    for candidate in candidates:
        if candidate.name.lower() in CHEXPERT_FILES and "Path" in _header(candidate):
            return candidate
    return None


def load_chexpert(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """CheXpert's paths start with the archive's folder ('CheXpert-v1.0-small/train/...'): read relative to the
    folder above the data folder; also accepted relative to the data folder, with or without that prefix."""
    from pipeline.data.table import _find_case_insensitive

    parts = []
    for name, split in CHEXPERT_FILES.items():
        path = _find_case_insensitive(src.root, name)
        if path is None:
            continue
        table = read_table(path, columns=CHEXPERT_COLUMNS + CHEXPERT_FINDINGS)
        _require(table, CHEXPERT_COLUMNS + CHEXPERT_FINDINGS, path)
        rel = table["Path"].str.strip()
        patient, study = rel.str.extract(r"patient(\d+)")[0], rel.str.extract(r"study(\d+)")[0]
        bad = (patient.isna() | study.isna()).to_numpy()
        if bad.any():
            i = int(bad.argmax())
            raise DataError(f"{path}: row {i + 2}: path '{rel.iloc[i]}' names no patientNNNNN/studyN folder")
        parts.append(table.assign(split=split, rel=rel, patient="patient" + patient, study="study" + study))
    table = pd.concat(parts, ignore_index=True)
    on_disk = _relative_images(src.root)
    inner = table["rel"].str.split("/", n=1).str[1].fillna("")
    image = pd.Series(np.where(inner.isin(on_disk), str(src.root) + "/" + inner,
                               np.where(table["rel"].isin(on_disk), str(src.root) + "/" + table["rel"], None)),
                      dtype=object)
    table = _keep_present(table, image, str(src.root.parent) + "/" + table["rel"], src.root)
    stem = table["rel"].str.rsplit("/", n=1).str[-1].str.replace(r"\.[^.]*$", "", regex=True)
    frontal = table["Frontal/Lateral"].str.strip().str.lower() == "frontal"
    view = table["AP/PA"].str.strip().str.upper().replace("", "FRONTAL")
    frame = pd.DataFrame({"id": table["patient"] + "_" + table["study"] + "_" + stem, "image": table["image"],
                          "age": table["Age"], "sex": table["Sex"], "patient_id": table["patient"],
                          "study_id": table["study"], "view": view.where(frontal, "LATERAL"),
                          "split": table["split"]})
    values = table[list(CHEXPERT_FINDINGS)].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
    _findings(frame, CHEXPERT_FINDINGS, values)
    return _finish(frame, "chexpert", src.root, src.metadata, labels, check_images, skip_bad)


# --------------------------------------------------------------------------------------------------
# MIMIC-CXR-JPG


def _mimic_table(root: Path, which: str) -> Optional[Path]:
    from pipeline.data.table import _find_case_insensitive

    for suffix in (".csv", ".csv.gz"):
        found = _find_case_insensitive(root, f"{MIMIC_PREFIX}{which}{suffix}")
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
    _require(meta, columns, src.metadata)
    rel = ("p" + meta["subject_id"].str[:2] + "/p" + meta["subject_id"] + "/s" + meta["study_id"] + "/"
           + meta["dicom_id"] + ".jpg")
    files = str(src.root / "files") + "/"
    image = pd.Series(np.where(rel.isin(_relative_images(src.root / "files")), files + rel, None), dtype=object)
    meta = _keep_present(meta, image, files + rel, src.metadata)
    view = meta["ViewPosition"].str.strip().str.upper()
    frame = pd.DataFrame({"id": meta["dicom_id"], "image": meta["image"], "patient_id": meta["subject_id"],
                          "study_id": meta["study_id"], "view": view.where(view != ""), "split": None})
    split_path = _mimic_table(src.root, "split")
    if split_path is not None:
        table = read_table(split_path, columns=("dicom_id", "split"))
        _require(table, ("dicom_id", "split"), split_path)
        split = frame["id"].map(table.drop_duplicates("dicom_id").set_index("dicom_id")["split"])
        frame["split"] = split.where(split.fillna("") != "")
    chexpert = _mimic_table(src.root, "chexpert")
    values = pd.DataFrame(index=frame.index)
    if chexpert is not None:
        table = read_table(chexpert, columns=("subject_id", "study_id") + CHEXPERT_FINDINGS)
        _require(table, ("subject_id", "study_id") + CHEXPERT_FINDINGS, chexpert)
        table = table[table["study_id"].isin(set(frame["study_id"]))].drop_duplicates("study_id", keep="last")
        per_study = table.set_index("study_id")[list(CHEXPERT_FINDINGS)].apply(
            lambda c: pd.to_numeric(c.str.strip(), errors="coerce"))
        values = per_study.reindex(frame["study_id"]).reset_index(drop=True)
    _findings(frame, CHEXPERT_FINDINGS, values)
    return _finish(frame, "mimic", src.root, src.metadata, labels, check_images, skip_bad)


# --------------------------------------------------------------------------------------------------
# VinDr-CXR (and its Kaggle copy, VinBigData: pipeline.data.releases)


def _vindr_file(root: Path, name: str) -> Optional[Path]:
    from pipeline.data.table import _find_case_insensitive

    for folder in (root, root / "annotations"):
        if folder.is_dir():
            found = _find_case_insensitive(folder, name)
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


def _readers(table: pd.DataFrame) -> pd.DataFrame:
    """VinDr's reader column as `rad_id` (the tables spell it rad_id and rad_ID); a table without one (a consensus
    reading) has one reader per image."""
    table.columns = [c if c.lower() != "rad_id" else "rad_id" for c in table.columns]
    if "rad_id" not in table:
        table["rad_id"] = "consensus"
    return table


def _majority(votes: pd.DataFrame, key: str, columns: Sequence[str]) -> pd.DataFrame:
    """Per image, 1 where a strict majority of the image's readers marked the finding (3 readers: 2)."""
    numbers = votes[list(columns)].apply(pd.to_numeric, errors="coerce").fillna(0.0)
    grouped = numbers.groupby(votes[key])
    return (grouped.sum() * 2 > grouped.count()).astype(float)


def read_readings(root: Path, folder: str, box_path: Optional[Path], label_path: Optional[Path],
                  findings: Sequence[str], layout: str) -> pd.DataFrame:
    """The images of one VinDr folder (train/, test/) with their findings by the majority of readers (from the
    image-label table, else from the box table's class names) and their boxes (_attach_boxes, readers merged)."""
    boxes, readers, per_image = _box_frame(), pd.Series(dtype=float), None
    if box_path is not None:
        table = _readers(read_table(box_path))
        _require(table, ("image_id", "class_name") + CORNERS, box_path)
        readers = table.groupby("image_id")["rad_id"].nunique()
        drawn = table[(table[list(CORNERS)] != "").all(axis=1)]
        boxes = _box_frame(drawn["image_id"], drawn["class_name"], [drawn[c] for c in CORNERS], drawn["rad_id"])
        boxes = boxes[np.isfinite(boxes[list(CORNERS)].to_numpy()).all(axis=1)]
        if label_path is None:  # findings from the boxes' class names, by the same majority rule
            votes = pd.crosstab([table["image_id"], table["rad_id"]], table["class_name"]).clip(upper=1).reset_index()
            per_image = _majority(votes, "image_id", [c for c in votes.columns if c not in ("image_id", "rad_id")])
            per_image = per_image.reindex(columns=list(findings), fill_value=0.0)  # a class no reader named: 0
    if label_path is not None:
        table = _readers(read_table(label_path))
        _require(table, ("image_id",), label_path)
        per_image = _majority(table, "image_id", [c for c in table.columns if c not in ("image_id", "rad_id")])
    ids = pd.Series(per_image.index, dtype=object)
    image = ids.str.lower().map(_image_paths([root / folder]))
    frame = _keep_present(pd.DataFrame({"id": ids}), image, str(root / folder) + "/" + ids + ".dicom", root)
    values = per_image.reindex(frame["id"]).reset_index(drop=True)
    _findings(frame, findings, values)
    frame["split"] = folder
    lesion = NODULE_FINDINGS[layout][0]
    presence = values[lesion] if lesion in values else pd.Series(math.nan, index=frame.index)
    return _attach_boxes(frame, boxes, layout, presence, readers)


def load_vindr(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    root = src.metadata.parent.parent if src.metadata.parent.name.lower() == "annotations" else src.metadata.parent
    parts, missing = [], []
    for split in VINDR_SPLITS:
        label_path = _vindr_file(root, f"image_labels_{split}.csv")
        box_path = _vindr_file(root, f"annotations_{split}.csv")
        if label_path is not None or box_path is not None:
            try:
                parts.append(read_readings(root, split, box_path, label_path, VINDR_FINDINGS, "vindr"))
            except NoImagesOnDisk as exc:  # the other folder may hold the images (a partial download)
                missing.append(str(exc))
    if not parts:
        raise DataError(missing[0] if missing else f"{root}: no annotations_train.csv / image_labels_train.csv")
    for text in missing:
        logger.warning("%s", text)
    frame = _dicom_facts(pd.concat(parts, ignore_index=True), check_images)
    return _finish(frame, "vindr", root, src.metadata, labels, check_images, skip_bad)


def _register() -> None:
    from pipeline.data.table import Layout, _file_named, register_layout

    # CheXpert's labeller (and MIMIC-CXR's CheXpert labels) leave a finding the report does not mention blank:
    # Irvin et al.'s U-Ones / U-Zeros read those as negatives
    for name, detect, load, marker, findings, blank, official, stratify in (
            ("nih", _file_named(*NIH_ENTRY), load_nih, NIH_ENTRY[1], NIH_FINDINGS, "missing",
             " / ".join(NIH_SPLITS), "Nodule"),
            ("chexpert", _chexpert_marker, load_chexpert, "train.csv / valid.csv", CHEXPERT_FINDINGS, "negative",
             "valid.csv (scored) beside train.csv", "Lung Lesion"),
            ("mimic", _mimic_marker, load_mimic, f"{MIMIC_PREFIX}metadata.csv(.gz)", CHEXPERT_FINDINGS, "negative",
             f"{MIMIC_PREFIX}split.csv.gz", "Lung Lesion"),
            ("vindr", _vindr_marker, load_vindr, "annotations_train.csv / image_labels_train.csv", VINDR_FINDINGS,
             "missing", "the train/ and test/ folders with their annotations", "Nodule_Mass")):
        register_layout(Layout(name, detect, load, marker, tuple(column_name(f) for f in findings), blank, official,
                               stratify))


_register()
