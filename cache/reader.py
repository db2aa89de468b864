"""Reading a feature cache: the small API stage two (and anyone else) uses."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import h5py
import numpy as np
import pandas as pd

from pipeline.errors import CacheError
from pipeline.registry import registered_spec

from .schema import (FEATURE_JSON_KEYS, FORMAT, GROUPS, PATCH_POINTS, ROOT_JSON_KEYS, SCHEMA_VERSION, entry_name,
                     entry_spec, read_attrs)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedBackbone:
    """One backbone's entry in a cache: its spec, feature shape and provenance attributes."""

    spec: str
    group: str
    shape: tuple
    attrs: Dict[str, object]

    @property
    def dim(self) -> int:
        return int(self.shape[1])


def _damaged(path: Path, why: str) -> CacheError:
    return CacheError(f"cache {path} is damaged or incomplete ({why}); delete it or rerun extract-features "
                      "with --rebuild")


def match_spec(name: str, specs) -> Optional[str]:
    """The stored spec (of `specs`) that `name` names: itself, a registered short name's spec, or a spec
    without its weights tag; None if none matches. Needs no model library."""
    if name in specs:
        return name
    if ":" not in name:
        name = registered_spec(name) or ""
        if not name or name in specs:
            return name or None
    if "." in name.split(":", 1)[-1]:  # a tag was given: only that tag matches
        return None
    untagged = [s for s in specs if s.split(".", 1)[0] == name]
    return untagged[0] if len(untagged) == 1 else None


#: Rows of a feature matrix read at once (a progress tick each; the read goes straight into the result).
READ_BLOCK_BYTES = 256 << 20
#: The buffer of rows read as stored when the result holds another type (float16), converted by numpy.
CONVERT_BLOCK_BYTES = 64 << 20


def _text_column(ds: h5py.Dataset) -> pd.Series:
    """A stored text column as pandas infers it ('' is missing), converted while it is the only column of Python
    strings (all of them held as str objects until the frame was built: reading 200k rows peaked 186 MB above
    the start, one at a time 125 MB)."""
    values = ds.asstr()[...].astype(object)
    values[values == ""] = None
    return pd.Series(values)


class FeatureCache:
    """Read-only view of a cache file. Use as a context manager, or call close()."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"cache {self.path} does not exist; create it with extract-features --data DIR "
                             f"--cache {self.path}")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise _damaged(self.path, f"HDF5 cannot open it: {str(exc).splitlines()[0][:120]}") from None
        try:
            self.attrs = read_attrs(self._f, ROOT_JSON_KEYS)
            if self.attrs.get("format") != FORMAT:
                raise CacheError(f"{self.path} is not a feature cache of this project (format "
                                 f"'{self.attrs.get('format', '?')}')")
            version = int(self.attrs.get("schema_version", -1))
            if version > SCHEMA_VERSION:
                raise CacheError(f"cache {self.path} has schema version {version}, newer than this code "
                                 f"({SCHEMA_VERSION}); upgrade the package")
            if version < SCHEMA_VERSION:
                raise CacheError(f"cache {self.path} has the old schema version {version}; rebuild it with "
                                 "extract-features --rebuild")
            if not self.attrs.get("complete"):
                raise _damaged(self.path, "it was never finished")
            self.ids: List[str] = list(self._f[GROUPS.images]["id"].asstr()[...])
        except CacheError:
            self._f.close()
            raise
        except (KeyError, OSError, ValueError) as exc:
            self._f.close()
            raise _damaged(self.path, str(exc).splitlines()[0][:120]) from None

    # -------------------------------------------------------------------------------- basics

    def __enter__(self) -> "FeatureCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_shard(self) -> bool:
        return int(self.attrs.get("num_shards", 1) or 1) > 1

    def entries(self, group: str = GROUPS.features) -> Dict[str, CachedBackbone]:
        g = self._f.get(group)
        if g is None:
            return {}
        return {entry_spec(name): CachedBackbone(entry_spec(name), group, g[name].shape,
                                                 read_attrs(g[name], FEATURE_JSON_KEYS)) for name in g}

    @property
    def backbones(self) -> Dict[str, CachedBackbone]:
        return self.entries(GROUPS.features)

    def made_as(self, spec: str, provenance_sha256: str, group: str = GROUPS.features) -> Optional[bool]:
        """Whether the cached entry of `spec` can be reused for a backbone of this provenance (the same weights
        and preprocessing: the one rule of stage one and predict); None where there is no entry."""
        entry = self.entries(group).get(spec)
        return None if entry is None else entry.attrs.get("provenance_sha256") == provenance_sha256

    def dataset(self, group: str, spec: str) -> h5py.Dataset:
        """The raw HDF5 dataset (for streaming large arrays without loading them)."""
        return self._f[group][entry_name(spec)]

    def fused_names(self) -> List[str]:
        return list(self._f.get(GROUPS.fused) or [])

    def image_column(self, name: str) -> np.ndarray:
        ds = self._f[GROUPS.images][name]
        return ds.asstr()[...] if ds.dtype.kind == "O" else ds[...]

    @property
    def pixel_hashes(self) -> Optional[np.ndarray]:
        """Each row's decoded-image hash (S64, b'' where unreadable), or None in a cache written before them."""
        g = self._f[GROUPS.images]
        return g["pixels_sha256"][...] if "pixels_sha256" in g else None

    @property
    def bad(self) -> np.ndarray:
        return self._f[GROUPS.images]["bad"][...]

    def labels(self) -> pd.DataFrame:
        """The label table stored with the features (id first; missing text is None, missing numbers NaN)."""
        g = self._f[GROUPS.labels]
        if "columns" not in g.attrs:
            raise _damaged(self.path, "its labels lack their column list")
        columns = [c.decode() if isinstance(c, bytes) else str(c) for c in g.attrs["columns"]]
        data: Dict[str, object] = {"id": pd.Series(self.ids)}
        for name in columns:
            ds = g[name]
            data[name] = _text_column(ds) if ds.attrs.get("kind") == "text" else ds[...]
        table = pd.DataFrame(data)
        table["width"] = self._f[GROUPS.images]["width"][...]
        table["height"] = self._f[GROUPS.images]["height"][...]
        table["relpath"] = _text_column(self._f[GROUPS.images]["relpath"])
        return table

    # ------------------------------------------------------------------------------ features

    def resolve(self, name: str, group: str = GROUPS.features) -> str:
        """The spec under which `name` (a short name or spec) is stored; a CacheError lists what is there."""
        present = self.entries(group)
        # the spec itself, a registered short name, or a spec without its weights tag: no model library needed
        found = match_spec(name, present)
        if found:
            return found
        what = "spatial maps" if group == GROUPS.spatial else "features"
        have = ", ".join(present) or "none"
        raise CacheError(f"cache {self.path} has no {what} of '{name}' (it has: {have}); add them with: "
                         + self.add_command([name], spatial=group == GROUPS.spatial))

    def add_command(self, names: Sequence[str], spatial: bool = False) -> str:
        """The extract-features command that adds `names` to this cache, so that it runs as printed (offline
        too): a backbone already cached in another form keeps its weights (a file as --weights NAME=FILE); a
        new one gets the cache's weights kind (none / imagenet) when all its backbones share one."""
        known: Dict[str, str] = {}
        for group in (GROUPS.features, GROUPS.spatial):
            known.update({spec: str(e.attrs.get("weights")) for spec, e in self.entries(group).items()})
        kinds = set(known.values())
        common = next(iter(kinds)) if len(kinds) == 1 and kinds <= {"none", "imagenet"} else None
        flags = []
        for name in names:
            spec = match_spec(name, known)
            weights = known.get(spec) if spec else common
            if weights in ("none", "imagenet"):
                flags.append(f"--weights {weights}")
            elif weights:
                flags.append(f"--weights {name}={weights}")
        backbones = " ".join(f"--backbone {n}" for n in names)
        weights_flags = "".join(f" {f}" for f in dict.fromkeys(flags))
        return (f"extract-features --data {self.attrs.get('data_root', 'DATA')} --cache {self.path} {backbones}"
                f"{weights_flags}{' --spatial' if spatial else ''}")

    def features(self, names: Sequence[str], dtype=np.float32,
                 progress: Optional[Callable[[int], None]] = None, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The named backbones' features side by side, (N, sum D) in `dtype` (float32, or float16 to halve the
        memory), in the order given: HDF5 reads (and converts) straight into one array, no second copy, in
        blocks of rows (`progress(rows)` after each); `out`: that array, given (several caches read into the rows
        of one matrix)."""
        if self.is_shard:
            raise CacheError(f"{self.path} is shard {self.attrs.get('shard_index')} of "
                             f"{self.attrs.get('num_shards')}; join the shards with: extract-features merge "
                             f"--cache <merged.h5> {self.path.name} ...")
        specs = [self.resolve(n) for n in names]
        g = self._f[GROUPS.features]
        sets = [g[entry_name(s)] for s in specs]
        n = len(self.ids)
        if out is None:
            out = np.empty((n, sum(int(ds.shape[1]) for ds in sets)), dtype=dtype)
        col = 0
        for ds in sets:
            width = int(ds.shape[1])
            # another type (float16 held): read as stored into a small buffer and let numpy convert (HDF5's own
            # conversion to half floats is element by element: 1M x 768 in 5.9 s against 2.9 s)
            rows = max(1, CONVERT_BLOCK_BYTES // (4 * width))
            buffer = None if ds.dtype == out.dtype else np.empty((rows, width), dtype=ds.dtype)
            step = max(1, READ_BLOCK_BYTES // (4 * width)) if buffer is None else len(buffer)
            for start in range(0, n, step):
                stop = min(n, start + step)
                if buffer is None:
                    ds.read_direct(out, np.s_[start:stop, :], np.s_[start:stop, col:col + width])
                else:
                    ds.read_direct(buffer, np.s_[start:stop, :], np.s_[:stop - start, :])
                    out[start:stop, col:col + width] = buffer[:stop - start]
                if progress is not None:
                    progress(stop - start)
            col += width
        return out

    def fused(self, name: str) -> np.ndarray:
        g = self._f.get(GROUPS.fused)
        if g is None or name not in g:
            raise CacheError(f"cache {self.path} has no fused array '{name}'")
        return g[name][...]

    def patch_sets(self) -> Dict[str, PatchSet]:
        """Every patch set of the cache (extract-features --patches), by name."""
        out = {}
        for name, g in (self._f.get(GROUPS.patches) or {}).items():
            points = {k: g[k][...] for k in PATCH_POINTS}
            entries = {entry_spec(k): CachedBackbone(entry_spec(k), GROUPS.patches, g[k].shape,
                                                     read_attrs(g[k], FEATURE_JSON_KEYS))
                       for k in g if k not in PATCH_POINTS}
            out[name] = PatchSet(name, read_attrs(g), points, entries)
        return out

    def patch_features(self, patch_set: str, spec: str) -> np.ndarray:
        """(P, D) float32 embeddings of one backbone's patches of a set."""
        return self._f[GROUPS.patches][patch_set][entry_name(spec)][...]

    def spatial(self, name: str, rows: Optional[np.ndarray] = None) -> np.ndarray:
        spec = self.resolve(name, GROUPS.spatial)
        ds = self._f[GROUPS.spatial][entry_name(spec)]
        return ds[...] if rows is None else ds[np.sort(rows)]


@dataclass(frozen=True)
class PatchSet:
    """A patch set's points (name -> (P,) array: image_row, x, y, size, score, rank), its attributes (source,
    points_sha256, crop) and its backbones' entries (spec -> CachedBackbone of shape (P, D))."""

    name: str
    attrs: Dict[str, object]
    points: Dict[str, np.ndarray]
    entries: Dict[str, CachedBackbone]


class CachedFeatures:
    """A map-style dataset over a cache's rows for torch DataLoaders: (features, row index).

    The file is opened lazily in each process that reads (HDF5 handles must not cross a fork), so
    DataLoader workers each open their own read-only handle; nothing is loaded up front.
    """

    def __init__(self, path: Path, names: Sequence[str]):
        self.path = Path(path)
        with FeatureCache(self.path) as cache:
            self.specs = [cache.resolve(n) for n in names]
            self.n = len(cache)
        self._handle: Optional[h5py.File] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return self.n

    def _file(self) -> h5py.File:
        import os

        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._handle

    def __getitem__(self, row: int):
        f = self._file()
        return np.concatenate([f[GROUPS.features][entry_name(s)][row] for s in self.specs]).astype(np.float32), row

    def __getstate__(self) -> Dict[str, object]:
        state = dict(self.__dict__)
        state["_handle"], state["_pid"] = None, None  # never pickle an open HDF5 handle
        return state
