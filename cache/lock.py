"""One writer per cache: an advisory lock file next to it, released by the OS even on kill -9."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from pipeline.errors import CacheError


def lock_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".lock")


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on `cache` (a second writer gets a CacheError at once)."""
    path = lock_path(Path(cache))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise CacheError(f"cache {cache} is being written by another process (pid {holder}); wait for it "
                             "to finish or use another --cache") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # still holding the lock: nobody else can have it
    finally:
        os.close(fd)
