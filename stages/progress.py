"""Progress for long loops of the commands: a tqdm bar on a terminal, a log line every half minute elsewhere
(a log file, CI, `make demo | tee`), so that a long step never looks hung."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

#: Seconds between two progress lines when the output is not a terminal.
LOG_EVERY_S = 30.0


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True, unit: str = "epoch",
             rows: float = 0.0) -> Iterator[Callable[[int], None]]:
    """Yields tick(n): advance by n of `total`; `rows`: rows per unit, to show rows/s beside the ETA."""
    if not enabled or total <= 0:
        yield lambda n: None
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, unit=unit, desc=desc, leave=False, dynamic_ncols=True) as bar:
            def update(n: int) -> None:
                bar.update(n)
                elapsed = bar.format_dict.get("elapsed") or 0
                if rows and elapsed:
                    bar.set_postfix_str(f"{bar.n * rows / elapsed:,.0f} rows/s", refresh=False)
            yield update
        return
    started = last = time.perf_counter()
    done = 0

    def tick(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S and done < total:
            last = now
            rate = done / (now - started)
            logger.info("%s: %d/%d %s (%.0f%%), %.0f s, about %.0f s left%s", desc, done, total, unit,
                        100 * done / total, now - started, (total - done) / rate if rate else float("nan"),
                        f", {rate * rows:,.0f} rows/s" if rows else "")

    yield tick


def progress_bars(enabled: bool):
    """A pipeline.evaluation.engine.Progress for the stage-two loops: bar(total, description) yields tick(n)."""
    def bar(total: int, desc: str, rows: float = 0.0):
        return progress(total, desc, enabled, rows=rows)
    return bar
