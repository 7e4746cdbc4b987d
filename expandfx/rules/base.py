"""The rule protocol and registry: what every expansion rule provides, and where it is found.

A rule is one file in ``expandfx/rules/`` that defines ``RULE = Rule(...)``; the package
imports every such file, so adding a rule touches that file (and its tests) only —
``docs/design.md §8`` walks through the ACNet rule as the example. Users add their own with
:func:`register_rule`.

Example::

    >>> from expandfx.rules import RULES
    >>> sorted(RULES)
    ['ACNet', 'CK', 'CL', 'DBB', 'FC', 'MobileOne', 'OREPA', 'RepVGG']
    >>> RULES["CL"].kind
    'conv'
    >>> RULES["CL"](r=2)          # a rule called with its settings: a validated RuleConfig
    CL(r=2)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ..block import ExpandedBlock
    from .config import RuleConfig, RuleSet

__all__ = ["RULES", "Rule", "find", "register_rule", "unregister_rule"]


@dataclass(frozen=True, repr=False)
class Rule:
    """An expansion rule.

    Attributes:
        name: what users write (``"CL"``, ``"ACNet"``); matched case-insensitively.
        kind: ``"conv"`` or ``"linear"``: the layers it applies to. A rule string gives each
            kind at most one rule (``"ACNet+FC"``, not ``"CL+ACNet"``).
        skip_reason: ``(torch layer) -> str | None``: why the rule cannot apply to this
            layer (the plan shows it), or ``None``.
        build: ``(torch layer, r, init="default", *, path="", device=None) -> ExpandedBlock``;
            raises :class:`~expandfx.errors.ConfigError` for an ``init`` it cannot honour.
        summary: one line for ``expandfx rules`` and the docs.
        options: the extra keyword arguments ``build`` takes (``"norm"`` for the branch
            rules, ``"k"`` for MobileOne); a config sets them (``RepVGG(norm="bn")``; their
            values are checked by :data:`~expandfx.rules.config.OPTION_CHECKS`), and
            :meth:`configured` fixes any of them.
        uses_r: whether ``build`` uses the expansion rate ``r`` (the chain rules CL, CK, FC);
            ``False`` for rules that keep the layer's width (the branch rules), whose configs
            refuse ``r=`` and whose ``build`` gets ``r=1``.
        inits: the ``init`` values ``build`` honours (CK: ``("default",)``).
        check_options: ``(options) -> str | None``: why a setting cannot hold whatever the
            layer (OREPA: any ``norm`` but ``"scale"``), so that the config refuses it when it
            is built, not inside ``expand``; ``None``: no rule-specific check.

    Calling a registered rule returns its validated, frozen
    :class:`~expandfx.rules.config.RuleConfig`: ``RULES["CL"](r=4)``, ``efx.CL(r=4)``,
    ``efx.RepVGG(norm="bn")``. ``expand``/``plan`` take configs wherever they take rule
    strings.
    """

    name: str
    kind: str
    skip_reason: Callable[[nn.Module], str | None]
    build: Callable[..., ExpandedBlock]
    summary: str = ""
    options: frozenset[str] = frozenset()
    uses_r: bool = True
    inits: tuple[str, ...] = ("default", "preserve")
    check_options: Callable[[dict[str, Any]], str | None] | None = None

    def __call__(self, r: float | None = None, *, init: str = "default",
                 **options: Any) -> RuleConfig:
        """This rule with its settings, validated: ``RULES["FC"](r=4, init="preserve")``."""
        from .config import RuleConfig

        if find(self.name) is not self:
            raise ConfigError(f"Rule {self.name!r} is not registered, so no config can name "
                              f"it; call expandfx.rules.register_rule(rule) first.")
        return RuleConfig(self.name, r, init, tuple(options.items()))

    def __add__(self, other: Any) -> RuleSet:
        return self() + other

    def __radd__(self, other: Any) -> RuleSet:
        return other + self()

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, {self.kind!r})"

    def configured(self, name: str | None = None, **options: Any) -> Rule:
        """This rule with some of its :attr:`options` fixed, as a new rule to register::

            >>> from expandfx.rules import RULES
            >>> rule = RULES["MobileOne"].configured("MobileOne-k2", k=2, norm="bn")
            >>> rule.name, sorted(rule.options)
            ('MobileOne-k2', ['k', 'norm'])

        A config's own setting (``RULES["RepVGG-bn"](norm="scale")``) overrides a fixed one.
        """
        unknown = sorted(set(options) - self.options)
        if unknown:
            raise ConfigError(f"Rule {self.name!r}.configured: it takes no option {unknown}; "
                              f"its options are {sorted(self.options)}.")
        label = name or self.name + "(" + ", ".join(f"{k}={v!r}" for k, v in
                                                   sorted(options.items())) + ")"
        fixed = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
        return replace(self, name=label, build=functools.partial(self.build, **options),
                       summary=f"{self.summary} [{fixed}]")

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "linear"):
            raise ConfigError(f"Rule {self.name!r}: kind must be 'conv' or 'linear', got "
                              f"{self.kind!r}.")


RULES: dict[str, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Make ``rule`` usable by name in ``expand``/``plan`` rule specs; returns it."""
    clash = find(rule.name)
    if clash is not None and clash is not rule:
        raise ConfigError(f"register_rule: a rule named {clash.name!r} is already registered; "
                          f"unregister_rule({clash.name!r}) first or choose another name.")
    RULES[rule.name] = rule
    return rule


def unregister_rule(name: str) -> None:
    rule = find(name)
    if rule is None:
        raise ConfigError(f"unregister_rule: no rule named {name!r}; registered: "
                          f"{sorted(RULES)}.")
    del RULES[rule.name]


def find(name: str) -> Rule | None:
    """The registered rule called ``name`` (any case), or ``None``."""
    folded = name.strip().casefold()
    return next((r for n, r in RULES.items() if n.casefold() == folded), None)

