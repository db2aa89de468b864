"""Process-wide settings, made once at a command's entry (never inside library calls).

Threads: torch's intra-op pool and the BLAS pools (numpy's OpenBLAS, MKL) all get the same count: `--threads`,
else OMP_NUM_THREADS, else the cores this process may use (its CPU affinity and its cgroup's CPU quota, so a
container or a SLURM allocation of 4 cores gets 4, not the node's 128). Their worker threads wait passively
(OMP_WAIT_POLICY=PASSIVE unless set): a spinning OpenMP barrier burns the core that another process's threads
need, which made two concurrent runs on two cores 11x slower than one; with passive waiting they share.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

_CONFIGURED: Optional[int] = None


def available_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup (v2 or v1) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota() -> Optional[float]:
    """CPUs granted by the cgroup's quota (cpu.max, or cfs_quota_us / cfs_period_us); None if unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_memory() -> Optional[int]:
    """Bytes this process may still allocate: the smaller of the machine's available memory and what its
    cgroup's limit (memory.max, or v1's limit_in_bytes) leaves; None where neither can be read."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit_file).read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                limits.append(int(text) - int(Path(usage_file).read_text().strip()))
            break
        except (OSError, ValueError):
            continue
    return max(0, min(limits)) if limits else None


def resolve_threads(threads: Optional[int] = None) -> int:
    """--threads, else OMP_NUM_THREADS, else available_cores()."""
    if threads is not None and threads > 0:
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    return available_cores()


def threads() -> int:
    """The threads this process's command was configured with (configure), else what it would get."""
    return _CONFIGURED if _CONFIGURED is not None else resolve_threads()


def configure(threads: Optional[int] = None) -> int:
    """Set threads (torch and BLAS), passive waiting, the plot backend and the allocator; returns the threads.

    Called once by each command before it imports torch (which then starts with that count); later calls only
    return the count already set.
    """
    global _CONFIGURED
    if _CONFIGURED is not None:
        return _CONFIGURED
    n = resolve_threads(threads)
    # Read by the OpenMP and BLAS runtimes when they start, hence before torch / numpy's BLAS first run.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(n)
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    os.environ.setdefault("MPLBACKEND", "Agg")  # plots are files; never open a window
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # pipeline.data.images refuses images above its own, lower limit from the header
    # torch and numpy's BLAS read those variables when they start: a command does not import them before it needs
    # them (an error in its arguments answers at once); a process that already has them (a test, a notebook) is told
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "numpy" in sys.modules:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(n)
        except ImportError:
            pass
    _keep_freed_memory()
    _CONFIGURED = n
    logger.debug("threads: %d", n)
    return n


@functools.lru_cache(maxsize=None)
def _libc():
    """The C library, found once (find_library asks ldconfig) for the allocator settings and trims."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _keep_freed_memory() -> None:
    """Ask glibc to serve large blocks from its heap instead of fresh mmap pages (Linux only; no-op elsewhere).

    Every training step frees and reallocates gradient and activation buffers of tens of MB. Above glibc's
    mmap threshold (32 MB at most) each one is a new mapping whose pages fault in on first touch: the
    weight-gradient product then runs 2-3x slower than on reused memory (benchmarks/train.py). Freed heap
    above 128 MiB is returned, so the resident memory of a large run stays bounded (a 1 GiB trim threshold kept
    1 GiB more resident at 10,000 rows). mallopt takes a C int: the trim threshold was once passed as 2 GiB,
    which overflowed to a negative int (never trim).
    """
    try:
        import ctypes

        libc = _libc()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
        libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD: return freed heap above 128 MiB (bounded RSS)
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere), between the phases
    of a large run: with every block below 1 GiB served from the heap (above), the automatic trim returns only the
    heap's top, so the phases' freed temporaries in its middle stayed resident (at 1M rows the baselines' and the
    summaries' arrays raised the peak above the memory bound)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pick_device(name: str = "auto", key: str = "device"):
    """'auto': CUDA when present (cuda:$LOCAL_RANK under torchrun), else the CPU; an unavailable device is a
    clear error naming the config key."""
    import torch

    from pipeline.errors import ConfigError

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key} '{name}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} '{name}': no CUDA GPU is available here; use cpu or auto")
    return device
