"""The data layer: one `load_dataset(path)` for the Kaggle JSRT layout, the original JSRT distribution
and a generic manifest CSV, returning one normalised table (a row per image).

Columns of the table (a label that does not exist for an image is missing, never 0):

==============  ==============================================================================
id              image id (file name without extension, e.g. JPCLN001)
image           absolute path of the image file
width, height   stored image size in pixels
grid_w, grid_h  the coordinate grid that x and y refer to (2048 for JSRT, whatever the stored size)
subtlety        1 (extremely subtle) .. 5 (obvious), float with NaN for no nodule
state           malignant / benign / non-nodule
presence        1 nodule, 0 none (float; NaN when unknown)
lobe            RUL RML RLL LUL LLL, or L / R when only the lung is named (configs/labels.yaml)
diagnosis       diagnosis group (configs/labels.yaml)
x, y            nodule centre in pixels of the grid
size_mm         nodule diameter in mm
age, sex        patient age in years, male / female
position_text   the free text behind `lobe`
diagnosis_text  the free text behind `diagnosis`
==============  ==============================================================================
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pandas as pd

from pipeline.data.images import probe_image
from pipeline.data.labels import LabelMaps, load_label_maps, normalise_text
from pipeline.errors import DataError
from pipeline.plugins import LAYOUTS

logger = logging.getLogger(__name__)

JSRT_GRID = 2048
KAGGLE_METADATA = "jsrt_metadata.csv"
KAGGLE_COLUMNS = ("study_id", "subtlety", "size", "age", "sex", "x", "y", "state", "position", "diagnosis")
MANIFEST_NAME = "manifest.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".img", ".dcm", ".dicom")

COLUMNS = ("id", "image", "width", "height", "grid_w", "grid_h", "subtlety", "state", "presence", "lobe",
           "diagnosis", "x", "y", "size_mm", "age", "sex", "position_text", "diagnosis_text")
NUMERIC_COLUMNS = ("width", "height", "grid_w", "grid_h", "subtlety", "presence", "x", "y", "size_mm", "age")
TEXT_COLUMNS = ("state", "lobe", "diagnosis", "sex", "position_text", "diagnosis_text")
#: Columns describing where an image lives rather than what it shows.
FILE_COLUMNS = ("id", "image", "width", "height")


@dataclass(frozen=True)
class Source:
    """Where a table came from: the layout, its data folder and metadata file."""

    layout: str  # a key of LAYOUTS
    root: Path
    metadata: Path


# --------------------------------------------------------------------------------------------------
# small parsers shared by the layouts


def row_where(meta: Path, row: Optional[int] = None) -> str:
    return f"{meta}" if row is None else f"{meta}: row {row}"


#: Cell texts that mean "no value" in a numeric field.
MISSING_TEXT = ("", "?", "nan", "na", "n/a", "none", "null")


def parse_number(value: object, field: str, where: str, integer: bool = False) -> float:
    """Parse a numeric field; empty, '?' and 'nan' are missing (NaN), anything else must be a number."""
    if value is None:
        return math.nan
    text = str(value).strip()
    if text.lower() in MISSING_TEXT:
        return math.nan
    try:
        number = float(text)
    except ValueError:
        raise DataError(f"{where}: {field} '{text}' is not a number; fix the value or leave it empty") from None
    if not math.isfinite(number):
        raise DataError(f"{where}: {field} '{text}' is not a finite number")
    if integer and number != int(number):
        raise DataError(f"{where}: {field} '{text}' must be a whole number")
    return number


ID_EXTENSION = re.compile(r"\.(png|jpe?g|tiff?|bmp|img|dcm|dicom)$", re.IGNORECASE)


def clean_id(raw: str, where: str) -> str:
    """An image id without its extension; ids that could name another folder are refused."""
    ident = ID_EXTENSION.sub("", str(raw).strip())
    if not ident:
        raise DataError(f"{where}: empty image id")
    if "/" in ident or "\\" in ident or ident in (".", "..") or "\x00" in ident:
        raise DataError(f"{where}: image id '{raw}' contains a path separator; ids must be plain file names")
    return ident


def inside_root(root: Path, path: Path, where: str) -> Path:
    """Resolve `path` (following symlinks) and refuse it unless it stays inside `root`."""
    resolved = path.resolve()
    root_resolved = root.resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise DataError(f"{where}: image path '{path}' leads outside the data folder {root} "
                        "(a '../' path or a symlink); name it by its absolute path in a manifest, or copy it into "
                        "the folder")
    return resolved


def walk_images(folder: Path, recursive: bool = False) -> Iterator[Tuple[str, str]]:
    """(folder, file name) of every image file in a folder (below it with `recursive`), in sorted order, hidden
    files left out: one walk, plain strings (a download of 377,000 files)."""
    if not folder.is_dir():
        return
    walk = os.walk(folder) if recursive else [(str(folder), [], [e.name for e in os.scandir(folder) if e.is_file()])]
    for top, dirs, files in walk:
        dirs.sort()
        for name in sorted(files):
            stem, dot, suffix = name.rpartition(".")
            if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES and not name.startswith("."):
                yield top, name


def scan_images(folder: Path, recursive: bool = False) -> Dict[str, str]:
    """Lower-cased file stem -> path of every image file walk_images finds; the first of two with one stem wins."""
    found: Dict[str, str] = {}
    for top, name in walk_images(folder, recursive):
        found.setdefault(name.rpartition(".")[0].lower(), os.path.join(top, name))
    return found


def index_images(folder: Path, recursive: bool = False) -> Dict[str, Path]:
    """Map lower-cased file stem -> path for the image files in a folder (case-insensitive lookup)."""
    return {stem: Path(path) for stem, path in scan_images(folder, recursive).items()}


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
        if path.suffix.lower() == ".gz":  # MIMIC-CXR ships its tables gzipped
            import gzip

            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise DataError(f"{path}: not a text file")  # pragma: no cover - latin-1 decodes anything


def _sniff_delimiter(first_line: str, expected_fields: int) -> str:
    """The delimiter of a CSV from its first line: ',' unless ';', tab or '|' splits it as expected."""
    for delim in (",", ";", "\t", "|"):
        if first_line.count(delim) >= expected_fields - 1:
            return delim
    return ","


def read_csv_rows(path: Path, expected_fields: int) -> List[List[str]]:
    text = read_text(path)
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: the metadata file is empty")
    first = next(line for line in lines if line.strip())
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_sniff_delimiter(first, expected_fields))
    return [row for row in reader if any(cell.strip() for cell in row)]


# --------------------------------------------------------------------------------------------------
# the record every layout produces


def make_record(ident: str, image: Path, labels: LabelMaps, where: str, *, grid: Optional[Tuple[float, float]],
                subtlety=None, state=None, presence=None, lobe=None, position=None, diagnosis=None,
                x=None, y=None, size=None, age=None, sex=None) -> dict:
    state_cls = labels.map("state", state, where)
    pres = parse_number(presence, "presence", where)
    if state_cls is not None and math.isnan(pres):
        pres = 0.0 if state_cls == "non-nodule" else 1.0
    if not math.isnan(pres) and pres not in (0.0, 1.0):
        raise DataError(f"{where}: presence '{presence}' must be 0 or 1")
    lobe_cls = _class_or_map(labels, "lobe", lobe, where) if lobe not in (None, "") else \
        labels.map("lobe", position, where)
    rec = {
        "id": ident,
        "image": str(image),
        "subtlety": parse_number(subtlety, "subtlety", where, integer=True),
        "state": state_cls,
        "presence": pres,
        "lobe": lobe_cls,
        "diagnosis": _class_or_map(labels, "diagnosis", diagnosis, where),
        "x": parse_number(x, "x", where),
        "y": parse_number(y, "y", where),
        "size_mm": parse_number(size, "size", where),
        "age": parse_number(age, "age", where),
        "sex": labels.map("sex", sex, where),
        "position_text": _text(position),
        "diagnosis_text": _text(diagnosis),
        "grid_w": grid[0] if grid else math.nan,
        "grid_h": grid[1] if grid else math.nan,
        "row_where": where,  # names the record in finish_frame's errors
    }
    return rec


def _text(value: object) -> Optional[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = re.sub(r"\s+", " ", str(value).strip())
    return text or None


def _class_or_map(labels: LabelMaps, field: str, value: object, where: str) -> Optional[str]:
    """Accept a class name as it is (a manifest may hold 'RUL'), else map a free-text spelling."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    by_lower = {c.lower(): c for c in labels.classes[field]}
    key = normalise_text(value)
    if key in by_lower:
        return by_lower[key]
    return labels.map(field, value, where)


#: The table's value rules: (column, offending rows of a frame, message of one value).
_RULES = (
    ("subtlety", lambda f: ~f["subtlety"].between(1, 5) & f["subtlety"].notna(), "subtlety {v:g} is outside 1-5"),
    ("size_mm", lambda f: f["size_mm"] <= 0, "size {v:g} mm must be positive"),
    ("age", lambda f: ~f["age"].between(0, 130) & f["age"].notna(), "age {v:g} is outside 0-130"),
    ("x", lambda f: (f["x"] < 0) | (f["x"] >= f["grid_w"]), "x {v:g} is outside the {grid_w:g}-pixel coordinate grid"),
    ("y", lambda f: (f["y"] < 0) | (f["y"] >= f["grid_h"]), "y {v:g} is outside the {grid_h:g}-pixel coordinate grid"),
)


def _check_ranges(frame: pd.DataFrame, meta: Path) -> None:
    """Every value rule over every row at once; the first offending row is named (its `row_where`, else its id)."""
    for column, offends, message in _RULES:
        bad = offends(frame).to_numpy()
        if bad.any():
            row = frame.iloc[int(bad.argmax())]
            where = row["row_where"] if isinstance(row.get("row_where"), str) else f"{meta}: image {row['id']}"
            raise DataError(f"{where}: " + message.format(v=row[column], grid_w=row["grid_w"], grid_h=row["grid_h"]))


def finish_records(records: List[dict], source: Source, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """The table of a layout that builds one record per image (make_record)."""
    return finish_frame(pd.DataFrame.from_records(records), source, check_images, skip_bad)


def finish_frame(frame: pd.DataFrame, source: Source, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    """The normalised table from a layout's frame (a row per image; any of COLUMNS it lacks are missing): unique
    ids, each image's size from its header (unless the layout read it), the coordinate grid, the value rules."""
    if frame.empty:
        raise DataError(f"{source.metadata}: no images listed; nothing to load")
    frame = frame.reset_index(drop=True)
    repeated = frame["id"].duplicated(keep=False).to_numpy()
    if repeated.any():
        first = frame["id"].iloc[int(repeated.argmax())]
        entries = np.flatnonzero(frame["id"].to_numpy() == first)[:2] + 1
        raise DataError(f"{source.metadata}: duplicate image id '{first}' (entries {entries[0]} and {entries[1]}); "
                        "ids must be unique")
    for col in COLUMNS:
        if col not in frame:
            frame[col] = None if col in TEXT_COLUMNS else math.nan
    for col in NUMERIC_COLUMNS:
        frame[col] = frame[col].astype("float64")
    if not check_images:
        frame["width"] = frame["height"] = math.nan
    else:  # a layout that read the image's header has set its size
        width, height = frame["width"].to_numpy(copy=True), frame["height"].to_numpy(copy=True)
        images = frame["image"].to_numpy()
        for i in np.flatnonzero(np.isnan(width)):
            try:
                width[i], height[i] = probe_image(images[i])
            except DataError as exc:
                if not skip_bad:
                    raise DataError(f"{exc}, or pass --skip-bad to record it as unreadable") from None
                logger.warning("%s (kept as unreadable: --skip-bad)", exc)
                width[i], height[i] = 0, 0
        frame["width"], frame["height"] = width, height
    # no separate coordinate grid: coordinates are in image pixels (an unreadable image has none)
    own = frame["grid_w"].isna() & (frame["width"] > 0)
    frame.loc[own, "grid_w"] = frame.loc[own, "width"]
    frame.loc[own, "grid_h"] = frame.loc[own, "height"]
    _check_ranges(frame, source.metadata)
    extra = [c for c in frame.columns if c not in COLUMNS and c != "row_where"]
    table = frame[list(COLUMNS) + extra].copy()
    for col in TEXT_COLUMNS:
        table[col] = table[col].astype(object).where(table[col].notna(), None)
    table.attrs.update(layout=source.layout, root=str(source.root), metadata=str(source.metadata))
    logger.info("loaded %d images (%s layout) from %s", len(table), source.layout, source.root)
    return table


# --------------------------------------------------------------------------------------------------
# the registry of layouts


@dataclass(frozen=True)
class Layout:
    """A data set's published layout: how to recognise it and load it into the normalised table.

    `detect(path)` gets the folder (or a CSV file) the user named and returns the metadata file that marks the
    layout (`marker` names it, for errors), or None; `load(source, maps, check_images, skip_bad)` returns the
    table. `findings` are the label columns of the layout's multi-label task `findings` (train.tasks: [findings]);
    `blank` what a blank finding cell means under data.blank: auto ('negative' where the data set's labeller leaves
    unmentioned findings blank, as CheXpert's; 'missing' where a blank says nothing). `official` names where the
    data set's own split comes from ('' where it publishes none: eval.protocol official refuses it), `stratify`
    the column eval.stratify 'auto' stratifies the folds on (default: the first finding, else JSRT's state).
    """

    name: str
    detect: Callable[[Path], Optional[Path]]
    load: Callable[[Source, LabelMaps, bool, bool], pd.DataFrame]
    marker: str
    findings: Tuple[str, ...] = ()
    blank: str = "missing"
    official: str = ""
    stratify: str = ""


def register_layout(layout: Layout) -> Layout:
    """Register a layout under its name (pipeline.plugins.LAYOUTS, whose declaration gives the detection order)."""
    return LAYOUTS.register(layout.name, layout)


def blank_meaning(layout: str, policy: str) -> str:
    """What a blank finding cell is (data.blank): the policy, or with 'auto' the layout's convention."""
    entry = LAYOUTS.get(layout)
    return policy if policy != "auto" else entry.blank if entry is not None else "missing"


def stratify_column(layout: str) -> str:
    """The column eval.stratify 'auto' names for a layout: its own choice, its first finding, else 'state'."""
    entry = LAYOUTS.get(layout)
    if entry is None:
        return "state"
    return entry.stratify or (entry.findings[0] if entry.findings else "state")


def official_source(layout: str) -> str:
    """Where a layout's official split comes from ('' where the data set publishes none)."""
    entry = LAYOUTS.get(layout)
    return entry.official if entry is not None else ""


def task_groups(layout: str) -> Dict[str, Tuple[str, ...]]:
    """The multi-label tasks a layout declares (its findings), by task name; {} for layouts without."""
    entry = LAYOUTS.get(layout)
    return {"findings": entry.findings} if entry is not None and entry.findings else {}


def find_file(root: Path, name: str) -> Optional[Path]:
    """The file `name` directly in `root`, in any case; None where there is none."""
    for path in root.iterdir():
        if path.name.lower() == name.lower() and path.is_file():
            return path
    return None


def file_named(*names: str) -> Callable[[Path], Optional[Path]]:
    """A detector: the folder holds (or the path is) a file with one of these names (any case)."""
    def detect(path: Path) -> Optional[Path]:
        if path.is_file():
            return path if path.name.lower() in {n.lower() for n in names} else None
        for name in names:
            found = find_file(path, name)
            if found is not None:
                return found
        return None
    return detect


# --------------------------------------------------------------------------------------------------
# entry point


def detect_layout(path: Union[str, os.PathLike]) -> Source:
    """Recognise the layout of a data path (a folder, or a metadata CSV file)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data path does not exist")
    path = path.resolve()
    if path.is_file() and not path.name.lower().endswith((".csv", ".csv.gz", ".txt")):
        raise DataError(f"{path}: expected a data folder or a manifest .csv")
    if path.is_dir() and not any(path.iterdir()):
        raise DataError(f"{path}: the data folder is empty")
    found = _detect(path)
    if found is not None:
        return found
    # a download's own folder one level down (the folder above CheXpert-v1.0-small/, an archive unpacked in place)
    below = [s for s in (_detect(p) for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith("."))
             if s is not None] if path.is_dir() else []
    if len(below) == 1:
        logger.info("%s: reading the %s data set in %s", path, below[0].layout, below[0].root)
        return below[0]
    if below:
        raise DataError(f"{path}: holds several data sets ({', '.join(f'{s.root.name}/ ({s.layout})' for s in below)});"
                        " name one of those folders as --data")
    markers = ", ".join(f"{layout.marker} ({name})" for name, layout in LAYOUTS.items())
    raise DataError(f"{path}: no {markers} found, here or one folder down; see README 'Data'")


def _detect(path: Path) -> Optional[Source]:
    for layout in LAYOUTS.values():
        marker = layout.detect(path)
        if marker is not None:
            return Source(layout.name, marker.parent, marker)
    return None


def load_dataset(path: Union[str, os.PathLike], labels: Union[LabelMaps, str, None] = None,
                 check_images: bool = True, skip_bad: bool = False) -> pd.DataFrame:
    """Load a data set into the normalised table described in this module's docstring.

    `labels` is a LabelMaps or the path of a labels YAML (default configs/labels.yaml).
    With `check_images`, every image header is read (size, readability) before anything else runs; an
    unreadable one is an error, or with `skip_bad` a warning (its size is recorded as 0 x 0).
    """
    maps = labels if isinstance(labels, LabelMaps) else load_label_maps(labels)
    source = detect_layout(path)
    table = LAYOUTS[source.layout].load(source, maps, check_images, skip_bad)
    table.attrs["task_groups"] = {k: list(v) for k, v in task_groups(source.layout).items()}
    return table
