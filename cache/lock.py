"""One writer per cache: an advisory lock file next to it, released by the OS even on kill -9."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator, Set

from pipeline.errors import CacheError
from pipeline.fsutil import process_running


#: Descriptors of the locks this process holds: forked children (DataLoader workers) close their copies.
_HELD: Set[int] = set()


def lock_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".lock")


def close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors, so that a killed parent's lock
    is released at once instead of when its workers notice and exit (a scheduler's retry is refused otherwise)."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on `cache` (a second writer gets a CacheError at once)."""
    path = lock_path(Path(cache))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            if holder != "unknown" and not process_running(holder):
                raise CacheError(f"cache {cache} is locked by pid {holder}, which is no longer running; processes "
                                 "it started still hold the lock: retry in a few seconds (fuser "
                                 f"{path} lists them)") from None
            raise CacheError(f"cache {cache} is being written by another process (pid {holder}); wait for it "
                             "to finish or use another --cache") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(fd)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # still holding the lock: nobody else can have it
    finally:
        _HELD.discard(fd)
        os.close(fd)
