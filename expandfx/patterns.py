"""Glob patterns over module paths (``include``, ``exclude`` and rule mappings).

Example::

    >>> first_match("features.0", ["classifier.*", "features.*"])
    'features.*'
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

__all__ = ["first_match"]


def first_match(path: str, patterns: Iterable[str] | None) -> str | None:
    """The first glob pattern (``fnmatch``, case-sensitive) that ``path`` matches."""
    return next((p for p in patterns or () if fnmatchcase(path, p)), None)
