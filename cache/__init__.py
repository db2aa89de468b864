"""The HDF5 feature cache: its public API. Stages and the library use only what this module exports.

- reading: `FeatureCache(path)` (features, labels, maps, provenance), `CachedFeatures` (a torch Dataset
  for caches larger than memory), `match_spec`, the group names `GROUPS`;
- writing, for stage one: `CacheUpdate(path)` holds the cache's lock, keeps the journal of finished batches
  (`journal()`, then `BatchRecord`s written and read per batch) and writes the whole file at `commit()`
  (`ImageTable`, `NewArray`, root attributes and hashes made here), replacing it atomically;
- patch sets (/patches/<set>): `patch_journal` (their progress, shared by shards), `CacheUpdate.commit_patches`,
  read with FeatureCache.patch_sets();
- shards: `shard_path`, `find_shards`, `merge_shards`; the config file beside a cache: `sidecar_config_path`;
- forked workers: `close_inherited_locks`.

The file's layout is documented in cache/schema.py. Nothing here imports torch or a model library.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.fsutil import atomic_write_text, remove_dead_temporaries

from .journal import BatchRecord, Journal, JournalPlan, discard
from .lock import cache_lock, close_inherited_locks
from .merge import find_shards, merge_shards
from .patches import NewPatchSet, add_patch_set
from .reader import CachedFeatures, FeatureCache, PatchSet, match_spec
from .schema import GROUPS, PATCH_POINTS, EntryKey, ids_sha256, image_set_sha256, labels_sha256
from .writer import CacheContent, ImageTable, NewArray, write_cache

__all__ = ["BatchRecord", "CachedFeatures", "CacheUpdate", "close_inherited_locks", "EntryKey",
           "FeatureCache", "find_shards", "GROUPS", "ids_sha256", "ImageTable", "Journal", "labels_match",
           "labels_sha256", "match_spec", "merge_shards", "NewArray", "NewPatchSet", "PATCH_POINTS", "PatchSet",
           "patch_journal", "shard_path", "sidecar_config_path"]


def shard_path(cache: Path, index: int, count: int) -> Path:
    """The file shard `index` of `count` writes for `cache` (NAME.shard-I-of-N.h5)."""
    return cache.with_name(f"{cache.stem}.shard-{index}-of-{count}{cache.suffix}")


def sidecar_config_path(cache: Path) -> Path:
    """The resolved config written beside a cache (also stored inside it)."""
    return cache.with_name(f"{cache.stem}.config.yaml")


def labels_match(cache: FeatureCache, labels: Dict[str, np.ndarray]) -> bool:
    """Whether a cache holds exactly these label columns."""
    return cache.attrs.get("labels_sha256") == labels_sha256(labels)


class CacheUpdate:
    """A cache opened for update (a context manager): one writer at a time, progress kept per batch, and the
    file replaced whole at commit, so a reader only ever sees a complete cache."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None

    def __enter__(self) -> "CacheUpdate":
        self._lock = cache_lock(self.path)
        self._lock.__enter__()
        remove_dead_temporaries(self.path)  # even a run with nothing to write removes a killed writer's file
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        return self._lock.__exit__(*exc)

    def discard_progress(self) -> None:
        """Forget the finished batches of an earlier, unfinished run (--rebuild)."""
        discard(self.path)

    def journal(self, all_ids: Sequence[str], batch_size: int, shard: Tuple[int, int] = (0, 1)) -> Journal:
        """The progress of this extraction: batches are fixed by the image ids, their count and the batch size."""
        return Journal(self.path, JournalPlan(ids_sha256(list(all_ids)), len(all_ids), batch_size, *shard))

    def commit_patches(self, patch: NewPatchSet) -> None:
        """Write a patch set into the cache (the file replaced whole) and drop its progress."""
        add_patch_set(self.path, patch)
        discard(_patch_progress(self.path, patch.name))

    def commit(self, *, facts: Dict[str, object], all_ids: Sequence[str], images: ImageTable,
               labels: Dict[str, np.ndarray], new: List[NewArray], keep: Dict[str, List[str]],
               fused: Dict[str, List[str]], config_yaml: str, shard: Tuple[int, int] = (0, 1)) -> None:
        """Write the cache: `facts` (tool, packages, data root and layout) plus the hashes that identify the
        image set and the labels; entries in `keep` are copied from the existing file, `new` ones streamed in."""
        root_attrs = {**facts, "n_images": len(all_ids), "ids_sha256": ids_sha256(list(all_ids)),
                      "labels_sha256": labels_sha256(labels), "config": config_yaml,
                      "image_set_sha256": image_set_sha256(images.ids, [h.decode() for h in images.sha256])}
        if shard[1] > 1:
            root_attrs.update(shard_index=shard[0], num_shards=shard[1])
        keep_from = self.path if any(keep.values()) else None
        write_cache(self.path, CacheContent(root_attrs=root_attrs, images=images, labels=labels, new=new,
                                            keep_from=keep_from, keep=keep if keep_from else {}, fused=fused))
        atomic_write_text(sidecar_config_path(self.path), config_yaml)
        discard(self.path)  # the batches are in the file now


def _patch_progress(cache: Path, patch_set: str) -> Path:
    return cache.with_name(f"{cache.name}.patches-{patch_set}")


def patch_journal(cache: Path, patch_set: str, points_sha256: str, n_patches: int, batch_size: int,
                  writer: Tuple[int, int] = (0, 1)) -> Journal:
    """The progress of one patch set's extraction: its own journal beside the cache, batches of images, the same
    for every shard (writer = (index, count): one of several processes filling it at once without the cache's
    lock; the run that commits finds their batches)."""
    return Journal(_patch_progress(Path(cache), patch_set), JournalPlan(points_sha256, n_patches, batch_size), writer)
