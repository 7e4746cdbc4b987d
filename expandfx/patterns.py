"""Module-path patterns (``include``, ``exclude`` and rule mappings), and the rule that an
exact name is a request.

A pattern with glob characters (``*?[``) selects what it matches (``fnmatch``,
case-sensitive). A pattern without them is an *exact name*: it matches the module of that
path and, when that module is a container, every layer under it (``"features"`` is
``features.0``, ``features.3``, ...). :func:`check_names` holds every verb to that rule: an
exact name that matches no layer raises :class:`~expandfx.errors.ConfigError` naming it and
the closest real names; a glob that matches nothing, or (in an ordered mapping) only layers
an earlier pattern took, warns with :class:`~expandfx.errors.ExpandFXWarning`.

Example::

    >>> first_match("features.0", ["classifier.*", "features"])
    'features'
    >>> try:
    ...     check_names(["clasifier.0"], ["features.0", "classifier.0"], "expand", "include=")
    ... except ConfigError as e:
    ...     print(str(e).split(";")[0])
    expand: include= entry 'clasifier.0' names no layer of the model
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from .errors import ConfigError, ExpandFXWarning

__all__ = ["check_names", "closest", "first_match", "is_glob", "matches"]


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` has glob characters (else it is an exact name)."""
    return any(c in pattern for c in "*?[")


def matches(path: str, pattern: str) -> bool:
    """``path`` matches the glob, or is the exact name's module or a module under it."""
    if is_glob(pattern):
        return fnmatchcase(path, pattern)
    return path == pattern or (pattern != "" and path.startswith(pattern + "."))


def first_match(path: str, patterns: Iterable[str] | None) -> str | None:
    """The first pattern that ``path`` matches (:func:`matches`)."""
    return next((p for p in patterns or () if matches(path, p)), None)


def check_names(patterns: Sequence[str] | None, layers: Sequence[str], verb: str, where: str,
                *, modules: Sequence[str] = (), ordered: bool = False, stacklevel: int = 4,
                noun: str = "layer") -> None:
    """Hold ``patterns`` to the layer paths ``layers``: raise for an exact name that matches
    none of them, warn for a glob that matches none. ``ordered`` (a rule mapping, first
    match wins): an exact name whose layers an earlier pattern all took raises (its request
    would vanish), a glob's warns. ``modules``: every module path, for a better message
    when the name is a module that holds no layer; ``noun``: what ``layers`` are
    (``"parameter"`` for ``param_groups``)."""
    taken: set[str] = set()
    for i, pattern in enumerate(patterns or ()):
        hits = {p for p in layers if matches(p, pattern)}
        fresh = hits - taken if ordered else hits
        earlier = [q for q in list(patterns)[:i] if any(matches(p, q) for p in hits)]
        if is_glob(pattern):
            if not hits:
                warnings.warn(f"{verb}: {where} glob {pattern!r} matches no {noun} of the model"
                              f"{closest(pattern, layers)}.", ExpandFXWarning,
                              stacklevel=stacklevel)
            elif not fresh:
                warnings.warn(f"{verb}: {where} glob {pattern!r} matches only layers that the "
                              f"earlier pattern(s) {earlier} already take, so it is never used; "
                              f"put it before them or drop it.", ExpandFXWarning,
                              stacklevel=stacklevel)
        elif not hits:
            what = (f"is a module that holds no {noun}" if pattern in modules else
                    f"names no {noun} of the model")
            raise ConfigError(f"{verb}: {where} entry {pattern!r} {what}"
                              f"{closest(pattern, layers)}. Exact names (no * ? [) are "
                              f"requests: fix the name, or use a glob to select whatever "
                              f"matches.", code="unknown_name", where=pattern)
        elif not fresh:
            raise ConfigError(f"{verb}: {where} key {pattern!r} is never used: the earlier "
                              f"pattern(s) {earlier} already take every layer it names (first "
                              f"match wins). Put {pattern!r} first.", code="shadowed_name",
                              where=pattern)
        taken |= hits


def closest(name: str, candidates: Sequence[str]) -> str:
    """Up to three real names: the owner of a parameter name (``'fc.weight'`` → ``'fc'``),
    difflib's closest, then names with the same last part (``'classifer.7'`` → ``'7'``)."""
    owner, last = name.rpartition(".")[0], name.rpartition(".")[2]
    close = [c for c in candidates if c == owner]
    close += difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    close += [c for c in candidates if c.rpartition(".")[2] == last]
    close = list(dict.fromkeys(close))[:3]
    if close:
        return f"; closest: {', '.join(map(repr, close))}"
    some = ", ".join(map(repr, candidates[:6])) + (", ..." if len(candidates) > 6 else "")
    return f"; its layers: {some}" if candidates else "; it has no conv/linear layer"
