"""Writing a patch set into a cache (/patches/<set>, schema.py): the file is rewritten whole, every other group
copied, so a reader never sees half a patch set."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import h5py
import numpy as np

from .schema import GROUPS, entry_name, write_attrs
from .writer import NewArray, add_fused, replace_file, write_entry

logger = logging.getLogger(__name__)


@dataclass
class NewPatchSet:
    """A patch set to write: its points (name -> (P,) array), their identity and where they came from; `keep`:
    backbone specs whose embeddings are copied from the file's set of the same name and points; `new`: the ones
    streamed in (NewArray of group 'patches', shape (P, D))."""

    name: str
    attrs: Dict[str, object]  # source, points_sha256, crop
    points: Dict[str, np.ndarray]
    keep: List[str] = field(default_factory=list)
    new: List[NewArray] = field(default_factory=list)


def add_patch_set(path: Path, patch: NewPatchSet) -> None:
    """Rewrite the cache at `path` with `patch` as its patch set of that name (an older set of the name replaced;
    its `keep` entries copied over)."""
    with h5py.File(path, "r") as old:
        fused = {name: json.loads(ds.attrs["members"]) for name, ds in (old.get(GROUPS.fused) or {}).items()}
        n_rows = len(old[GROUPS.images]["id"])

        def build(f: h5py.File) -> None:
            for key, value in old.attrs.items():
                if key not in ("complete", "updated_utc"):  # replace_file's
                    f.attrs[key] = value
            for name in old:
                if name not in (GROUPS.fused, GROUPS.patches):
                    old.copy(old[name], f, name=name)
            sets = f.create_group(GROUPS.patches)
            for name in old.get(GROUPS.patches) or {}:
                if name != patch.name:
                    old.copy(old[GROUPS.patches][name], sets, name=name)
            g = sets.create_group(patch.name)
            write_attrs(g, {**patch.attrs, "n_patches": len(patch.points["image_row"])})
            for name, values in patch.points.items():
                g.create_dataset(name, data=values)
            for spec in patch.keep:
                old.copy(old[GROUPS.patches][patch.name][entry_name(spec)], g, name=entry_name(spec))
            for item in patch.new:
                write_entry(g, item, len(patch.points["image_row"]))
            add_fused(f, fused, n_rows)

        replace_file(path, build)
    logger.debug("wrote patch set %s of %s", patch.name, path)
