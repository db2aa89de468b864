"""Progress for long loops of the commands: a tqdm bar on a terminal, nothing in logs."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator


def progress_bars(enabled: bool):
    """A pipeline.engine.Progress: bar(total, description) yields tick(n)."""
    @contextlib.contextmanager
    def bar(total: int, desc: str) -> Iterator[Callable[[int], None]]:
        from tqdm import tqdm

        # disable=None: tqdm shows the bar on a terminal only, so logs of batch jobs stay clean
        with tqdm(total=total, unit="epoch", desc=desc, disable=None if enabled else True, leave=False,
                  dynamic_ncols=True) as b:
            yield b.update
    return bar
