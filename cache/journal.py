"""Per-batch progress of an extraction that has not been written into the cache yet.

Each finished batch is one small .npz next to the cache (`<cache>.partial/batch-000012.npz`), written to a
temporary name and renamed, so a batch file is either complete or absent whatever kills the process. Every
SEGMENT_BATCHES loose batch files are packed into one segment file (`segment-000000.npz`, written and renamed
the same way, before the batch files are removed), so a 100,000-image extraction keeps a few dozen files, not
thousands. A rerun finds batches in both and computes only what is missing; the cache file itself is only ever
replaced whole.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from pipeline.fsutil import atomic_write_text, temp_sibling

logger = logging.getLogger(__name__)

#: Loose batch files packed into one segment file (bounds the number of progress files of a long run).
SEGMENT_BATCHES = 64
#: What reading a truncated or overwritten progress file raises (np.load of a .npz is a zip file's read).
_DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
_FIELDS = ("rows", "sha256", "pixels", "size_bytes", "mtime_ns", "bad", "error")


@dataclass(frozen=True)
class JournalPlan:
    """What fixes the batch boundaries: a journal written under another plan is discarded."""

    ids_sha256: str
    n_rows: int
    batch_size: int
    shard_index: int = 0
    num_shards: int = 1


@dataclass
class BatchRecord:
    """One finished batch: its rows' file facts and, per backbone, (provenance, features)."""

    rows: np.ndarray
    sha256: np.ndarray  # S64
    pixels: np.ndarray  # S64: the decoded images' pixel hashes (a progress file without them is recomputed)
    size_bytes: np.ndarray
    mtime_ns: np.ndarray
    bad: np.ndarray
    error: np.ndarray  # unicode
    features: Dict[str, Tuple[str, Optional[np.ndarray]]] = field(default_factory=dict)

    def valid_for(self, spec: str, provenance: str) -> bool:
        entry = self.features.get(spec)
        return entry is not None and entry[0] == provenance


def journal_dir(cache: Path) -> Path:
    return cache.with_name(cache.name + ".partial")


def discard(cache: Path) -> None:
    """Remove the progress kept for `cache`, if any."""
    shutil.rmtree(journal_dir(Path(cache)), ignore_errors=True)


class Journal:
    def __init__(self, cache: Path, plan: JournalPlan, writer: Tuple[int, int] = (0, 1)):
        self.dir = journal_dir(Path(cache))
        self.plan = plan
        # one of several processes writing the batches b % count == index into this journal at once: it packs only
        # its own batch files and leaves the others' temporaries alone (they may live on other machines)
        self.writer = writer
        self._index: Optional[Dict[int, Path]] = None  # batch -> segment file, read once

    def open(self) -> int:
        """Create the journal, or reuse one written under the same plan; returns the batches found."""
        plan_file = self.dir / "plan.json"
        if self.dir.exists():
            try:
                old = JournalPlan(**json.loads(plan_file.read_text()))
            except (OSError, ValueError, TypeError):
                old = None
            if old != self.plan:
                logger.warning("discarding the unfinished progress in %s: it was made for another image set, "
                               "batch size or shard", self.dir)
                self.clear()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not plan_file.exists():
            atomic_write_text(plan_file, json.dumps(asdict(self.plan)))
        if self.writer[1] == 1:
            for stale in self.dir.glob(".*"):  # temporaries of a killed writer
                stale.unlink(missing_ok=True)
        return len(self.batch_indices())

    def _path(self, index: int) -> Path:
        return self.dir / f"batch-{index:06d}.npz"

    def _loose(self) -> List[int]:
        index, count = self.writer
        found = (int(p.stem.split("-")[1]) for p in self.dir.glob("batch-*.npz"))
        return sorted(b for b in found if b % count == index)

    def _segments(self) -> Dict[int, Path]:
        """Batch index -> the segment file that holds it (read from each segment's index, not its arrays)."""
        if self._index is not None:
            return self._index
        out: Dict[int, Path] = {}
        for path in sorted(self.dir.glob("segment-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    out.update({int(i): path for i in data["batches"]})
            except _DAMAGED as exc:
                logger.warning("ignoring damaged progress file %s (%s)", path, exc)
        self._index = out
        return out

    def batch_indices(self) -> List[int]:
        if not self.dir.exists():
            return []
        return sorted(set(self._loose()) | set(self._segments()))

    def load(self, index: int, with_features: bool = True) -> Optional[BatchRecord]:
        """A finished batch, or None; without features only provenances are read (arrays left as None)."""
        path = self._path(index)
        if path.exists():
            return self._read(path, "", with_features)
        segment = self._segments().get(index)
        return self._read(segment, f"b{index}_", with_features) if segment is not None else None

    def _read(self, path: Path, prefix: str, with_features: bool) -> Optional[BatchRecord]:
        try:
            with np.load(path, allow_pickle=False) as data:
                specs = [str(s) for s in data[prefix + "specs"]]
                provs = [str(p) for p in data[prefix + "provenance"]]
                record = BatchRecord(**{f: data[prefix + f] for f in _FIELDS})
                for i, (spec, prov) in enumerate(zip(specs, provs)):
                    record.features[spec] = (prov, data[f"{prefix}feat_{i}"] if with_features else None)
            return record
        except FileNotFoundError:
            return None
        except _DAMAGED as exc:  # unreadable: recompute this batch
            logger.warning("ignoring damaged progress file %s (%s)", path, exc)
            return None

    @staticmethod
    def _arrays(record: BatchRecord, prefix: str = "") -> Dict[str, np.ndarray]:
        specs = list(record.features)
        out = {prefix + f: getattr(record, f) for f in _FIELDS}
        out[prefix + "specs"] = np.array(specs, dtype=str)
        out[prefix + "provenance"] = np.array([record.features[s][0] for s in specs], dtype=str)
        out.update({f"{prefix}feat_{i}": record.features[s][1] for i, s in enumerate(specs)})
        return out

    @staticmethod
    def _save(path: Path, arrays: Dict[str, np.ndarray]) -> None:
        tmp = temp_sibling(path)
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)

    def write(self, index: int, record: BatchRecord) -> None:
        self._save(self._path(index), self._arrays(record))
        loose = self._loose()
        if len(loose) >= SEGMENT_BATCHES:
            self._pack(loose)

    def _pack(self, loose: List[int]) -> None:
        """Loose batch files -> one segment file; the batch files go only once the segment is in place (a kill
        in between leaves a batch twice, identical, never missing)."""
        arrays: Dict[str, np.ndarray] = {"batches": np.array(loose, dtype=np.int64)}
        for index in loose:
            record = self.load(index)
            if record is None:
                return
            arrays.update(self._arrays(record, f"b{index}_"))
        segment = self.dir / f"segment-{loose[0]:06d}.npz"
        self._save(segment, arrays)
        self._segments().update({index: segment for index in loose})
        for index in loose:
            self._path(index).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # = discard(cache): the journal is the folder
        self._index = None
