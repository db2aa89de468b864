"""A generic manifest: manifest.csv with an `image` column (paths absolute or relative to it) and any label columns.
Detected last, so a manifest.csv beside a data set's own files is not what names it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import pandas as pd

from pipeline.data.labels import LabelMaps
from pipeline.data.table import (MANIFEST_NAME, Layout, Source, clean_id, find_file, finish_records, inside_root,
                                 make_record, parse_number, read_csv_rows, register_layout, row_where)
from pipeline.errors import DataError

# --------------------------------------------------------------------------------------------------
# layout 3: a generic manifest (an `image` column plus any label columns)

_MANIFEST_ALIASES = {"size": "size_mm", "path": "image", "file": "image", "study_id": "id"}


def load_manifest(meta: Path, labels: LabelMaps, check_images: bool, skip_bad: bool = False) -> pd.DataFrame:
    root = meta.parent
    rows = read_csv_rows(meta, 2)
    header = [_MANIFEST_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in rows[0]]
    if "image" not in header:
        raise DataError(f"{meta}: a manifest needs an 'image' column (image paths: absolute, or relative to {root})")
    if len(set(header)) != len(header):
        raise DataError(f"{meta}: duplicate column names in the header {rows[0]}")
    known = {"id", "image", "subtlety", "state", "presence", "lobe", "position", "diagnosis", "x", "y",
             "size_mm", "age", "sex", "grid_w", "grid_h"}
    extra = [c for c in header if c not in known]
    records = []
    for i, row in enumerate(rows[1:]):
        where = row_where(meta, i + 2)
        if len(row) != len(header):
            raise DataError(f"{where}: has {len(row)} fields, expected {len(header)} ({','.join(header)})")
        fields = dict(zip(header, (cell.strip() for cell in row)))
        rel = fields["image"]
        if not rel:
            raise DataError(f"{where}: empty image path")
        # an absolute path is the user's own reference (archives are read in place); a relative one stays inside
        path = Path(rel).resolve() if Path(rel).is_absolute() else inside_root(root, root / rel, where)
        if not path.is_file():
            raise DataError(f"{where}: image '{rel}' not found (relative paths are relative to {root})")
        ident = clean_id(fields.get("id") or Path(rel).stem, where)
        grid = None
        if fields.get("grid_w") or fields.get("grid_h"):
            grid = (parse_number(fields.get("grid_w"), "grid_w", where),
                    parse_number(fields.get("grid_h"), "grid_h", where))
        rec = make_record(ident, path, labels, where, grid=grid, subtlety=fields.get("subtlety"),
                          state=fields.get("state"), presence=fields.get("presence"), lobe=fields.get("lobe"),
                          position=fields.get("position"), diagnosis=fields.get("diagnosis"), x=fields.get("x"),
                          y=fields.get("y"), size=fields.get("size_mm"), age=fields.get("age"), sex=fields.get("sex"))
        for col in extra:
            rec[col] = _extra_value(fields[col])
        records.append(rec)
    return finish_records(records, Source("manifest", root, meta), check_images, skip_bad)


def _extra_value(text: str) -> Union[float, str, None]:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _detect_manifest(path: Path) -> Optional[Path]:
    if path.is_file():
        return path if path.suffix.lower() == ".csv" else None
    return find_file(path, MANIFEST_NAME)


def _load_manifest_layout(src: Source, maps: LabelMaps, check: bool, skip: bool) -> pd.DataFrame:
    return load_manifest(src.metadata, maps, check, skip)


register_layout(Layout("manifest", _detect_manifest, _load_manifest_layout, MANIFEST_NAME))
