"""Rule specs: which rule (CL, CK, FC) applies to which layer.

A spec is a rule string (``"CL"``, ``"CK+FC"``), a mapping from module-name glob
patterns to rule strings (first match wins, ``None`` leaves a layer alone), or a
callable ``(name, module) -> rule | None``.

Example::

    >>> import torch.nn as nn
    >>> pick(("features.*", "CL"), "features.0", nn.Conv2d(3, 8, 3))
    ('CL', None)
    >>> pick("CL+FC", "classifier.0", nn.Linear(4, 2))
    ('FC', None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase

from torch import nn

from . import registry
from .errors import ConfigError

RULES = ("CL", "CK", "FC")
RuleSpec = str | Mapping[str, str | None] | Callable[[str, nn.Module], str | None]


def parse(rule: str, where: str = "rule") -> frozenset[str]:
    """``"CK+FC"`` → ``{"CK", "FC"}``, rejecting unknown and conflicting parts."""
    if not isinstance(rule, str):
        raise ConfigError(f"expand: {where} must be a string like 'CL' or 'CK+FC', got "
                          f"{type(rule).__name__} {rule!r}")
    parts = frozenset(p.strip().upper() for p in rule.split("+"))
    unknown = sorted(parts - set(RULES))
    if unknown or not parts:
        raise ConfigError(f"expand: unknown rule {unknown or [rule]} in {where}={rule!r}; use "
                          f"'CL', 'CK' or 'FC', or a combination such as 'CL+FC' or 'CK+FC'.")
    if {"CL", "CK"} <= parts:
        raise ConfigError(f"expand: {where}={rule!r} gives convolutions both CL and CK; a "
                          f"convolution takes one of them. Use a mapping from module-name "
                          f"patterns to rules to mix them per layer.")
    return parts


def check_spec(spec: RuleSpec) -> None:
    """Validate a spec up front, so a typo fails before any work is done."""
    if isinstance(spec, Mapping):
        for pattern, rule in spec.items():
            if rule is not None:
                parse(rule, where=f"rule[{pattern!r}]")
    elif isinstance(spec, str):
        parse(spec)
    elif not callable(spec):
        raise ConfigError(f"expand: rule must be a string, a mapping from module-name patterns "
                          f"to rules, or a callable (name, module) -> rule | None; got "
                          f"{type(spec).__name__}.")


def pick(spec: RuleSpec | tuple[str, str], name: str, module: nn.Module
         ) -> tuple[str | None, str | None]:
    """The single rule for this layer, or ``(None, reason)``."""
    if isinstance(spec, tuple):  # one (pattern, rule) pair: handy in doctests
        spec = dict([spec])
    if isinstance(spec, Mapping):
        matched = next((p for p in spec if fnmatchcase(name, p)), None)
        if matched is None:
            return None, "no pattern of the rule mapping matches"
        rule, where = spec[matched], f"rule[{matched!r}]"
    elif isinstance(spec, str):
        rule, where = spec, "rule"
    else:
        rule, where = spec(name, module), "the rule callable"
    if rule is None:
        return None, f"{where} gives None"
    parts = parse(rule, where=f"{where} for '{name}'")
    is_linear = registry.is_linear(module)
    chosen = [p for p in parts if (p == "FC") == is_linear]
    if not chosen:
        return None, f"rule {rule} does not apply to {type(module).__name__}"
    return chosen[0], None
