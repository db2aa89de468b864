"""The JSRT database as published: the Kaggle release (jsrt_metadata.csv beside images/) and the original
distribution (*.IMG with CLNDAT_EN.txt / CNNDAT_EN.TXT)."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Tuple

import pandas as pd

from pipeline.data.labels import LabelMaps
from pipeline.data.images import is_raw
from pipeline.data.table import (IMAGE_SUFFIXES, JSRT_GRID, KAGGLE_COLUMNS, KAGGLE_METADATA, Layout, Source, clean_id,
                                 file_named, find_file, finish_records, index_images, inside_root, make_record,
                                 read_csv_rows, read_text, register_layout, row_where)
from pipeline.errors import DataError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# layout 1: Kaggle JSRT (jsrt_metadata.csv + images/ or images/images/)


def _kaggle_image_dir(root: Path) -> Path:
    for candidate in (root / "images" / "images", root / "images"):
        if candidate.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in candidate.iterdir()):
            return candidate
    raise DataError(f"{root}: no images found in images/ or images/images/; unpack the Kaggle archive there")


def _load_kaggle(root: Path, meta: Path, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    rows = read_csv_rows(meta, len(KAGGLE_COLUMNS))
    first = [c.strip().lower() for c in rows[0]]
    if first and first[0] == "study_id":
        header, body, offset = first, rows[1:], 2
        missing = [c for c in KAGGLE_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{meta}: missing column(s) {', '.join(missing)}; expected {','.join(KAGGLE_COLUMNS)}")
        extra = [c for c in header if c not in KAGGLE_COLUMNS]
        if extra:
            logger.warning("%s: ignoring extra column(s) %s", meta, ", ".join(extra))
    else:
        header, body, offset = list(KAGGLE_COLUMNS), rows, 1
    image_dir = _kaggle_image_dir(root)
    images = index_images(image_dir)
    records = []
    for i, row in enumerate(body):
        where = row_where(meta, i + offset)
        if len(row) != len(header):
            raise DataError(f"{where}: has {len(row)} fields, expected {len(header)} ({','.join(header)})")
        fields = {name: cell for name, cell in zip(header, row)}
        ident = clean_id(fields["study_id"], where)
        path = images.get(ident.lower())
        if path is None:
            raise DataError(f"{where}: image '{ident}' not found in {image_dir}")
        path = inside_root(root, path, where)
        records.append(make_record(
            ident, path, labels, where, grid=(JSRT_GRID, JSRT_GRID), subtlety=fields["subtlety"],
            state=fields["state"], position=fields["position"], diagnosis=fields["diagnosis"],
            x=fields["x"], y=fields["y"], size=fields["size"], age=fields["age"], sex=fields["sex"]))
    return finish_records(records, Source("kaggle", root, meta), check_images, skip_bad)


# --------------------------------------------------------------------------------------------------
# layout 2: the original JSRT distribution (*.IMG + CLNDAT_EN.txt / CNNDAT_EN.TXT)

_RECORD_START = re.compile(r"(JPC[LN]N\d{3}(?:\.IMG)?)", re.IGNORECASE)
_NODULE_FIELDS = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*(.*)$", re.DOTALL)
_POSITION = re.compile(r"^\s*((?:[lr]\s*\.\s*(?:upper|middle|lower)\s+lobe(?:\s*\([^)]*\))?)|left lung|right lung)",
                       re.IGNORECASE)


def _split_records(text: str) -> Iterable[Tuple[str, str]]:
    """Split a JSRT clinical list into (file name, rest) records, even where line breaks are missing."""
    parts = _RECORD_START.split(text)
    for i in range(1, len(parts), 2):
        yield parts[i], parts[i + 1]


def _load_jsrt(root: Path, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    nodule_list = find_file(root, "CLNDAT_EN.txt")
    normal_list = find_file(root, "CNNDAT_EN.TXT")
    images = {stem: path for stem, path in index_images(root, recursive=True).items() if is_raw(path)}
    records = []
    for meta in (nodule_list, normal_list):
        if meta is None:
            continue
        for n, (name, rest) in enumerate(_split_records(read_text(meta))):
            ident = clean_id(name, row_where(meta))
            where = f"{meta}: record {n + 1} ({ident})"
            path = images.get(ident.lower())
            if path is None:
                raise DataError(f"{where}: image {ident}.IMG not found under {root}")
            path = inside_root(root, path, where)
            rest = rest.strip()
            if meta is nodule_list:
                match = _NODULE_FIELDS.match(rest)
                if not match:
                    raise DataError(f"{where}: expected subtlety, size, age, sex, x, y, state, position and "
                                    f"diagnosis, got '{rest[:80]}'")
                subtlety, size, age, sex, x, y, state, tail = match.groups()
                position, diagnosis = _split_position(tail, where)
                records.append(make_record(ident, path, labels, where, grid=(JSRT_GRID, JSRT_GRID),
                                           subtlety=subtlety, state=state, position=position, diagnosis=diagnosis,
                                           x=x, y=y, size=size, age=age, sex=sex))
            else:
                tokens = rest.split()
                if len(tokens) < 3:
                    raise DataError(f"{where}: expected age, sex and 'non-nodule', got '{rest[:80]}'")
                records.append(make_record(ident, path, labels, where, grid=(JSRT_GRID, JSRT_GRID),
                                           age=tokens[0], sex=tokens[1], state=tokens[2]))
    source = Source("jsrt", root, nodule_list or normal_list)
    return finish_records(records, source, check_images, skip_bad)


def _split_position(tail: str, where: str) -> Tuple[str, str]:
    """Split 'l.upper lobe(S1+2)<ws>lung cancer(adenocarcinoma)' into position and diagnosis."""
    if "\t" in tail.strip():
        cells = [c.strip() for c in tail.split("\t") if c.strip()]
        return cells[0], " ".join(cells[1:])
    match = _POSITION.match(tail)
    if not match:
        raise DataError(f"{where}: cannot find the nodule position at the start of '{tail.strip()[:60]}'")
    return match.group(1), tail[match.end():].strip()


register_layout(Layout("kaggle", file_named(KAGGLE_METADATA),
                       lambda src, maps, check, skip: _load_kaggle(src.root, src.metadata, maps, check, skip),
                       KAGGLE_METADATA))
register_layout(Layout("jsrt", file_named("CLNDAT_EN.txt", "CNNDAT_EN.TXT"),
                       lambda src, maps, check, skip: _load_jsrt(src.root, maps, check, skip),
                       "CLNDAT_EN.txt / CNNDAT_EN.TXT"))
