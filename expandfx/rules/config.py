"""Rule configs: a registered rule with its settings, validated when it is made.

Calling a registered :class:`~expandfx.rules.base.Rule` returns a :class:`RuleConfig` — a
frozen, hashable value (``CL(r=4)``, ``FC(r=4, init='preserve')``, ``RepVGG(norm='bn')``)
that ``expand`` and ``plan`` take wherever they take a rule string: alone, combined with
``+`` (one rule per layer kind, as ``"CK+FC"``) into a :class:`RuleSet`, or as the values of
a mapping from module-name patterns, which gives every layer its own settings. What a rule
takes comes from its metadata (:attr:`Rule.uses_r`, :attr:`Rule.inits`, :attr:`Rule.options`
and the defaults of its ``build``), so every registered rule — a user's own included — gets
a config without extra code, and an impossible combination fails here, naming the rule and
the fix, instead of deep inside ``expand``.

Example::

    >>> from expandfx.rules import RULES
    >>> CL, FC, RepVGG = RULES["CL"], RULES["FC"], RULES["RepVGG"]
    >>> CL(r=4), RepVGG(norm="bn"), CL(r=2) + FC(r=4)
    (CL(r=4), RepVGG(norm='bn'), CL(r=2) + FC(r=4))
    >>> RepVGG(norm=None) == RepVGG()          # build's own default: the same config
    True
    >>> RepVGG(r=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    expandfx.errors.ConfigError: RepVGG(r=4): RepVGG does not use r (...); drop r=. ...

Why configs and not more keywords of ``expand``: a rule's settings differ from rule to rule
(``r`` means nothing to a branch rule, ``init="preserve"`` is impossible for CK, ``norm``
and ``k`` belong to some rules only) and from layer to layer; a value that carries them can
be checked once, shown in the plan, compared and reused.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ..block import ExpandedBlock
    from .base import Rule

__all__ = ["DEFAULT_R", "INITS", "OPTION_CHECKS", "RuleConfig", "RuleSet", "as_ruleset"]

DEFAULT_R = 4.0
INITS = ("default", "preserve")


def _check_norm(value: Any, config: RuleConfig | None) -> str | None:
    from .norms import NORMS

    if value not in NORMS:
        return (f"norm must be one of {NORMS} (None: plain branches, 'scale': OREPA's "
                f"per-branch channel scale, 'bn': a BatchNorm per branch), got {value!r}")
    if value == "bn" and config is not None and config.init == "preserve":
        return ("init='preserve' with norm='bn' cannot hold: a BatchNorm in training mode "
                "normalizes with the batch's statistics, so no init makes the block compute "
                "the layer. Use init='default', or norm='scale' / None")
    return None


def _check_k(value: Any, config: RuleConfig) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"k (the number of parallel k×k branches) must be an integer ≥ 1, got {value!r}"
    return None


# option name -> (value, config) -> why the value is wrong, or None. Any rule whose
# ``options`` name one of these gets the check; other options are checked by ``build``.
OPTION_CHECKS: dict[str, Callable[[Any, RuleConfig], str | None]] = {
    "norm": _check_norm, "k": _check_k,
}

_NO_DEFAULT = object()


@dataclass(frozen=True, repr=False)
class RuleConfig:
    """A registered rule with its settings; build one by calling the rule (``efx.CL(r=4)``).

    Attributes:
        rule: the registered rule's name (``"CL"``).
        r: the expansion rate of a rule that uses it (:attr:`Rule.uses_r`; default 4),
            ``None`` for the others (the branch rules keep the layer's width).
        init: ``"default"`` or ``"preserve"`` (the block computes exactly the layer), where
            the rule can honour it (:attr:`Rule.inits`).
        options: the rule's own keyword settings (``norm``, ``k``) as sorted pairs; those
            equal to ``build``'s default are dropped, so equal settings make equal configs.

    Frozen and hashable; ``+`` combines configs for different layer kinds into a
    :class:`RuleSet`.
    """

    rule: str
    r: float | None = None
    init: str = "default"
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        from .base import RULES, find

        spec = find(self.rule) if isinstance(self.rule, str) else None
        if spec is None:
            raise ConfigError(f"RuleConfig: unknown rule {self.rule!r}; registered rules are "
                              f"{sorted(RULES)}.")
        object.__setattr__(self, "rule", spec.name)
        given = dict(self.options)
        label = _label(spec.name, self.r, self.init, given)
        if spec.uses_r:
            object.__setattr__(self, "r", DEFAULT_R if self.r is None else _rate(self.r, label))
        elif self.r is not None:
            users = sorted(n for n, x in RULES.items() if x.uses_r)
            raise ConfigError(f"{label}: {spec.name} does not use r (its branches keep the "
                              f"layer's width); drop r=. r sets the widths of the rules that "
                              f"use it: {users}.")
        if self.init not in INITS:
            raise ConfigError(f"{label}: init must be one of {INITS}, got {self.init!r}.")
        if self.init not in spec.inits:
            able = sorted(n for n, x in RULES.items() if self.init in x.inits)
            raise ConfigError(f"{label}: {spec.name} cannot honour init={self.init!r} (its "
                              f"inits: {list(spec.inits)}). Use init='default', or a rule that "
                              f"takes init={self.init!r}: {able}.")
        unknown = sorted(set(given) - spec.options)
        if unknown:
            takers = sorted(n for n, x in RULES.items() if set(unknown) & x.options)
            settings = (["r"] if spec.uses_r else []) + ["init"] + sorted(spec.options)
            elsewhere = f"; rules that take it: {takers}" if takers else ""
            raise ConfigError(f"{label}: {spec.name} takes no setting {unknown}; its settings "
                              f"are {', '.join(settings)}{elsewhere}.", code="unknown_option",
                              where=spec.name)
        why = spec.check_options(given) if spec.check_options else None
        if why:
            raise ConfigError(f"{label}: {why}.", code="bad_option", where=spec.name)
        kept = {}
        for name, value in given.items():
            check = OPTION_CHECKS.get(name)
            why = check(value, self) if check else None
            if why:
                raise ConfigError(f"{label}: {why}.")
            if value != _build_default(spec, name):
                kept[name] = value
        object.__setattr__(self, "options", tuple(sorted(kept.items())))

    @property
    def kind(self) -> str:
        """``"conv"`` or ``"linear"``: the layers this config's rule applies to."""
        return self._spec().kind

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    def replace(self, **changes: Any) -> RuleConfig:
        """This config with some settings changed (validated again)::

            >>> from expandfx.rules import RULES
            >>> RULES["CL"](r=4).replace(r=2)
            CL(r=2)
        """
        fields = {"r": self.r, "init": self.init, **dict(self.options), **changes}
        return self._spec()(**fields)

    def build(self, layer: nn.Module, *, path: str = "", device: Any = None) -> ExpandedBlock:
        """The block this config makes of ``layer`` (a torch layer)."""
        spec = self._spec()
        return spec.build(layer, self.r if spec.uses_r else 1.0, self.init, path=path,
                          device=device, **dict(self.options))  # a branch block: r is None

    def _spec(self) -> Rule:
        from .base import find

        spec = find(self.rule)
        if spec is None:
            raise ConfigError(f"{self!r}: rule {self.rule!r} is no longer registered; "
                              f"register_rule it again.")
        return spec

    def __add__(self, other: Any) -> RuleSet:
        return RuleSet((self,)) + other

    def __radd__(self, other: Any) -> RuleSet:
        return as_ruleset(other, "+") + self

    def __repr__(self) -> str:
        return _label(self.rule, self.r, self.init, dict(self.options))


@dataclass(frozen=True, repr=False)
class RuleSet:
    """Configs for different layer kinds, at most one each (``CK(r=2) + FC(r=4)``, what
    ``"CK+FC"`` means); ``for_kind`` picks a layer's."""

    configs: tuple[RuleConfig, ...]

    def __post_init__(self) -> None:
        flat: list[RuleConfig] = []
        for c in self.configs:
            flat.extend(c.configs if isinstance(c, RuleSet) else [_one(c)])
        for kind in ("conv", "linear"):
            same = sorted(c.rule for c in flat if c.kind == kind)
            if len(same) > 1:
                raise ConfigError(f"expand: {' + '.join(map(repr, flat))} gives {kind} layers "
                                  f"{same}; a layer takes one rule. Use a mapping from "
                                  f"module-name patterns to rules to mix them per layer.")
        object.__setattr__(self, "configs", tuple(sorted(flat, key=lambda c: c.kind)))

    def for_kind(self, kind: str) -> RuleConfig | None:
        return next((c for c in self.configs if c.kind == kind), None)

    def __add__(self, other: Any) -> RuleSet:
        return RuleSet(self.configs + as_ruleset(other, "+").configs)

    def __radd__(self, other: Any) -> RuleSet:
        return as_ruleset(other, "+") + self

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.configs))


def as_ruleset(value: Any, where: str) -> RuleSet:
    """A config, a rule (its defaults) or a set of them as a :class:`RuleSet`."""
    if isinstance(value, RuleSet):
        return value
    return RuleSet((_one(value, where),))


def _one(value: Any, where: str = "+") -> RuleConfig:
    from .base import Rule

    if isinstance(value, Rule):
        return value()
    if isinstance(value, RuleConfig):
        return value
    raise ConfigError(f"expand: {where} combines rule configs (efx.CK(r=2) + efx.FC(r=4)); got "
                      f"{type(value).__name__} {value!r}. Write a rule string as its config, "
                      f"e.g. 'FC' as efx.FC(r=4).")


def _rate(r: Any, label: str) -> float:
    ok = not isinstance(r, (bool, str)) and isinstance(r, numbers.Real)
    if not ok and hasattr(r, "numel") and r.numel() == 1 and r.is_floating_point():
        ok = True  # a 0-d tensor
    value = float(r) if ok else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{label}: r must be a positive number (the paper uses 0.25 to 8), "
                          f"got r={r!r}.")
    return value


def _build_default(spec: Rule, name: str) -> Any:
    """The default of ``build``'s keyword ``name`` (a configured rule's fixed value)."""
    try:
        param = inspect.signature(spec.build).parameters.get(name)
    except (TypeError, ValueError):
        return _NO_DEFAULT
    if param is None or param.default is inspect.Parameter.empty:
        return _NO_DEFAULT
    return param.default


def _label(name: str, r: Any, init: str, options: dict[str, Any]) -> str:
    parts = []
    if r is not None:
        parts.append(f"r={r:g}" if isinstance(r, float | int) and not isinstance(r, bool)
                     else f"r={r!r}")
    if init != "default":
        parts.append(f"init={init!r}")
    parts += [f"{k}={v!r}" for k, v in sorted(options.items())]
    return f"{name}({', '.join(parts)})"
