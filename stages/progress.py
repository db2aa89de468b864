"""Progress for long loops of the commands: a tqdm bar on a terminal, a log line every half minute elsewhere
(a log file, CI, `make demo | tee`), so that a long step never looks hung."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

#: Seconds between two progress lines when the output is not a terminal.
LOG_EVERY_S = 30.0


#: Seconds of silence after which a command's heartbeat says it is still working (a step without a bar, such
#: as the heads' outputs for every row or writing a million-row predictions.csv); it looks every HEARTBEAT_POLL_S.
HEARTBEAT_S = 45.0
HEARTBEAT_POLL_S = 5.0


class Spacing:
    """When the last progress line was written (at first: when the command started). A command's bars share
    one, so lines keep LOG_EVERY_S apart across its phases and a phase that starts after a quiet one speaks at
    its first tick instead of restarting the silence. `phase`: the bar running, or the one that ran last."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.last = clock()
        self.phase, self.running = "", False

    def beat(self) -> None:
        """A line if nothing was written for HEARTBEAT_S: the step in hand has no bar, or ticks rarely."""
        now = self.clock()
        quiet = now - self.last
        if quiet >= HEARTBEAT_S:
            self.last = now
            if self.running:
                logger.info("%s: still running (%.0f s since the last line)", self.phase, quiet)
            else:
                logger.info("still working after %s (%.0f s since the last line; this step has no progress bar)",
                            self.phase or "the start", quiet)

    def start_heartbeat(self) -> None:
        """beat() every HEARTBEAT_POLL_S from a daemon thread, which ends once this object is no longer used
        (it holds a weak reference): off a terminal, a command is never silent for a minute."""
        import threading
        import weakref

        ref = weakref.ref(self)

        def run() -> None:
            while True:
                time.sleep(HEARTBEAT_POLL_S)
                spacing = ref()
                if spacing is None:
                    return
                spacing.beat()
                del spacing

        threading.Thread(target=run, name="progress-heartbeat", daemon=True).start()


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True, unit: str = "epoch", rows: float = 0.0,
             at_most: bool = False, clock: Callable[[], float] = time.perf_counter,
             spacing: Optional[Spacing] = None) -> Iterator[Callable[[int], None]]:
    """Yields tick(n): advance by n of `total` (`at_most`: a cap, such as training's epoch cap, that the work may
    end before); `rows`: rows per unit, to show rows/s. Off a terminal, a line at most every LOG_EVERY_S of
    `clock` (since the last line of any bar sharing `spacing`) with the rate and the time left at that rate (an
    upper bound with `at_most`)."""
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
    spacing = spacing or Spacing(clock)
    started = spacing.clock()
    spacing.phase, spacing.running = desc, True
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        now = spacing.clock()
        if now - spacing.last >= LOG_EVERY_S and done < total:
            spacing.last = now
            rate = done / max(now - started, 1e-9)
            left = (total - done) / rate if rate else float("nan")
            logger.info("%s: %s/%s %ss (%.0f%%), %.0f s, %s%s", desc, f"{done:,}", f"{total:,}", unit,
                        100 * done / total, now - started, f"{rate * rows:,.0f} rows/s, " if rows else "",
                        f"at most {left:.0f} s left (early stopping may end sooner)" if at_most else
                        f"about {left:.0f} s left")

    try:
        yield tick
    finally:
        spacing.running = False


def progress_bars(enabled: bool):
    """A pipeline.evaluation.engine.Progress for the stage-two loops: bar(total, description, ...) yields tick(n)."""
    spacing = Spacing()
    if enabled and not sys.stderr.isatty():
        spacing.start_heartbeat()

    def bar(total: int, desc: str, rows: float = 0.0, unit: str = "epoch", at_most: bool = False):
        return progress(total, desc, enabled, unit=unit, rows=rows, at_most=at_most, spacing=spacing)
    return bar
