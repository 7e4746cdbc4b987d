"""Plain-text formatting for messages and reports: aligned tables and short counts.

Example::

    >>> print(text_table([("a", "bb"), ("ccc", "d")]))
    a    bb
    ccc  d
    >>> human(21_700_000)
    '21.70M'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["human", "text_table"]


def text_table(rows: Sequence[Sequence[Any]], rule_after_header: bool = False) -> str:
    """Rows as left-aligned columns two spaces apart (trailing spaces stripped); with
    ``rule_after_header`` a line of dashes under the first row."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    if rule_after_header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human(n: int) -> str:
    """A count for a message: ``21.70M``, ``512``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
