"""What the field's data-set layouts share (pipeline/data/layouts/: NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG,
VinDr-CXR and the Kaggle releases), on the public API of pipeline.data.table.

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
    named by require_columns), with a one-line error for a damaged file."""
    wanted = None if columns is None else {c.lower() for c in columns}
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, index_col=False,
                            usecols=None if wanted is None else (lambda c: str(c).strip().lower() in wanted))
    except (OSError, ValueError, pd.errors.ParserError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the table ({exc}){where}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def require_columns(table: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; is this the published file?")


def parse_numbers(values: pd.Series, field: str, ids: pd.Series, meta: Path) -> pd.Series:
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


def image_ids(names: pd.Series, meta: Path, first_row: int = 2) -> pd.Series:
    """Image ids from published file names (extension dropped), checked as pipeline.data.table.clean_id checks
    one: an empty id or a path separator names its row."""
    from pipeline.data.table import ID_EXTENSION, clean_id

    ids = names.str.strip().str.replace(ID_EXTENSION, "", regex=True)
    bad = ((ids == "") | ids.str.contains(r"[/\\\x00]") | ids.isin((".", ".."))).to_numpy()
    if bad.any():
        i = int(bad.argmax())
        clean_id(names.iloc[i], f"{meta}: row {i + first_row}")
    return ids


class NoImagesOnDisk(DataError):
    """None of a table's listed images is on disk."""


def keep_present(frame: pd.DataFrame, image: pd.Series, expected: pd.Series, source: object) -> pd.DataFrame:
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


def finish_field(frame: pd.DataFrame, layout: str, root: Path, meta: Path, labels: LabelMaps, check_images: bool,
                 skip_bad: bool) -> pd.DataFrame:
    """The normalised table (pipeline.data.table.finish_frame) from a layout's frame: age as a number, sex through
    the label maps (a value other than M / F / male / female, VinDr's 'O', is missing)."""
    from pipeline.data.table import Source, finish_frame

    if "age" in frame and frame["age"].dtype == object:
        frame["age"] = parse_numbers(frame["age"].fillna(""), "age", frame["id"], meta)
    if "sex" in frame:
        key = frame["sex"].fillna("").astype(str).str.strip().str.lower()
        known = {k: labels.map("sex", k, str(meta)) for k in set(key) & {"m", "f", "male", "female"}}
        frame["sex"] = key.map(known)
    return finish_frame(frame, Source(layout, root, meta), check_images, skip_bad)


def image_paths(folders: Sequence[Path], recursive: bool = False) -> Dict[str, str]:
    """Lower-cased stem -> path of the images in `folders` (one walk each; the first folder wins a stem)."""
    from pipeline.data.table import scan_images

    found: Dict[str, str] = {}
    for folder in reversed(list(folders)):
        found.update(scan_images(folder, recursive))
    return found


def relative_images(root: Path) -> set:
    """The posix paths, relative to `root`, of every image file below it (one walk)."""
    from pipeline.data.table import walk_images

    return {os.path.relpath(os.path.join(top, name), root).replace(os.sep, "/")
            for top, name in walk_images(root, recursive=True)}


CORNERS = ("x_min", "y_min", "x_max", "y_max")


def box_frame(image=(), finding=(), corners=((), (), (), ()), reader=None) -> pd.DataFrame:
    """Published boxes as one frame: image, finding, x_min, y_min, x_max, y_max (numbers), reader."""
    frame = pd.DataFrame({"image": np.asarray(image, dtype=object), "finding": np.asarray(finding, dtype=object)})
    for name, values in zip(CORNERS, corners):
        frame[name] = pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce").to_numpy(float)
    frame["reader"] = "consensus" if reader is None else np.asarray(reader, dtype=object)
    return frame


def attach_boxes(frame: pd.DataFrame, boxes: pd.DataFrame, lesion_findings: Sequence[str], presence: pd.Series,
                 readers: Optional[pd.Series] = None) -> pd.DataFrame:
    """`boxes` (every box as published, by image id), and the localisation targets of its `lesion_findings`
    (nodule_targets): readers' boxes merged by the majority rule where `readers` counts each image's readers, else
    every box a lesion. Only the images in `frame` are visited."""
    boxes = boxes[boxes["image"].isin(set(frame["id"]))]
    coords = [np.char.mod("%g", boxes[c].to_numpy()) for c in CORNERS]
    text = boxes["finding"] + ":" + pd.Series([",".join(t) for t in zip(*coords)], index=boxes.index, dtype=object)
    frame["boxes"] = frame["id"].map(text.groupby(boxes["image"], sort=False).agg(";".join))
    columns: Dict[str, dict] = {"nodule_boxes": {}, "x": {}, "y": {}}
    lesions = boxes[boxes["finding"].isin(lesion_findings)]
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


def dicom_facts(frame: pd.DataFrame, check_images: bool, facts: Sequence[str] = ("width", "height", "age", "sex")
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


def set_findings(frame: pd.DataFrame, names: Sequence[str], values: pd.DataFrame) -> pd.DataFrame:
    """One float column per finding (column_name) from `values` (by published name, aligned with `frame`), NaN
    where it has none."""
    for f in names:
        frame[column_name(f)] = values[f].to_numpy(dtype=float) if f in values else math.nan
    return frame


def unlabelled_images(root: Path, folder: str, known: pd.Series) -> pd.DataFrame:
    """The images of a challenge's test folder that no table lists: kept without labels or split."""
    paths = image_paths([root / folder], recursive=True)
    ids = sorted(set(paths) - set(known.str.lower()))
    return pd.DataFrame({"id": [Path(paths[i]).stem for i in ids], "image": [paths[i] for i in ids]})


def csv_header(path: Path) -> List[str]:
    """The column names of a CSV's first line ([] when it cannot be read)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return [c.strip() for c in handle.readline().split(",")]
    except (OSError, UnicodeDecodeError):
        return []


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
                  findings: Sequence[str], lesion_findings: Sequence[str]) -> pd.DataFrame:
    """The images of one VinDr folder (train/, test/) with their findings by the majority of readers (from the
    image-label table, else from the box table's class names) and their boxes (attach_boxes, readers merged)."""
    boxes, readers, per_image = box_frame(), pd.Series(dtype=float), None
    if box_path is not None:
        table = _readers(read_table(box_path))
        require_columns(table, ("image_id", "class_name") + CORNERS, box_path)
        readers = table.groupby("image_id")["rad_id"].nunique()
        drawn = table[(table[list(CORNERS)] != "").all(axis=1)]
        boxes = box_frame(drawn["image_id"], drawn["class_name"], [drawn[c] for c in CORNERS], drawn["rad_id"])
        boxes = boxes[np.isfinite(boxes[list(CORNERS)].to_numpy()).all(axis=1)]
        if label_path is None:  # findings from the boxes' class names, by the same majority rule
            votes = pd.crosstab([table["image_id"], table["rad_id"]], table["class_name"]).clip(upper=1).reset_index()
            per_image = _majority(votes, "image_id", [c for c in votes.columns if c not in ("image_id", "rad_id")])
            per_image = per_image.reindex(columns=list(findings), fill_value=0.0)  # a class no reader named: 0
    if label_path is not None:
        table = _readers(read_table(label_path))
        require_columns(table, ("image_id",), label_path)
        per_image = _majority(table, "image_id", [c for c in table.columns if c not in ("image_id", "rad_id")])
    ids = pd.Series(per_image.index, dtype=object)
    image = ids.str.lower().map(image_paths([root / folder]))
    frame = keep_present(pd.DataFrame({"id": ids}), image, str(root / folder) + "/" + ids + ".dicom", root)
    values = per_image.reindex(frame["id"]).reset_index(drop=True)
    set_findings(frame, findings, values)
    frame["split"] = folder
    lesion = lesion_findings[0]
    presence = values[lesion] if lesion in values else pd.Series(math.nan, index=frame.index)
    return attach_boxes(frame, boxes, lesion_findings, presence, readers)
