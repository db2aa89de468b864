"""Small filesystem helpers: atomic writes and content hashes."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger(__name__)


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks so large files need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def process_running(pid: str) -> bool:
    """Whether a process with this id runs on this machine (another user's counts as running)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _dead_siblings(path: Path, kind: str) -> Iterator[Path]:
    """The `.NAME.KIND-PID` siblings of `path` whose process no longer runs on this machine."""
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
        if not process_running(sibling.name.rsplit("-", 1)[1]):
            yield sibling


def remove_stale_staging(out: Path) -> None:
    """Remove the temporary folders (.NAME.partial-PID, .NAME.old-PID) that killed runs (kill -9, a lost node)
    left next to `out`; a live process's folder stays."""
    for kind in ("partial", "old"):
        for folder in _dead_siblings(out, kind):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)


def remove_dead_temporaries(path: PathLike) -> None:
    """Remove the temporary files (`temp_sibling`: .NAME.tmp-PID) that killed writers of `path` left next to it,
    which can be as large as the file itself; a live process's stays."""
    for file in _dead_siblings(Path(path), "tmp"):
        if file.is_file():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: PathLike, tag: str = "tmp") -> Path:
    """A temporary name next to `path`, unique per process, on the same filesystem (rename stays atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path; on success rename it over `path`, on any error remove it.

    Readers therefore see either the old file or the complete new one, never a half-written file.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv_blocks(path: PathLike, n: int, block: int, frame_of: Callable[[slice], object],
                     workers: Optional[int] = None) -> None:
    """One CSV of `n` entries made a block at a time: frame_of(slice) gives the pandas DataFrame of those entries
    (the header comes with the first), so a million rows' columns are never all formatted at once. From
    PARALLEL_ROWS entries the text is made by `workers` processes (default: the threads the command may use) while
    this one makes the next blocks and writes them in order: the same bytes."""
    from pipeline.runtime import resolve_threads

    def parts():
        for start in range(0, max(n, 1), block):
            frame = frame_of(slice(start, start + block))
            for at in range(0, max(len(frame), 1), CSV_TEXT_ROWS):  # text a few thousand rows at a time
                yield frame.iloc[at:at + CSV_TEXT_ROWS], start == 0 and at == 0

    workers = resolve_threads() if workers is None else workers
    with open(path, "w", newline="") as handle:
        if workers >= 2 and n >= PARALLEL_ROWS:
            try:
                return _write_with_workers(handle, parts(), workers)
            except Exception as exc:  # no processes here (a sandbox), a worker killed: one process writes it all
                logger.warning("writing %s in one process: its worker processes failed (%s)", path, exc)
                handle.seek(0)
                handle.truncate()
        for part, header in parts():
            handle.write(block_text(part, header))


def _write_with_workers(handle, parts, workers: int) -> None:
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # Linux: forked, as torch's DataLoader workers are. A worker only formats text (no logging, no OpenMP), and a
    # fork neither imports the caller's script again (forkserver and spawn run an unguarded script's top level,
    # its training included, in every worker) nor needs the caller's sys.path; elsewhere the platform's default.
    method = "fork" if sys.platform.startswith("linux") else None
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        pending: deque = deque()
        for part, header in parts:
            pending.append(pool.submit(block_text, part, header))
            if len(pending) >= 2 * workers:  # a few blocks in flight: memory stays a few blocks' text
                handle.write(pending.popleft().result())
        while pending:
            handle.write(pending.popleft().result())


def block_text(part, header: bool) -> str:
    """A block's CSV text: csv_text's, or pandas' for a kind csv_text does not take."""
    text = csv_text(part, header=header)
    return part.to_csv(index=False, header=header) if text is None else text


#: Rows made into text at once: their cells are Python strings (about 60 bytes each), so 5,000 rows of 100
#: columns hold about 30 MB, where pandas' own writer holds about as much.
CSV_TEXT_ROWS = 5_000
#: Entries from which write_csv_blocks formats in worker processes: below, the file takes a few seconds at most,
#: and handing blocks to workers (pickled both ways) saves less than a second.
PARALLEL_ROWS = 100_000


_NEEDS_QUOTES = frozenset(',"\r\n')


def _cell(value: str) -> str:
    """A text field as pandas' csv writer (QUOTE_MINIMAL) writes it."""
    return '"' + value.replace('"', '""') + '"' if _NEEDS_QUOTES.intersection(value) else value


def _column_text(values) -> Optional[List[str]]:
    """Each value of one column as pandas.to_csv writes it (float64 by repr, float32 by numpy's shortest text, NaN
    and None empty, text quoted where needed), or None for a column kind this does not know (the caller lets pandas
    write the block)."""
    import numpy as np

    kind = values.dtype.kind
    items = values.tolist()
    if kind == "f" and values.dtype == np.float64:  # pandas formats float64 as numpy's str: Python's repr
        return ["" if v != v else repr(v) for v in items]
    if kind == "f" and values.dtype == np.float32:  # numpy's shortest float32 text, as pandas writes it
        return ["" if t == "nan" else t for t in values.astype(str).tolist()]
    if kind in "iub":
        return list(map(str, items))
    if kind != "O":
        return None
    out = []
    for v in items:
        if v is None or (isinstance(v, float) and v != v):
            out.append("")
        elif isinstance(v, str):
            out.append(_cell(v))
        elif isinstance(v, (bool, int, float)):  # str, as the csv module: numpy's float64 too (its repr names it)
            out.append(str(v))
        else:
            return None
    return out


def csv_text(frame, header: bool = True) -> Optional[str]:
    """The bytes DataFrame.to_csv(index=False) writes, made column by column and joined by row (about twice as fast
    on predictions.csv's float columns: pandas spends its time in the csv module, not in formatting); None where a
    column's kind is one it does not know, or the frame has under two columns (tests/test_scale.py compares it with
    pandas on every kind it takes)."""
    if frame.shape[1] < 2:
        return None
    import numpy as np

    columns = []
    for name in frame.columns:
        dtype = frame[name].dtype
        # numpy's kinds and pandas' text (its values str or NaN); pandas' other kinds (categorical, nullable): pandas
        if not isinstance(dtype, np.dtype) and type(dtype).__name__ != "StringDtype":
            return None
        text = _column_text(frame[name].to_numpy())
        if text is None:
            return None
        columns.append(text)
    lines = [",".join(_cell(str(c)) for c in frame.columns)] if header else []
    lines.extend(map(",".join, zip(*columns)))
    return "\n".join(lines) + "\n" if lines else ""


@contextlib.contextmanager
def staged_dir(out: PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary folder renamed to `out` on success (replacing it only with `overwrite`)."""
    from pipeline.errors import PipelineError

    out = Path(out)
    if out.exists() and not overwrite:
        raise PipelineError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def jsonable(value):
    """`value` with numpy scalars as Python numbers and tuples as lists, for json.dumps."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # a numpy scalar
        return value.item()
    return value


def json_text(value, indent: int = 1) -> str:
    """Strict JSON of a result (metrics.json, winner.json): numpy scalars as numbers, NaN and infinities as null
    (bare NaN is not JSON: jq, JavaScript and most parsers refuse the file)."""
    def strict(v):
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, list):
            return [strict(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return json.dumps(strict(jsonable(value)), indent=indent, allow_nan=False, default=str)
