"""Rule specs: which registered rule (CL, CK, FC, ACNet, RepVGG, ...) applies to which layer.

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

from torch import nn

from ..errors import ConfigError
from ..helpers import first_match
from .base import RULES, find, layer_kind

__all__ = ["RuleSpec", "check_spec", "parse", "pick"]

RuleSpec = str | Mapping[str, str | None] | Callable[[str, nn.Module], str | None]


def parse(rule: str, where: str = "rule") -> frozenset[str]:
    """``"CK+FC"`` → ``{"CK", "FC"}`` (registered names), rejecting unknown parts and two
    rules for the same kind of layer."""
    if not isinstance(rule, str):
        raise ConfigError(f"expand: {where} must be a string like 'CL' or 'CK+FC', got "
                          f"{type(rule).__name__} {rule!r}")
    found = {p: find(p) for p in rule.split("+")}
    unknown = [p.strip() for p, r in found.items() if r is None]
    if unknown:
        raise ConfigError(f"expand: unknown rule {unknown} in {where}={rule!r}; registered "
                          f"rules are {sorted(RULES)}, combined with '+' such as 'CL+FC' or "
                          f"'ACNet+FC'.")
    for kind in ("conv", "linear"):
        same = sorted(r.name for r in found.values() if r.kind == kind)
        if len(same) > 1:
            raise ConfigError(f"expand: {where}={rule!r} gives {kind} layers {same}; a layer "
                              f"takes one rule. Use a mapping from module-name patterns to "
                              f"rules to mix them per layer.")
    return frozenset(r.name for r in found.values())


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
        matched = first_match(name, spec)
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
    kind = layer_kind(module)
    chosen = [p for p in parts if RULES[p].kind == kind]
    if not chosen:
        return None, f"rule {rule} does not apply to {type(module).__name__}"
    return chosen[0], None
