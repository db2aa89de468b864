"""Stage one, `extract-features`: frozen backbones over every image, once, into the HDF5 cache.

Guarantees (README "Guarantees"): a rerun with the same inputs does nothing; a new backbone is computed
alone; changed weights, preprocessing or images are refused (or recomputed with --rebuild), never mixed;
a killed run resumes from its last finished batch and ends with the same cache as an uninterrupted run;
the cache file is replaced whole, so it is always consistent; one writer at a time.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from cache import (GROUPS, BatchRecord, CacheUpdate, EntryKey, FeatureCache, ImageTable, Journal, NewArray,
                   labels_match, labels_sha256, shard_path)
from pipeline import __version__
from pipeline.configio import dump_config
from pipeline.config import Config
from pipeline.data.table import FILE_COLUMNS, load_dataset
from pipeline.errors import CacheError, ConfigError
from pipeline.features.extraction import Extractor, LoadedBackbone, load_backbones
from pipeline.fsutil import sha256_file
from pipeline.runtime import pick_device
from stages.progress import progress as progress_bar

logger = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    cache: Path
    computed: List[str] = field(default_factory=list)
    up_to_date: List[str] = field(default_factory=list)
    n_images: int = 0
    n_computed_images: int = 0
    n_bad: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.n_computed_images / self.seconds if self.seconds > 0 else 0.0


def shard_from_env() -> Optional[Tuple[int, int]]:
    """(index, count) from torchrun (RANK/WORLD_SIZE) or a SLURM array, when one of them has several workers."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1") or 1) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_ARRAY_TASK_COUNT", "1") or 1) > 1:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return None


def label_columns(table: pd.DataFrame) -> Dict[str, np.ndarray]:
    """Every column of the data table except where the image lives."""
    return {c: table[c].to_numpy() for c in table.columns if c not in FILE_COLUMNS}


def package_versions() -> Dict[str, str]:
    import platform

    import h5py
    import timm
    import torch
    import torchvision

    return {"resmtnet-pipeline": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def weights_by_name(cfg: Config, names: Sequence[str]) -> Dict[str, str]:
    unknown = sorted(set(cfg.extract.weights_for) - set(names))
    if unknown:
        raise ConfigError(f"extract.weights_for names backbone(s) {', '.join(unknown)} that are not requested "
                          f"({', '.join(names)})")
    return {n: cfg.extract.weights_for.get(n, cfg.extract.weights) for n in names}


# --------------------------------------------------------------------------------------------------
# what the data set looks like now


@dataclass
class Images:
    """The rows this run writes (all rows, or a shard's), with their file facts as of now."""

    ids: List[str]
    paths: List[str]
    size: np.ndarray
    mtime: np.ndarray


@dataclass
class Existing:
    """What an existing cache file means for this run."""

    pending: Dict[EntryKey, LoadedBackbone]
    up_to_date: List[str] = field(default_factory=list)
    keep: Dict[str, List[str]] = field(default_factory=dict)
    hashes: Optional[np.ndarray] = None
    pixels: Optional[np.ndarray] = None
    bad: Optional[np.ndarray] = None
    error: Optional[np.ndarray] = None
    labels_changed: bool = True
    fused_missing: bool = True

    @property
    def nothing_to_do(self) -> bool:
        return not self.pending and not self.labels_changed and not self.fused_missing


def _check_images(old: FeatureCache, now: Images) -> np.ndarray:
    """Refuse an existing cache built from other images; returns its per-row content hashes."""
    if old.ids != now.ids:
        added = len(set(now.ids) - set(old.ids))
        removed = len(set(old.ids) - set(now.ids))
        raise CacheError(f"cache {old.path} was built from another image set ({added} images added, "
                         f"{removed} removed, or a different order); rerun with --rebuild or use another --cache")
    hashes = old.image_column("sha256")
    touched = np.flatnonzero((old.image_column("size_bytes") != now.size) | (old.image_column("mtime_ns") != now.mtime))
    changed = [now.ids[r] for r in touched if sha256_file(now.paths[r]).encode() != hashes[r]]
    if changed:
        raise CacheError(f"{len(changed)} image(s) changed since cache {old.path} was built (e.g. {changed[0]}); "
                         "rerun with --rebuild to recompute every backbone, or use another --cache")
    return hashes


def _mismatch(cached: Dict[str, object], lb: LoadedBackbone) -> str:
    """Say what differs between a cached backbone entry and the requested one."""
    if cached.get("params_sha256") != lb.info.params_sha256:
        return (f"the weights differ (cached: {cached.get('weights_id')}, "
                f"params {str(cached.get('params_sha256'))[:12]}; "
                f"requested: {lb.info.weights_id}, params {lb.info.params_sha256[:12]})")
    pre = cached.get("preprocess") or {}
    diffs = [f"{k} {pre.get(k)} -> {list(v) if isinstance(v, tuple) else v}" for k, v in lb.pre.as_dict().items()
             if pre.get(k) != (list(v) if isinstance(v, tuple) else v)]
    if cached.get("stage") != lb.stage:
        diffs.append(f"stage {cached.get('stage')} -> {lb.stage}")
    return "the preprocessing differs (" + ", ".join(diffs) + ")" if diffs else "its provenance differs"


def _compare(out_path: Path, now: Images, labels: Dict[str, np.ndarray], backbones: Dict[str, LoadedBackbone],
             fused: Dict[str, List[str]], sharded: bool) -> Existing:
    if not out_path.exists():
        return Existing(pending=dict(backbones))
    with FeatureCache(out_path) as old:
        if old.is_shard != sharded:
            raise CacheError(f"{out_path} is {'a shard file' if old.is_shard else 'not a shard file'}; "
                             "use another --cache (shards are joined with extract-features merge)")
        state = Existing(pending={}, hashes=_check_images(old, now), pixels=old.pixel_hashes, bad=old.bad,
                         error=old.image_column("error").astype(object))
        state.labels_changed = not labels_match(old, labels)
        cached = {EntryKey.of(group, spec): entry for group in (GROUPS.features, GROUPS.spatial)
                  for spec, entry in old.entries(group).items()}
        for key, lb in backbones.items():
            reusable = old.made_as(lb.info.spec, lb.provenance, lb.group)
            if reusable is None:
                state.pending[key] = lb
            elif not reusable:
                what = "spatial maps" if lb.group == GROUPS.spatial else "features"
                raise CacheError(f"cache {out_path} already holds {lb.info.spec} {what}, but "
                                 f"{_mismatch(cached[key].attrs, lb)}; rerun with --rebuild to recompute, or use "
                                 "another --cache")
            else:
                state.up_to_date.append(lb.name)
        state.keep = {group: [k.spec for k in cached if k.group == group and k not in state.pending]
                      for group in (GROUPS.features, GROUPS.spatial)}
        available = {k.spec for k in cached if k.group == GROUPS.features} | \
            {lb.info.spec for lb in state.pending.values() if lb.group == GROUPS.features}
        present = set(old.fused_names())
        state.fused_missing = any(name not in present and set(members) <= available
                                  for name, members in fused.items())
    return state


# --------------------------------------------------------------------------------------------------
# the stage


def extract_features(data: Path, cache: Path, cfg: Config, *, rebuild: bool = False, skip_bad: bool = False,
                     shard: Optional[Tuple[int, int]] = None, progress: bool = True) -> ExtractSummary:
    """Compute the requested backbones' features for every image of `data` into `cache` (see module doc)."""
    ecfg = cfg.extract
    if ecfg.batch_size < 1:
        raise ConfigError(f"extract.batch_size must be at least 1, got {ecfg.batch_size}")
    if not ecfg.backbones:
        raise ConfigError("no backbone requested; pass --backbone NAME (e.g. densenet161)")
    shard_index, num_shards = shard or (0, 1)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ConfigError(f"shard index {shard_index} is outside 0..{num_shards - 1}")
    cache = Path(cache)
    out_path = shard_path(cache, shard_index, num_shards) if num_shards > 1 else cache

    table = load_dataset(data, labels=cfg.data.labels, skip_bad=skip_bad)
    root = Path(table.attrs["root"])
    n = len(table)
    batch_size = ecfg.batch_size
    # Batch boundaries depend only on the row order and the batch size, so a resumed run, a sharded run and
    # an uninterrupted run feed every image to the backbone in the same company (same numerics, bit for bit).
    all_batches = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    mine = [b for b in range(len(all_batches)) if b % num_shards == shard_index]
    rows = np.concatenate([all_batches[b] for b in mine]) if mine else np.zeros(0, dtype=np.int64)
    all_ids = table["id"].tolist()
    paths = [table["image"].iloc[r] for r in rows]
    stats = [os.stat(p) for p in paths]
    now = Images(ids=[all_ids[r] for r in rows], paths=paths,
                 size=np.array([st.st_size for st in stats], dtype=np.int64),
                 mtime=np.array([st.st_mtime_ns for st in stats], dtype=np.int64))
    labels = {k: v[rows] for k, v in label_columns(table).items()}
    fused = {name: _resolve_all(members) for name, members in ecfg.fused.items()} if num_shards == 1 else {}
    summary = ExtractSummary(cache=out_path, n_images=len(rows))

    with CacheUpdate(out_path) as update:
        backbones = load_backbones(ecfg.backbones, weights_by_name(cfg, ecfg.backbones), ecfg.image_size,
                                   ecfg.interpolation, ecfg.normalize, ecfg.seed, ecfg.spatial)
        if rebuild:
            update.discard_progress()
            state = Existing(pending=dict(backbones))
        else:
            state = _compare(out_path, now, labels, backbones, fused, num_shards > 1)
        summary.up_to_date = state.up_to_date
        if state.nothing_to_do:
            logger.debug("cache %s is up to date (%s)", out_path, ", ".join(state.up_to_date))
            return summary

        position = np.full(n, -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        new_arrays: List[NewArray] = []
        if state.pending:
            journal = update.journal(all_ids, batch_size, (shard_index, num_shards))
            extractor = Extractor(state.pending, pick_device(ecfg.device, "extract.device"), ecfg.amp,
                                  ecfg.channels_last, ecfg.decode)
            sha, pixels, bad, error = _compute(journal, extractor, table["image"].tolist(), position,
                                               {b: all_batches[b] for b in mine}, now, ecfg.num_workers, skip_bad,
                                               progress, summary)
            if state.hashes is not None and not np.array_equal(state.hashes[~bad], sha[~bad]):
                raise CacheError(f"images changed while {out_path} was being extended; rerun with --rebuild")
            spans = [(b, int(position[all_batches[b][0]]), int(position[all_batches[b][-1]]) + 1) for b in mine]
            for key, lb in state.pending.items():
                new_arrays.append(NewArray(lb.group, lb.info.spec, (len(rows), *extractor.output_shape(key)),
                                           lb.dtype, lb.attrs(extractor.precision),
                                           journal_filler(journal, spans, key)))
        else:
            logger.info("updating the labels and fused arrays of %s (features unchanged)", out_path)
            sha, pixels, bad, error = state.hashes, state.pixels, state.bad, state.error
        summary.n_bad = int(bad.sum())
        if summary.n_bad:
            logger.warning("%d unreadable image(s) recorded as bad (features NaN), e.g. %s", summary.n_bad,
                           error[np.flatnonzero(bad)[0]])

        images = ImageTable(ids=now.ids, relpaths=[_relpath(p, root) for p in paths], sha256=sha,
                            size_bytes=now.size, mtime_ns=now.mtime, width=table["width"].to_numpy()[rows],
                            height=table["height"].to_numpy()[rows], bad=bad, error=[str(e) for e in error],
                            rows=rows if num_shards > 1 else None, pixels=pixels)
        facts = {"tool_version": __version__, "packages": package_versions(), "data_root": str(root),
                 "data_layout": table.attrs["layout"]}
        if num_shards > 1:  # the whole data set's labels: a shard of another data set with the same ids is refused
            facts["dataset_labels_sha256"] = labels_sha256(label_columns(table))
        update.commit(facts=facts, all_ids=all_ids, images=images, labels=labels, new=new_arrays, keep=state.keep,
                      fused=fused, config_yaml=dump_config(cfg), shard=(shard_index, num_shards))
    summary.computed = [lb.name for lb in state.pending.values()]
    logger.debug("%s: %d images; computed %s in %.1f s (%.1f img/s)", out_path, len(rows),
                 ", ".join(summary.computed) or "nothing", summary.seconds, summary.images_per_s)
    return summary


def _compute(journal: Journal, extractor: Extractor, all_paths: List[str], position: np.ndarray,
             batches: Dict[int, np.ndarray], now: Images, num_workers: Optional[int], skip_bad: bool,
             progress: bool, summary: ExtractSummary) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the pending backbones over every batch the journal lacks; returns (sha256, pixel hashes, bad, error)
    per row."""
    found = journal.open()
    pending = extractor.backbones
    provenance = {s: f"{lb.provenance}:{extractor.precision}" for s, lb in pending.items()}
    n_rows = len(now.ids)
    sha = np.empty(n_rows, dtype="S64")
    pixels = np.empty(n_rows, dtype="S64")
    bad = np.zeros(n_rows, dtype=bool)
    error = np.array([""] * n_rows, dtype=object)

    def remember(rec: BatchRecord) -> None:
        at = position[rec.rows]
        sha[at], pixels[at], bad[at], error[at] = rec.sha256, rec.pixels, rec.bad, rec.error

    todo: Dict[int, List[str]] = {}
    for b, batch_rows in batches.items():
        record = journal.load(b, with_features=False) if found else None
        if record is not None:
            at = position[batch_rows]
            ok = ~record.bad
            if not (np.array_equal(record.rows, batch_rows) and np.array_equal(record.size_bytes[ok], now.size[at][ok])
                    and np.array_equal(record.mtime_ns[ok], now.mtime[at][ok])):
                record = None  # its images changed since: recompute
        need = [s for s in pending if record is None or not record.valid_for(s, provenance[s])]
        if need:
            todo[b] = need
        if record is not None:
            remember(record)
    if len(todo) < len(batches):
        logger.info("resuming: %d of %d batches were already done", len(batches) - len(todo), len(batches))
    n_todo = sum(len(batches[b]) for b in todo)
    passes = extractor.passes(all_paths, [batches[b] for b in todo], num_workers, skip_bad)
    started = time.perf_counter()
    desc = f"extract {next(iter(pending))}" if len(pending) == 1 else f"extract {len(pending)} backbones"
    with progress_bar(n_todo, desc, progress, unit="img") as tick:
        for b, batch in zip(todo, passes):
            good = batch.good
            old = journal.load(b) if len(todo[b]) < len(pending) else None
            record = BatchRecord(rows=batch.rows, sha256=batch.sha256, pixels=batch.pixels,
                                 size_bytes=batch.size_bytes, mtime_ns=batch.mtime_ns, bad=~good,
                                 error=np.array(batch.errors, dtype=str))
            if old is not None:
                record.features = {s: v for s, v in old.features.items() if s in pending and s not in todo[b]}
            for key in todo[b]:
                lb = pending[key]
                out = np.full((len(batch.rows), *extractor.output_shape(key)), np.nan, dtype=lb.dtype)
                if good.any():
                    out[good] = extractor.run(key, batch.images[lb.size_key])
                record.features[key] = (provenance[key], out)
            journal.write(b, record)
            remember(record)
            tick(len(batch.rows))
    summary.seconds = time.perf_counter() - started
    summary.n_computed_images = n_todo
    return sha, pixels, bad, error


def _relpath(path: Path, root: Path) -> str:
    """An image's path relative to the data folder, or absolute for an image a manifest names outside it."""
    relative = os.path.relpath(path, root)
    return str(path) if relative.startswith("..") else relative


def _resolve_all(members: Sequence[str]) -> List[str]:
    from pipeline.features.backbones import parse_spec

    return [parse_spec(m).spec for m in members]


def journal_filler(journal: Journal, spans: Sequence[Tuple[int, int, int]], key: str):
    """Stream one entry's arrays from the journal into its dataset, a batch at a time (flat memory): each span
    (batch, start, stop) is where that batch's rows go."""
    def fill(ds) -> None:
        for b, start, stop in spans:
            rec = journal.load(b)
            if rec is None or key not in rec.features:
                raise CacheError(f"progress of batch {b} vanished from {journal.dir} while the cache was written; "
                                 "rerun the same command")
            ds[start:stop] = rec.features[key][1]
    return fill
