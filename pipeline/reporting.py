"""Numbers as reports and tables show them."""
from __future__ import annotations

from typing import Dict, Optional


def format_number(value: float, digits: int = 3) -> str:
    """Fixed digits, or scientific notation where fixed would show only zeros."""
    return f"{value:.{digits - 1}e}" if value != 0 and abs(value) < 10 ** -(digits - 1) else f"{value:.{digits}f}"


def format_entry(entry: Optional[Dict[str, object]], digits: int = 3) -> str:
    """A metric entry as "mean ± std [CI]" ('-' without an entry, 'n/a' without a mean)."""
    if not entry:
        return "-"
    mean, std = entry.get("mean"), entry.get("std")
    text = format_number(mean, digits) if mean == mean else "n/a"
    if std == std and std is not None:
        text += f" ± {format_number(std, digits)}"
    ci = entry.get("ci95")
    if ci:
        text += f" [{format_number(ci[0], digits)}, {format_number(ci[1], digits)}]"
    return text
