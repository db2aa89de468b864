"""Joining the shard files of a distributed extraction into one cache, equal to a single-process run."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Sequence

import numpy as np
import yaml

from pipeline.errors import CacheError

from .reader import FeatureCache, match_spec
from .schema import GROUPS, image_set_sha256, labels_sha256
from .writer import CacheContent, ImageTable, NewArray, write_cache

logger = logging.getLogger(__name__)

#: Rows copied per read while merging, so memory stays flat for any data set size.
MERGE_ROWS = 1024


def find_shards(cache: Path) -> List[Path]:
    """The shard files written for `cache` (name.shard-I-of-N.h5), sorted by index."""
    found = sorted(cache.parent.glob(f"{cache.stem}.shard-*-of-*{cache.suffix}"))
    if not found:
        raise CacheError(f"no shard files {cache.stem}.shard-I-of-N{cache.suffix} next to {cache}; run "
                         "extract-features with --shard-index/--num-shards (or under torchrun / a SLURM array) first")
    return found


def merge_shards(shards: Sequence[Path], out: Path) -> Path:
    """Check that the shards belong together and cover every row once, then write the merged cache."""
    opened = [FeatureCache(p) for p in shards]
    try:
        first = opened[0]
        count = int(first.attrs.get("num_shards", 1) or 1)
        indices = sorted(int(c.attrs.get("shard_index", -1)) for c in opened)
        if count < 2 or indices != list(range(count)):
            raise CacheError(f"need all {count} shards exactly once, got indices {indices} "
                             f"from {', '.join(p.name for p in shards)}")
        for c in opened[1:]:
            for key in ("ids_sha256", "n_images", "num_shards", "config", "dataset_labels_sha256"):
                if c.attrs.get(key) != first.attrs.get(key):
                    raise CacheError(f"shard {c.path.name} does not belong with {first.path.name}: its {key} differs "
                                     "(another data set or configuration)")
            if {s: b.attrs.get("provenance_sha256") for s, b in c.backbones.items()} != \
                    {s: b.attrs.get("provenance_sha256") for s, b in first.backbones.items()}:
                raise CacheError(f"shard {c.path.name} holds other backbones or weights than {first.path.name}")
        n = int(first.attrs["n_images"])
        rows = np.concatenate([c.image_column("row") for c in opened])
        if len(rows) != n or len(np.unique(rows)) != n:
            raise CacheError(f"the shards cover {len(np.unique(rows))} of {n} rows; rerun the missing shards")
        order = np.argsort(rows, kind="stable")

        def gather(column: str) -> np.ndarray:
            return np.concatenate([c.image_column(column) for c in opened])[order]

        ids = [str(i) for i in gather("id")]
        tables = [c.labels() for c in opened]
        label_names = [c for c in tables[0].columns if c not in ("id", "width", "height", "relpath")]
        labels = {name: np.concatenate([t[name].to_numpy() for t in tables])[order] for name in label_names}
        sha = gather("sha256")
        pixels = [c.pixel_hashes for c in opened]  # none in shards written before them
        images = ImageTable(ids=ids, relpaths=[str(p) for p in gather("relpath")], sha256=sha,
                            size_bytes=gather("size_bytes"), mtime_ns=gather("mtime_ns"), width=gather("width"),
                            height=gather("height"), bad=gather("bad"), error=[str(e) for e in gather("error")],
                            pixels=np.concatenate(pixels)[order] if all(p is not None for p in pixels) else None)
        new: List[NewArray] = []
        for group in (GROUPS.features, GROUPS.spatial):
            for spec, entry in first.entries(group).items():
                attrs = {k: v for k, v in entry.attrs.items() if k not in ("complete", "written_utc")}
                new.append(NewArray(group, spec, (n, *entry.shape[1:]), str(first.dataset(group, spec).dtype), attrs,
                                    _merge_filler(opened, group, spec)))
        # The fused arrays the shards' configuration asks for (shards themselves have none).
        config = yaml.safe_load(str(first.attrs.get("config") or "")) or {}
        present = first.entries(GROUPS.features)
        fused = {k: [match_spec(m, present) or m for m in v]  # a member not extracted: no fused array
                 for k, v in config.get("extract", {}).get("fused", {}).items()}
        root_attrs = {k: v for k, v in first.attrs.items()
                      if k not in ("format", "schema_version", "complete", "shard_index", "num_shards", "updated_utc",
                                   "dataset_labels_sha256")}
        root_attrs.update(image_set_sha256=image_set_sha256(ids, [h.decode() for h in sha]),
                          labels_sha256=labels_sha256(labels))
        write_cache(out, CacheContent(root_attrs=root_attrs, images=images, labels=labels, new=new, fused=fused))
    finally:
        for c in opened:
            c.close()
    logger.info("merged %d shards into %s (%d rows)", len(shards), out, n)
    return out


def _merge_filler(opened: Sequence[FeatureCache], group: str, spec: str):
    def fill(ds) -> None:
        for c in opened:
            src = c.dataset(group, spec)
            rows = c.image_column("row")
            for start in range(0, len(rows), MERGE_ROWS):
                block = rows[start:start + MERGE_ROWS]
                ds[block] = src[start:start + len(block)]  # rows are increasing within a shard
    return fill
