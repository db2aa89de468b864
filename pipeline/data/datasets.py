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
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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


def read_table(path: Path, where: str = "") -> pd.DataFrame:
    """A published CSV (or .csv.gz) as text cells ('' = empty), with a one-line error for a damaged file."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the table ({exc}){where}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _require(table: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; is this the published file?")


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _keep_present(records: List[dict], source: str) -> List[dict]:
    present = [r for r in records if Path(r["image"]).is_file()]
    if not present:
        raise DataError(f"{source}: none of the {len(records)} listed images is on disk (first: "
                        f"{records[0]['image'] if records else '?'}); unpack the images next to the metadata")
    if len(present) < len(records):
        first = next(r["image"] for r in records if not Path(r["image"]).is_file())
        logger.warning("%s: %d of %d listed images are not on disk (first: %s); they are left out",
                       source, len(records) - len(present), len(records), first)
    return present


def _finish(records: List[dict], layout: str, root: Path, meta: Path, labels: LabelMaps, check_images: bool,
            skip_bad: bool) -> pd.DataFrame:
    """The common table through pipeline.data.table's record checks: each record's JSRT columns empty, its own
    columns (patient_id, view, split, findings, ...) kept as given."""
    from pipeline.data.table import Source, _finish as finish_table, _record

    rows = []
    for i, rec in enumerate(records):
        where = f"{meta}: image {rec['id']}"
        sex = rec.pop("sex", None)
        base = _record(rec.pop("id"), Path(rec.pop("image")), labels, where, grid=None, age=rec.pop("age", None),
                       sex=sex if str(sex).strip().lower() in ("m", "f", "male", "female") else None,
                       x=rec.pop("x", None), y=rec.pop("y", None), presence=rec.pop("presence", None))
        base.update(rec)
        rows.append(base)
    return finish_table(rows, Source(layout, root, meta), check_images, skip_bad)


# --------------------------------------------------------------------------------------------------
# NIH ChestX-ray14


def _nih_age(text: str) -> float:
    """'58' or the first release's '058Y' in years; months / days ('003M') are under a year."""
    text = text.strip().upper()
    match = re.fullmatch(r"(\d+)([YMD]?)", text)
    if not match:
        return math.nan
    value = float(match.group(1))
    return {"": value, "Y": value, "M": value / 12, "D": value / 365}[match.group(2)]


def _nih_images(root: Path) -> Dict[str, Path]:
    from pipeline.data.table import _index_images

    found: Dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower().startswith("images")):
        found.update(_index_images(folder, recursive=True))
    return found


def _nih_boxes(root: Path) -> Dict[str, List[Box]]:
    from pipeline.data.table import _find_case_insensitive, _read_csv_rows

    path = _find_case_insensitive(root, NIH_BOXES)
    if path is None:
        return {}
    boxes: Dict[str, List[Box]] = {}
    # the header 'Bbox [x,y,w,h]' is split by its own commas, and rows end in empty cells
    for n, row in enumerate(_read_csv_rows(path, 6)[1:]):
        cells = [c.strip() for c in row]
        if len(cells) < 6:
            raise DataError(f"{path}: row {n + 2} has {len(cells)} fields, expected image, finding, x, y, w, h")
        x, y, w, h = (_number(c) for c in cells[2:6])
        if not all(map(math.isfinite, (x, y, w, h))):
            raise DataError(f"{path}: row {n + 2}: box '{','.join(cells[2:6])}' is not four numbers")
        boxes.setdefault(Path(cells[0]).stem, []).append((cells[1], x, y, x + w, y + h))
    return boxes


def _nih_splits(root: Path) -> Dict[str, str]:
    from pipeline.data.table import _find_case_insensitive

    split: Dict[str, str] = {}
    for name, value in NIH_SPLITS.items():
        path = _find_case_insensitive(root, name)
        if path is not None:
            split.update({Path(line.strip()).stem: value for line in path.read_text().splitlines() if line.strip()})
    return split


def load_nih(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    from pipeline.data.table import _read_csv_rows, clean_id

    rows = _read_csv_rows(src.metadata, len(NIH_COLUMNS))
    header = [c.strip() for c in rows[0]]
    if tuple(header[:len(NIH_COLUMNS)]) != NIH_COLUMNS:
        raise DataError(f"{src.metadata}: expected the columns {', '.join(NIH_COLUMNS)} first, got "
                        f"{', '.join(header[:len(NIH_COLUMNS)])}")
    images, boxes, split = _nih_images(src.root), _nih_boxes(src.root), _nih_splits(src.root)
    records = []
    for n, row in enumerate(rows[1:]):
        where = f"{src.metadata}: row {n + 2}"
        if len(row) < len(NIH_COLUMNS):
            raise DataError(f"{where}: has {len(row)} fields, expected at least {len(NIH_COLUMNS)}")
        name, found, follow_up, patient, age, sex, view = (c.strip() for c in row[:len(NIH_COLUMNS)])
        ident = clean_id(name, where)
        names = [f.strip() for f in found.split("|") if f.strip()]
        unknown = [f for f in names if f not in NIH_FINDINGS and f != NIH_NO_FINDING]
        if unknown:
            raise DataError(f"{where}: finding '{unknown[0]}' is not one of ChestX-ray14's "
                            f"{', '.join(NIH_FINDINGS)} or '{NIH_NO_FINDING}'")
        drawn = boxes.get(ident, [])
        rec = {"id": ident, "image": str(images.get(ident.lower(), src.root / "images" / name)),
               "age": _nih_age(age), "sex": sex, "patient_id": patient.lstrip("0") or "0", "view": view.upper(),
               "split": split.get(ident), "follow_up": _number(follow_up),
               "boxes": format_boxes(drawn),
               **nodule_targets([b for b in drawn if b[0] in NODULE_FINDINGS["nih"]],
                                float(any(f in names for f in NODULE_FINDINGS["nih"])) if names else math.nan)}
        rec.update({column_name(f): float(f in names) if names else math.nan for f in NIH_FINDINGS})
        records.append(rec)
    return _finish(_keep_present(records, str(src.metadata)), "nih", src.root, src.metadata, labels, check_images,
                   skip_bad)


# --------------------------------------------------------------------------------------------------
# CheXpert


def _chexpert_marker(path: Path) -> Optional[Path]:
    from pipeline.data.table import _find_case_insensitive

    candidates = [path] if path.is_file() else [p for p in (_find_case_insensitive(path, n) for n in CHEXPERT_FILES)
                                                if p is not None]
    for candidate in candidates:
        if candidate.name.lower() not in CHEXPERT_FILES:
            continue
        try:
            with open(candidate, encoding="utf-8-sig") as handle:
                header = [c.strip() for c in handle.readline().split(",")]
        except (OSError, UnicodeDecodeError):
            continue
        if all(c in header for c in CHEXPERT_COLUMNS):
            return candidate
    return None


def _chexpert_image(root: Path, rel: str) -> Path:
    """CheXpert's paths start with the archive's folder ('CheXpert-v1.0-small/train/...'): relative to the
    folder above the data folder; also accepted relative to the data folder, with or without that prefix."""
    parts = Path(rel).parts
    for candidate in (root.parent / rel, root / rel, root.joinpath(*parts[1:]) if len(parts) > 1 else root / rel):
        if candidate.is_file():
            return candidate
    return root.parent / rel


def load_chexpert(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    from pipeline.data.table import _find_case_insensitive

    records = []
    for name, split in CHEXPERT_FILES.items():
        path = _find_case_insensitive(src.root, name)
        if path is None:
            continue
        table = read_table(path)
        _require(table, CHEXPERT_COLUMNS + CHEXPERT_FINDINGS, path)
        for n, cells in enumerate(table.to_dict("records")):
            rel = cells["Path"]
            patient = re.search(r"patient(\d+)", rel)
            study = re.search(r"study(\d+)", rel)
            if patient is None or study is None:
                raise DataError(f"{path}: row {n + 2}: path '{rel}' names no patientNNNNN/studyN folder")
            frontal = cells["Frontal/Lateral"].strip().lower() == "frontal"
            rec = {"id": f"patient{patient.group(1)}_study{study.group(1)}_{Path(rel).stem}",
                   "image": str(_chexpert_image(src.root, rel)), "age": cells["Age"], "sex": cells["Sex"],
                   "patient_id": f"patient{patient.group(1)}", "study_id": f"study{study.group(1)}",
                   "view": (cells["AP/PA"].strip().upper() or "FRONTAL") if frontal else "LATERAL", "split": split}
            rec.update({column_name(f): _number(cells[f]) for f in CHEXPERT_FINDINGS})
            records.append(rec)
    return _finish(_keep_present(records, str(src.root)), "chexpert", src.root, src.metadata, labels, check_images,
                   skip_bad)


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
    meta = read_table(src.metadata)
    _require(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition"), src.metadata)
    findings: Dict[str, Dict[str, float]] = {}
    chexpert = _mimic_table(src.root, "chexpert")
    if chexpert is not None:
        table = read_table(chexpert)
        _require(table, ("subject_id", "study_id") + CHEXPERT_FINDINGS, chexpert)
        for cells in table.to_dict("records"):
            findings[cells["study_id"]] = {column_name(f): _number(cells[f]) for f in CHEXPERT_FINDINGS}
    split: Dict[str, str] = {}
    split_path = _mimic_table(src.root, "split")
    if split_path is not None:
        table = read_table(split_path)
        _require(table, ("dicom_id", "split"), split_path)
        split = dict(zip(table["dicom_id"], table["split"]))
    files = src.root / "files"
    empty = {column_name(f): math.nan for f in CHEXPERT_FINDINGS}
    records = []
    for cells in meta.to_dict("records"):
        subject, study, dicom = cells["subject_id"], cells["study_id"], cells["dicom_id"]
        rec = {"id": dicom, "image": str(files / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"),
               "patient_id": subject, "study_id": study, "view": cells["ViewPosition"].strip().upper() or None,
               "split": split.get(dicom) or None}
        rec.update(findings.get(study, empty))
        records.append(rec)
    return _finish(_keep_present(records, str(src.metadata)), "mimic", src.root, src.metadata, labels, check_images,
                   skip_bad)


# --------------------------------------------------------------------------------------------------
# VinDr-CXR


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


def load_vindr(src, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    from pipeline.data.images import dicom_header

    root = src.metadata.parent.parent if src.metadata.parent.name.lower() == "annotations" else src.metadata.parent
    records = []
    for split in VINDR_SPLITS:
        label_path = _vindr_file(root, f"image_labels_{split}.csv")
        box_path = _vindr_file(root, f"annotations_{split}.csv")
        if label_path is None and box_path is None:
            continue
        boxes: Dict[str, List[Box]] = {}
        drawn_by: Dict[str, List[str]] = {}
        readers: Dict[str, int] = {}
        per_image: Optional[pd.DataFrame] = None
        if box_path is not None:
            table = read_table(box_path)
            table = _readers(table)
            _require(table, ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max"), box_path)
            readers = table.groupby("image_id")["rad_id"].nunique().to_dict()
            for cells in table.to_dict("records"):
                corners = [_number(cells[k]) for k in ("x_min", "y_min", "x_max", "y_max")]
                if all(map(math.isfinite, corners)):
                    boxes.setdefault(cells["image_id"], []).append((cells["class_name"], *corners))
                    drawn_by.setdefault(cells["image_id"], []).append(cells["rad_id"])
            if label_path is None:  # findings from the boxes' class names, by the same majority rule
                votes = pd.crosstab([table["image_id"], table["rad_id"]], table["class_name"]).clip(upper=1)
                votes = votes.reset_index()
                names = [c for c in votes.columns if c not in ("image_id", "rad_id")]
                per_image = _majority(votes, "image_id", names)
        if label_path is not None:
            table = read_table(label_path)
            table = _readers(table)
            _require(table, ("image_id",), label_path)
            names = [c for c in table.columns if c not in ("image_id", "rad_id")]
            per_image = _majority(table, "image_id", names)
        for image_id, votes in per_image.iterrows():
            path = next((root / split / f"{image_id}{s}" for s in (".dicom", ".dcm")
                         if (root / split / f"{image_id}{s}").is_file()), root / split / f"{image_id}.dicom")
            mine = [(b, r) for b, r in zip(boxes.get(image_id, []), drawn_by.get(image_id, []))
                    if b[0] in NODULE_FINDINGS["vindr"]]
            lesions = merge_readers([b for b, _ in mine], [r for _, r in mine], readers.get(image_id, 1))
            finding = NODULE_FINDINGS["vindr"][0]
            rec = {"id": image_id, "image": str(path), "split": split, "boxes": format_boxes(boxes.get(image_id, [])),
                   **nodule_targets(lesions, float(votes[finding]) if finding in votes.index else math.nan)}
            rec.update({column_name(f): float(votes[f]) if f in votes.index else math.nan for f in VINDR_FINDINGS})
            records.append(rec)
    records = _keep_present(records, str(root))
    if check_images:  # age and sex are in the DICOM headers only; the size comes with them (one read per file)
        for rec in records:
            try:
                header = dicom_header(rec["image"])
            except DataError:
                continue  # reported (or skipped with --skip-bad) when the table's images are probed
            rec.update({k: header[k] for k in ("width", "height", "age", "sex")})
    return _finish(records, "vindr", root, src.metadata, labels, check_images, skip_bad)


def _register() -> None:
    from pipeline.data.table import Layout, _file_named, register_layout

    # CheXpert's labeller (and MIMIC-CXR's CheXpert labels) leave a finding the report does not mention blank:
    # Irvin et al.'s U-Ones / U-Zeros read those as negatives
    for name, detect, load, marker, findings, blank in (
            ("nih", _file_named(*NIH_ENTRY), load_nih, NIH_ENTRY[1], NIH_FINDINGS, "missing"),
            ("chexpert", _chexpert_marker, load_chexpert, "train.csv / valid.csv", CHEXPERT_FINDINGS, "negative"),
            ("mimic", _mimic_marker, load_mimic, f"{MIMIC_PREFIX}metadata.csv(.gz)", CHEXPERT_FINDINGS, "negative"),
            ("vindr", _vindr_marker, load_vindr, "annotations_train.csv / image_labels_train.csv", VINDR_FINDINGS,
             "missing")):
        register_layout(Layout(name, detect, load, marker, tuple(column_name(f) for f in findings), blank))


_register()
