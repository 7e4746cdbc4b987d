"""Rule specs: which rule config (CL, CK, FC, ACNet, RepVGG, ...) applies to which layer.

A spec is a rule config (``efx.CL(r=4)``), a ``+`` combination (``efx.CK(r=2) +
efx.FC(r=4)``), a rule string (``"CL"``, ``"CK+FC"``), a mapping from module-name glob
patterns to any of these (first match wins, ``None`` leaves a layer alone), or a callable
``(name, module) -> rule | None``. A rule string is shorthand: with ``expand``'s ``r=`` it
means exactly the configs (``"CK+FC"``, ``r=2`` → ``CK(r=2) + FC(r=2)``; ``r`` goes to the
rules that use it). :func:`resolve` turns a spec into configs once, up front, so a typo or an
impossible setting fails before any work is done; :meth:`Spec.pick` gives one layer its
config.

Example::

    >>> import torch.nn as nn
    >>> spec = resolve({"features.*": "CL", "classifier.*": "FC"}, Shorthand(r=2))
    >>> spec.pick("features.0", nn.Conv2d(3, 8, 3), "conv")
    (CL(r=2), None)
    >>> spec.pick("classifier.0", nn.Linear(4, 2), "linear")
    (FC(r=2), None)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..patterns import first_match
from .base import RULES, Rule, find
from .config import INITS, RuleConfig, RuleSet, _check_norm, _rate

__all__ = ["RuleSpec", "Shorthand", "Spec", "from_call", "parse", "resolve"]

Entry = str | Rule | RuleConfig | RuleSet
RuleSpec = Entry | Mapping[str, Entry | None] | Callable[[str, nn.Module], Entry | None]
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "<unset>"})()


@dataclass(frozen=True)
class Shorthand:
    """What ``expand``'s ``r=`` (and the deprecated ``init=``, ``norm=``) add to rule
    strings; ``None`` / :data:`UNSET` where not given."""

    r: Any = None
    init: str | None = None
    norm: Any = UNSET

    def config(self, rule: Rule) -> RuleConfig:
        """``rule`` with these settings, where it takes them."""
        options = {}
        if self.norm is not UNSET and self.norm is not None and "norm" in rule.options:
            options["norm"] = self.norm
        return rule(self.r if rule.uses_r else None, init=self.init or "default", **options)


def parse(rule: str, where: str = "rule") -> list[Rule]:
    """``"CK+FC"`` → the registered rules ``[CK, FC]``, rejecting unknown parts and two rules
    for the same kind of layer."""
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
    return list(found.values())


def entry(value: Any, short: Shorthand, where: str = "rule") -> RuleSet:
    """One spec entry (string, rule, config or combination) as its :class:`RuleSet`."""
    if isinstance(value, RuleSet):
        return value
    if isinstance(value, RuleConfig):
        return RuleSet((value,))
    if isinstance(value, Rule):  # a bare rule is its name: the shorthand applies
        value = value.name
    if isinstance(value, str):
        return RuleSet(tuple(short.config(rule) for rule in parse(value, where)))
    raise ConfigError(f"expand: {where} must be a string like 'CL' or 'CK+FC', a rule config "
                      f"(efx.CL(r=4)) or None; got {type(value).__name__} {value!r}.")


def uses_shorthand(value: Any) -> bool:
    """Whether ``value`` is a rule string (or bare rule), to which ``r=`` applies."""
    return isinstance(value, str | Rule)


@dataclass(frozen=True)
class Spec:
    """A resolved spec: one :class:`RuleSet` for all layers, a mapping of them (``None``:
    leave alone), or a callable resolved per layer."""

    source: Any
    table: RuleSet | dict[str, RuleSet | None] | Callable[..., Any]
    short: Shorthand

    def pick(self, name: str, module: nn.Module, kind: str
             ) -> tuple[RuleConfig | None, str | None]:
        """The config for this layer (of :attr:`Rule.kind` ``kind``), or ``(None, reason)``."""
        table = self.table
        if isinstance(table, dict):
            matched = first_match(name, table)
            if matched is None:
                return None, "no pattern of the rule mapping matches"
            rules, where = table[matched], f"rule[{matched!r}]"
        elif isinstance(table, RuleSet):
            rules, where = table, "rule"
        else:
            given, where = table(name, module), "the rule callable"
            rules = None if given is None else entry(given, self.short,
                                                     where=f"{where} for '{name}'")
        if rules is None:
            return None, f"{where} gives None"
        chosen = rules.for_kind(kind)
        if chosen is None:
            return None, f"rule {_short_repr(rules)} does not apply to {type(module).__name__}"
        return chosen, None

    def configs(self) -> list[RuleConfig]:
        """Every config the spec names up front (none for a callable)."""
        table = self.table
        sets = [table] if isinstance(table, RuleSet) else \
            [v for v in table.values() if v is not None] if isinstance(table, dict) else []
        return [c for s in sets for c in s.configs]


def resolve(spec: Any, short: Shorthand | None = None) -> Spec:
    """Validate ``spec`` and turn its rule strings into configs with ``short``'s settings."""
    short = short or Shorthand()
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        spec = dict([spec])  # one (pattern, rule) pair: handy in doctests
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Mapping):
        table: Any = {p: None if v is None else entry(v, short, where=f"rule[{p!r}]")
                      for p, v in spec.items()}
    elif isinstance(spec, str | Rule | RuleConfig | RuleSet):
        table = entry(spec, short)
    elif callable(spec):
        table = spec
    else:
        raise ConfigError(f"expand: rule must be a string like 'CL' or 'CK+FC', a rule config "
                          f"(efx.CL(r=4)), a mapping from module-name patterns to rules, or a "
                          f"callable (name, module) -> rule | None; got {type(spec).__name__}.")
    return Spec(spec, table, short)


def _short_repr(rules: RuleSet) -> str:
    """``CL`` for a single config, its repr otherwise (as the messages always said)."""
    names = "+".join(c.rule for c in rules.configs)
    return names


def from_call(who: str, rule: Any, r: Any, deprecated: dict[str, Any]) -> Spec:
    """The spec of an ``expand``/``plan`` call: ``rule`` with the shorthand ``r=`` and the
    deprecated ``init=`` / ``norm=`` keywords (a ``DeprecationWarning`` naming the config
    to write instead), refusing shorthand that no rule string would take."""
    unknown = sorted(set(deprecated) - {"init", "norm"})
    if unknown:
        raise TypeError(f"{who}() got an unexpected keyword argument {unknown[0]!r}")
    init, norm = deprecated.get("init"), deprecated.get("norm", UNSET)
    if r is not None:
        _rate(r, f"{who}")
    if init is not None and init not in INITS:
        raise ConfigError(f"{who}: init must be one of {INITS}, got {init!r}.")
    if norm is not UNSET:
        why = _check_norm(norm, None)
        if why:
            raise ConfigError(f"{who}: {why}.")
    if init == "default":
        init = None
    spec = resolve(rule, Shorthand(r, init, norm))
    given = [f"{k}={v!r}" for k, v in (("r", r), ("init", init)) if v is not None]
    given += [f"norm={norm!r}"] if norm is not UNSET and norm is not None else []
    strings = ([v for v in rule.values() if v is not None] if isinstance(rule, Mapping)
               else [rule])
    if given and not callable(spec.table) and not any(map(uses_shorthand, strings)):
        raise ConfigError(f"{who}: {', '.join(given)} would be ignored: they are shorthand for "
                          f"rule strings, and {_describe(spec)} already sets every rule's "
                          f"settings. Put them in the configs (e.g. "
                          f"{spec.configs()[0].rule}(...)) and drop the keyword.")
    named = [find(n) for v in strings if isinstance(v, str) for n in v.split("+")]
    named += [v for v in strings if isinstance(v, Rule)]
    if r is not None and not callable(spec.table) and named and not any(
            x is not None and x.uses_r for x in named):  # the strings r= would reach
        users = sorted(n for n, x in RULES.items() if x.uses_r)
        given = sorted({x.name for x in named if x is not None})
        raise ConfigError(f"{who}: r={r!r} would be ignored: it applies to rule strings, and "
                          f"those of rule {rule!r} ({', '.join(given)}) use no expansion rate "
                          f"(branch rules keep the layer's width). Drop r=, or combine with a "
                          f"rule that uses it: {users}.")
    if norm is not UNSET and norm is not None and not callable(spec.table) and not any(
            "norm" in RULES[c.rule].options for c in spec.configs()):
        raise ConfigError(f"{who}: norm={norm!r} is per-branch normalization, but rule "
                          f"{rule!r} expands no layer with a branch rule (those that take norm: "
                          f"{sorted(n for n, x in RULES.items() if 'norm' in x.options)}). "
                          f"Drop norm=, or use a branch rule such as 'RepVGG'.")
    for name, value in (("init", deprecated.get("init")), ("norm", norm)):
        if name in deprecated:
            warnings.warn(f"{who}(..., {name}={value!r}) is deprecated and will be removed in "
                          f"the next release: the setting belongs to the rule config. Write "
                          f"rule={_describe(spec)} and drop {name}=.", DeprecationWarning,
                          stacklevel=3)
    return spec


def _describe(spec: Spec) -> str:
    table = spec.table
    if isinstance(table, RuleSet):
        return repr(table)
    if isinstance(table, dict):
        return "{" + ", ".join(f"{p!r}: {v!r}" for p, v in table.items()) + "}"
    return repr(spec.source)
