"""Stage one's second look, `extract-features --patches CANDIDATES.csv | grid:STRIDE`: every point of the images
cropped at full resolution at each patch size, embedded by the frozen backbones, into the cache's /patches/<set>.

The same guarantees as the pooled features: a rerun with the same points and backbones does nothing, a new backbone
is computed alone, other points under a set's name (or other weights) are refused unless --rebuild, a killed run
resumes from its last finished batch of images and ends with the same patch set, the file is replaced whole.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from cache import BatchRecord, CacheUpdate, FeatureCache, Journal, NewArray, NewPatchSet, patch_journal
from pipeline.config import Config
from pipeline.data.table import load_dataset
from pipeline.errors import CacheError, DataError
from pipeline.features.extraction import Extractor, default_workers, load_backbones, worker_init
from pipeline.features.patches import (CROP_METHOD, ImagePatches, PatchPoints, describe, make_points,
                                       patch_provenance, patch_scale, set_name)
from pipeline.runtime import pick_device
from stages.extract import journal_filler, weights_by_name
from stages.progress import progress as progress_bar

logger = logging.getLogger(__name__)

#: Patches decoded and cropped per loader batch (whole images: an image's patches come from one decode).
PATCHES_PER_BATCH = 256


@dataclass
class PatchSummary:
    cache: Path
    name: str
    n_patches: int = 0
    computed: List[str] = field(default_factory=list)
    up_to_date: List[str] = field(default_factory=list)
    seconds: float = 0.0
    n_computed: int = 0  # patches embedded by this process (resumed batches and other shards' not counted)
    shard: Tuple[int, int] = (0, 1)

    @property
    def patches_per_s(self) -> float:
        return self.n_computed / self.seconds if self.seconds > 0 else 0.0


def image_batches(per_image: Dict[int, np.ndarray]) -> List[np.ndarray]:
    """Consecutive images whose patches (per_image: PatchPoints.per_image) make about PATCHES_PER_BATCH (at least
    one image): fixed by the points alone, so a resumed run embeds every patch in the same company as an
    uninterrupted one."""
    out, current, count = [], [], 0
    for row, at in per_image.items():
        if current and count + len(at) > PATCHES_PER_BATCH:
            out.append(np.array(current))
            current, count = [], 0
        current.append(row)
        count += len(at)
    if current:
        out.append(np.array(current))
    return out


def extract_patches(data: Path, cache: Path, cfg: Config, patches: str, *, name: Optional[str] = None,
                    rebuild: bool = False, progress: bool = True,
                    shard: Optional[Tuple[int, int]] = None) -> PatchSummary:
    """Embed the patches of `patches` (a points CSV or grid:STRIDE) with the config's backbones into the patch
    set `name` of an existing cache of the same images (see the module's docstring). With `shard` (index, count)
    this process embeds the batches b % count == index into the set's journal and writes nothing else; the same
    command without a shard, once every shard is done, finds them all and writes the patch set (the batches are
    the single-process run's, so the file is too)."""
    ecfg = cfg.extract
    cache = Path(cache)
    name = name or set_name(patches)
    if not name or "/" in name:
        raise DataError(f"patch set name '{name}' must be a plain name; pass --patch-set NAME")
    writer = shard or (0, 1)
    if writer[1] > 1 and rebuild:
        raise DataError("--rebuild replaces a patch set in one process: run it without --shard-index/--num-shards")
    table = load_dataset(data, labels=cfg.data.labels)
    points = make_points(patches, table, ecfg.patch_sizes)
    points_sha = points.sha256()
    summary = PatchSummary(cache, name, len(points), shard=writer)
    # shards only add batch files of their own to the journal: the cache's lock is the committing run's
    with CacheUpdate(cache) if writer[1] == 1 else contextlib.nullcontext() as update:
        with FeatureCache(cache) as old:
            if old.ids != table["id"].astype(str).tolist():
                raise CacheError(f"cache {cache} was built from other images than {data}; patches are added to the "
                                 "cache of the same data set")
            hashes, bad = old.image_column("sha256"), old.bad
            existing = old.patch_sets().get(name)
        backbones = load_backbones(ecfg.backbones, weights_by_name(cfg, ecfg.backbones),
                                   ecfg.patch_image_size or ecfg.image_size, ecfg.interpolation, ecfg.normalize,
                                   ecfg.seed)
        provenance = {key: patch_provenance(lb.provenance, points_sha) for key, lb in backbones.items()}
        if existing is not None and existing.attrs.get("points_sha256") != points_sha:
            if not rebuild:
                raise CacheError(f"cache {cache} already holds a patch set '{name}' made from other points; pass "
                                 "--patch-set NEW_NAME to keep both, or --rebuild to replace it")
            existing = None
        keep, pending = [], {}
        for key, lb in backbones.items():
            entry = None if existing is None or rebuild else existing.entries.get(lb.info.spec)
            if entry is None:
                pending[key] = lb
            elif entry.attrs.get("provenance_sha256") != provenance[key]:
                raise CacheError(f"patch set '{name}' of {cache} holds {lb.info.spec} made with other weights or "
                                 "preprocessing; rerun with --rebuild to recompute, or use another --patch-set")
            else:
                keep.append(lb.info.spec)
        summary.up_to_date = keep
        if not pending:
            return summary
        journal = patch_journal(cache, name, points_sha, len(points), PATCHES_PER_BATCH, writer)
        if rebuild:
            journal.clear()
        extractor = Extractor(pending, pick_device(ecfg.device, "extract.device"), ecfg.amp, ecfg.channels_last)
        index = points.per_image()  # image row -> its patches: a batch's patches are one run of rows
        batches = image_batches(index)
        started = time.perf_counter()
        summary.n_computed = _embed(journal, extractor, table["image"].tolist(), points, index, batches, hashes, bad,
                                    provenance, patch_scale(table), ecfg, progress)
        summary.seconds = time.perf_counter() - started
        if writer[1] > 1:
            summary.computed = [lb.info.spec for lb in pending.values()]
            return summary
        spans = [(b, int(index[int(rows[0])][0]), int(index[int(rows[-1])][-1]) + 1) for b, rows in enumerate(batches)]
        new = [NewArray("patches", lb.info.spec, (len(points), lb.info.feature_dim), "f4",
                        {**lb.attrs(extractor.precision), "provenance_sha256": provenance[key],
                         "backbone_provenance": lb.provenance},
                        journal_filler(journal, spans, key)) for key, lb in pending.items()]
        update.commit_patches(NewPatchSet(name, {"source": patches, "points_sha256": points_sha, "crop": CROP_METHOD,
                                                 "sizes": sorted(int(s) for s in np.unique(points.size))},
                                          points.arrays(), keep, new))
    summary.computed = [lb.info.spec for lb in pending.values()]
    logger.info("%s: patch set %s: %s", cache, name, describe(points))
    return summary


def _embed(journal: Journal, extractor: Extractor, paths: List[str], points: PatchPoints,
           index: Dict[int, np.ndarray], batches: List[np.ndarray], hashes: np.ndarray, bad: np.ndarray,
           provenance: Dict[str, str], scale: np.ndarray, ecfg, progress: bool) -> int:
    """Every batch of images the journal lacks (of this writer's share): read, checked against the cache's hashes,
    cropped, embedded; returns the patches embedded."""
    from torch.utils.data import DataLoader

    found = journal.open()
    pending = extractor.backbones
    todo = []
    index_of, count = journal.writer
    for b, rows in enumerate(batches):
        if b % count != index_of:
            continue
        record = journal.load(b, with_features=False) if found else None
        if record is None or any(not record.valid_for(k, provenance[k]) for k in pending):
            todo.append(b)
    share = len(range(index_of, len(batches), count))
    if len(todo) < share:
        logger.info("resuming: %d of %d batches of patches were already done", share - len(todo), share)
    first = next(iter(pending.values()))
    dataset = ImagePatches(paths, points, index, np.concatenate(batches) if batches else [], scale,
                           first.pre.image_size, first.pre.interpolation)
    offsets = np.cumsum([0] + [len(batches[b]) for b in range(len(batches))])
    workers = default_workers() if ecfg.num_workers is None else ecfg.num_workers
    loader = DataLoader(dataset, batch_sampler=[list(range(offsets[b], offsets[b + 1])) for b in todo],
                        num_workers=workers, worker_init_fn=worker_init, collate_fn=list,
                        prefetch_factor=2 if workers > 0 else None)
    n_todo = sum(len(index[r]) for b in todo for r in batches[b])
    with progress_bar(n_todo, f"patches {first.info.spec}", progress, unit="crop") as tick:
        for b, items in zip(todo, loader):
            rows = np.concatenate([index[it.row] for it in items])
            sha = np.concatenate([np.full(len(index[it.row]), it.sha256, dtype="S64") for it in items])
            for it in items:
                if it.error and not bad[it.row]:
                    raise DataError(f"{it.error}; the cache holds this image, so it changed since: rerun "
                                    "extract-features --rebuild")
                if not it.error and it.sha256.encode() != hashes[it.row]:
                    raise CacheError(f"{paths[it.row]} changed since the cache was built; rerun extract-features "
                                     "with --rebuild (its features and patches are stale)")
            crops = np.concatenate([it.patches for it in items])
            ok = np.concatenate([np.full(len(index[it.row]), not it.error) for it in items])
            record = BatchRecord(rows=rows, sha256=sha, pixels=np.zeros(len(rows), "S64"),
                                 size_bytes=np.zeros(len(rows), np.int64), mtime_ns=np.zeros(len(rows), np.int64),
                                 bad=~ok, error=np.array([""] * len(rows), dtype=str))
            for key, lb in pending.items():
                out = np.full((len(rows), lb.info.feature_dim), np.nan, dtype=np.float32)
                out[ok] = extractor.run_batched(key, crops, ecfg.batch_size)
                record.features[key] = (provenance[key], out)
            journal.write(b, record)
            tick(len(rows))
    return n_todo
