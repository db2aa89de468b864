"""Per-batch progress of an extraction that has not been written into the cache yet.

Each finished batch is one small .npz next to the cache (`<cache>.partial/batch-000012.npz`), written to a
temporary name and renamed, so a batch file is either complete or absent whatever kills the process. A rerun
finds them and computes only what is missing; the cache file itself is only ever replaced whole.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from pipeline.fsutil import atomic_write_text, temp_sibling

logger = logging.getLogger(__name__)


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
    def __init__(self, cache: Path, plan: JournalPlan):
        self.dir = journal_dir(Path(cache))
        self.plan = plan

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
        for stale in self.dir.glob(".*"):  # temporaries of a killed writer
            stale.unlink()
        return len(self.batch_indices())

    def _path(self, index: int) -> Path:
        return self.dir / f"batch-{index:06d}.npz"

    def batch_indices(self) -> List[int]:
        if not self.dir.exists():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("batch-*.npz"))

    def load(self, index: int, with_features: bool = True) -> Optional[BatchRecord]:
        """A finished batch, or None; without features only provenances are read (arrays left as None)."""
        path = self._path(index)
        try:
            with np.load(path, allow_pickle=False) as data:
                specs = [str(s) for s in data["specs"]]
                provs = [str(p) for p in data["provenance"]]
                record = BatchRecord(rows=data["rows"], sha256=data["sha256"], size_bytes=data["size_bytes"],
                                     mtime_ns=data["mtime_ns"], bad=data["bad"], error=data["error"])
                for i, (spec, prov) in enumerate(zip(specs, provs)):
                    record.features[spec] = (prov, data[f"feat_{i}"] if with_features else None)
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as exc:  # unreadable: recompute this batch
            logger.warning("ignoring damaged progress file %s (%s)", path, exc)
            return None

    def write(self, index: int, record: BatchRecord) -> None:
        specs = list(record.features)
        arrays = {f"feat_{i}": record.features[s][1] for i, s in enumerate(specs)}
        path = self._path(index)
        tmp = temp_sibling(path)
        with open(tmp, "wb") as handle:
            provenance = np.array([record.features[s][0] for s in specs], dtype=str)
            np.savez(handle, rows=record.rows, sha256=record.sha256, size_bytes=record.size_bytes,
                     mtime_ns=record.mtime_ns, bad=record.bad, error=record.error,
                     specs=np.array(specs, dtype=str), provenance=provenance, **arrays)
        os.replace(tmp, path)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # = discard(cache): the journal is the folder
