"""Writing a cache file: always a complete new file renamed over the old one (copy-on-write).

A reader, a crash or a full disk therefore never sees a half-written cache: either the old file or the
new complete one is there. Features already in the old file are copied, never recomputed.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import h5py
import numpy as np

from pipeline.fsutil import fsync_dir, remove_dead_temporaries, temp_sibling

from .schema import FORMAT, GROUPS, SCHEMA_VERSION, STR, chunk_rows, entry_name, strings, write_attrs

logger = logging.getLogger(__name__)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class ImageTable:
    """Per-row facts about the image files (N rows; for a shard, its rows only)."""

    ids: List[str]
    relpaths: List[str]
    sha256: np.ndarray  # S64
    size_bytes: np.ndarray
    mtime_ns: np.ndarray
    width: np.ndarray
    height: np.ndarray
    bad: np.ndarray
    error: List[str]
    rows: Optional[np.ndarray] = None  # shard files: index of each row in the full data set
    pixels: Optional[np.ndarray] = None  # S64 pixel hashes of the decoded images (caches before them: none)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class NewArray:
    """A dataset to add: `fill(dataset)` streams its values in (e.g. batch by batch from the journal)."""

    group: str  # features | spatial
    spec: str
    shape: tuple
    dtype: str
    attrs: Dict[str, object]
    fill: Callable[[h5py.Dataset], None]


@dataclass
class CacheContent:
    root_attrs: Dict[str, object]
    images: ImageTable
    labels: Dict[str, np.ndarray]
    new: List[NewArray] = field(default_factory=list)
    keep_from: Optional[Path] = None  # an existing cache to copy arrays from
    keep: Dict[str, List[str]] = field(default_factory=dict)  # group -> specs to copy from keep_from
    fused: Dict[str, Sequence[str]] = field(default_factory=dict)


def _write_images(f: h5py.File, images: ImageTable) -> None:
    g = f.create_group(GROUPS.images)
    g.create_dataset("id", data=np.array(images.ids, dtype=object), dtype=STR)
    g.create_dataset("relpath", data=np.array(images.relpaths, dtype=object), dtype=STR)
    g.create_dataset("sha256", data=np.asarray(images.sha256, dtype="S64"))
    g.create_dataset("size_bytes", data=np.asarray(images.size_bytes, dtype=np.int64))
    g.create_dataset("mtime_ns", data=np.asarray(images.mtime_ns, dtype=np.int64))
    g.create_dataset("width", data=np.asarray(images.width, dtype=np.float64))
    g.create_dataset("height", data=np.asarray(images.height, dtype=np.float64))
    g.create_dataset("bad", data=np.asarray(images.bad, dtype=bool))
    g.create_dataset("error", data=np.array(images.error, dtype=object), dtype=STR)
    if images.rows is not None:
        g.create_dataset("row", data=np.asarray(images.rows, dtype=np.int64))
    if images.pixels is not None:
        g.create_dataset("pixels_sha256", data=np.asarray(images.pixels, dtype="S64"))


def _write_labels(f: h5py.File, labels: Dict[str, np.ndarray]) -> None:
    g = f.create_group(GROUPS.labels)
    g.attrs["columns"] = np.array(list(labels), dtype=object)
    for name, values in labels.items():
        values = np.asarray(values)
        if values.dtype.kind in "fiub":
            ds = g.create_dataset(name, data=values.astype(np.float64))
            ds.attrs["kind"] = "numeric"
        else:
            ds = g.create_dataset(name, data=np.array(strings(values), dtype=object), dtype=STR)
            ds.attrs["kind"] = "text"


def add_fused(f: h5py.File, fused: Dict[str, Sequence[str]], n_rows: int) -> None:
    feats = f.get(GROUPS.features)
    for name, members in fused.items():
        if feats is None or not members or not all(entry_name(m) in feats for m in members):
            continue
        dims = [feats[entry_name(m)].shape[1] for m in members]
        layout = h5py.VirtualLayout(shape=(n_rows, sum(dims)), dtype="f4")
        offset = 0
        for member, dim in zip(members, dims):
            # '.' is HDF5 for "this file", so the mapping survives the rename of the temporary file.
            layout[:, offset:offset + dim] = h5py.VirtualSource(".", f"{GROUPS.features}/{entry_name(member)}",
                                                                shape=(n_rows, dim), dtype="f4")
            offset += dim
        ds = f.require_group(GROUPS.fused).create_virtual_dataset(name, layout, fillvalue=np.nan)
        write_attrs(ds, {"members": list(members), "dims": list(dims)})


def write_entry(group: h5py.Group, item: NewArray, n_rows: int) -> None:
    """One new array streamed into `group` under its spec's name: chunks of about CHUNK_BYTES, NaN until filled,
    marked complete once item.fill has written it."""
    chunks = (min(n_rows, chunk_rows(int(np.prod(item.shape[1:])), np.dtype(item.dtype).itemsize)), *item.shape[1:])
    ds = group.create_dataset(entry_name(item.spec), shape=item.shape, dtype=item.dtype,
                              chunks=chunks if n_rows else None, fillvalue=np.nan)
    item.fill(ds)
    write_attrs(ds, {**item.attrs, "complete": True, "written_utc": utc_now()})


def replace_file(path: Path, build: Callable[[h5py.File], None]) -> None:
    """Write a complete new file with `build(f)` to a temporary file next to `path`, then rename it over `path`;
    the root's `complete` is false while build runs and true last (with `updated_utc`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path)  # a killed writer's file, as large as the cache
    tmp = temp_sibling(path)
    try:
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            f.attrs["complete"] = False
            build(f)
            f.attrs["updated_utc"] = utc_now()
            f.attrs["complete"] = True  # last: a file without it was never finished
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_cache(path: Path, content: CacheContent) -> None:
    """Write a complete cache to a temporary file next to `path`, then rename it over `path`; the patch sets of
    the file it keeps arrays from are kept too (they are made from the same images)."""
    n_rows = len(content.images)
    created = utc_now()
    if content.keep_from is not None:
        with h5py.File(content.keep_from, "r") as old:
            created = str(old.attrs.get("created_utc", created))

    def build(f: h5py.File) -> None:
        write_attrs(f, {"format": FORMAT, "schema_version": SCHEMA_VERSION, "created_utc": created,
                        **content.root_attrs})
        _write_images(f, content.images)
        _write_labels(f, content.labels)
        if content.keep_from is not None and any(content.keep.values()):
            with h5py.File(content.keep_from, "r") as old:
                for group, specs in content.keep.items():
                    for spec in specs:
                        old.copy(old[group][entry_name(spec)], f.require_group(group), name=entry_name(spec))
                if GROUPS.patches in old:
                    old.copy(old[GROUPS.patches], f, name=GROUPS.patches)
        for item in content.new:
            write_entry(f.require_group(item.group), item, n_rows)
        add_fused(f, content.fused, n_rows)

    replace_file(path, build)
    logger.debug("wrote cache %s (%d rows)", path, n_rows)
