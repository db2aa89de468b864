"""Numbers as reports and tables show them."""
from __future__ import annotations

import math
from typing import Dict, Optional


def format_number(value: Optional[float], digits: int = 3) -> str:
    """`digits` significant digits (whole numbers at and above 10**digits, scientific notation for tiny ones),
    so that 274442.074 and 0.00447 read alike: '274442', '0.00447'."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    text = f"{value:#.{digits}g}"
    return text if "e" in text else text.rstrip(".")


def format_entry(entry: Optional[Dict[str, object]], digits: int = 3) -> str:
    """A metric entry as "pooled [95% CI]; folds mean ± std": the headline is the estimate on the pooled
    out-of-fold predictions, with its bootstrap CI; the folds' spread follows, labelled as such ('-' without an
    entry)."""
    if not entry:
        return "-"
    text = format_number(entry.get("pooled"), digits)
    ci = entry.get("ci95")
    if ci:
        text += f" [{format_number(ci[0], digits)}, {format_number(ci[1], digits)}]"
    mean, std = entry.get("fold_mean"), entry.get("fold_std")
    if mean is not None and mean == mean and std is not None and std == std:
        text += f"; folds {format_number(mean, digits)} ± {format_number(std, digits)}"
    return text
