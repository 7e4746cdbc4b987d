"""Why a layer may not be expanded: every per-layer check of the plan, each with its reason.

A layer is left alone (with a reason the plan prints) when it is not a plain conv/linear
(a subclass overriding ``forward``), has tied weights, hooks or extra tensors, is read
functionally outside its own call, is the model's output layer under FC, or sits inside
a ``torch.nn`` module that reads its weights itself; a lazy layer or a bad ``r`` raises.

Example::

    >>> check_r(2)
    2.0
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import registry
from ..errors import ConfigError
from ..helpers import first_match
from ..registry import LAYER_TYPES, base_type, torch_layer_type
from ..rules.spec import RuleSpec
from ..tracing import GraphView

__all__ = ["check_r", "requested_explicitly"]

if TYPE_CHECKING:
    from .decide import _Context

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HARMLESS = {"__init__", "extra_repr", "__repr__", "reset_parameters", "__setstate__",
             "__getstate__", "_get_name"}


def requested_explicitly(paths: list[str], include: list[str] | None,
                         rule: RuleSpec) -> bool:
    """Whether the user named this very layer: its exact path in ``include=``, or as the
    pattern of the rule mapping that matches it (a glob that matches it is not a request).

    >>> requested_explicitly(["fc"], ["*", "fc"], "FC"), requested_explicitly(["fc"], ["*"], "FC")
    (True, False)
    >>> requested_explicitly(["fc"], None, {"fc": "FC"})
    True
    >>> requested_explicitly(["fc"], None, {"f*": "FC"})
    False
    """
    if include is not None and any(p in include for p in paths):
        return True
    spec = dict([rule]) if isinstance(rule, tuple) else rule
    if isinstance(spec, Mapping):
        matched = first_match(paths[0], spec)
        return matched is not None and matched in paths
    return False


def _output_reason(path: str, view: GraphView) -> str:
    how = ("its result is the model's output" if view.checked else
           "the last linear layer in module order, taken as the output layer because the "
           "model could not be traced")
    mapping = "{" + repr(path) + ": 'FC', ...}"
    return (f"the model's output layer ({how}); the FC rule leaves it alone, as the paper's "
            f"authors do. To expand it, name it exactly: include=['*', {path!r}] or a rule "
            f"mapping {mapping}")


def _last_linear(layers: list[tuple[int, nn.Module]], inside_block: dict[int, str]) -> set[int]:
    linear = [key for key, m in layers if registry.is_linear(m) and key not in inside_block]
    return set(linear[-1:])


def check_r(r: Any) -> float:
    """``r`` as a float, or a ConfigError (numbers, numpy scalars and 0-d tensors accepted)."""
    ok = not isinstance(r, (bool, str)) and (isinstance(r, numbers.Real) or (
        isinstance(r, torch.Tensor) and r.numel() == 1 and r.is_floating_point()))
    value = float(r) if ok else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"expand: r must be a positive number (the paper uses 0.25 to 8), "
                          f"got r={r!r}.")
    return value


def _not_plain(path: str, module: nn.Module) -> str | None:
    """Why a subclass or a hooked layer may compute something else (warned and reported)."""
    base = _plain_base(module)
    cls, torch_cls = _name(type(module)), _name(base)
    custom = _custom_methods(module, base)
    extra = sorted(set(module._parameters) - {"weight", "bias"} | set(module._buffers))
    hooked = any(getattr(module, h) for h in _HOOKS)
    reason = None
    if custom:
        reason = (f"{cls} subclasses {torch_cls} and overrides {', '.join(custom)}, so it is "
                  f"not a plain {torch_cls}: left alone")
        fix = (f"Expand it by hand, or use a plain {torch_cls} (or expandfx.register_layer "
               f"the class) if it computes the same")
    elif extra:
        reason = (f"{cls} has tensors besides weight and bias "
                  f"({', '.join(extra)}) that an expanded block would not carry: left alone")
        fix = "Move those tensors to a parent module to expand this layer"
    elif hooked:
        reason = "has forward hooks, which an expanded block would silently drop: left alone"
        fix = "Remove the hooks (handle.remove()) to expand it, and re-register them after"
    if reason:
        warnings.warn(f"expand: '{path}': {reason}. {fix}.", stacklevel=5)
    return reason


def _graph_reason(module: nn.Module, ctx: _Context) -> str | None:
    """Why the traced or recorded forward says the layer cannot be swapped."""
    view, key = ctx.view, id(module)
    if view.checked:
        if view.direct_uses.get(key):
            return (f"its parameters are used directly in forward "
                    f"({'; '.join(view.direct_uses[key])}): expanding would break that use")
        if view.call_sites[key] == 0:
            inside = ctx.opaque.get(key)
            where = "traced" if view.traced else "recorded"
            return (f"never called as a module in the {where} forward"
                    + (f" ({inside} reads its weights directly)" if inside else ""))
    elif key in ctx.opaque:
        return f"inside {ctx.opaque[key]}, which reads its weights directly"
    return None


def _reject_lazy(path: str, module: nn.Module) -> None:
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        raise ConfigError(f"expand: '{path}' ({type(module).__name__}) is a lazy module that has "
                          f"not been initialized. Run one forward pass with a real input first "
                          f"(or pass example_inputs and call the model once), then expand.")


def _unusable(path: str, module: nn.Module, explicit: bool) -> str | None:
    """A layer whose weight is computed (pruning, weight norm): skipped with the reason, or
    a ConfigError when the user asked for this very layer."""
    if _is_parametrized_layer(module):
        names = ", ".join(f"{name} ({', '.join(type(p).__name__ for p in plist)})"
                          for name, plist in module.parametrizations.items())
        what = f"already has parametrizations on {names}"
        fix = ("Make the weight plain first (torch.nn.utils.parametrize."
               "remove_parametrizations(layer, 'weight') keeps its current value), or, for "
               "expandfx.compand, expand before compand")
    elif not isinstance(module._parameters.get("weight"), nn.Parameter):
        what = ("has no weight parameter of its own (its weight is computed by a hook, as "
                "torch.nn.utils.prune and the old torch.nn.utils.weight_norm do)")
        fix = ("Make it permanent first (prune.remove(module, 'weight'), "
               "torch.nn.utils.remove_weight_norm), then expand")
    else:
        return None
    if explicit:
        raise ConfigError(f"expand: '{path}' {what}. {fix}.")
    return f"{what}: left alone. {fix} to expand it"


def _plain_base(module: nn.Module) -> type[nn.Module]:
    """The class a layer must not override: its registered class, else the torch layer."""
    found = registry.lookup(module)
    return found[0] if found else torch_layer_type(module)


def _custom_methods(module: nn.Module, base: type[nn.Module]) -> list[str]:
    """Methods of the torch base class that the module's class (or a mixin) overrides."""
    names = set()
    for cls in type(module).__mro__:
        if cls is base:
            break
        if cls is nn.Module or cls is object:
            continue
        names |= {n for n, v in vars(cls).items() if callable(v) and hasattr(base, n)}
    return sorted(names - _HARMLESS)


def _name(cls: type) -> str:
    """``Conv2dSame``, or ``timm.layers.linear.Linear`` where the short name is ambiguous."""
    torch_names = {c.__name__ for c in LAYER_TYPES}
    ours = cls.__module__.startswith("torch.nn")
    return cls.__name__ if ours or cls.__name__ not in torch_names else \
        f"{cls.__module__}.{cls.__qualname__}"


def _tied(module: nn.Module, paths: list[str], owners: dict[int, set[str]]) -> str | None:
    own = {f"{p}.{n}" if p else n for p in paths for n in ("weight", "bias")}
    for name in ("weight", "bias"):
        param = module._parameters.get(name)
        others = sorted(owners.get(id(param), set()) - own) if param is not None else []
        if others:
            return (f"its {name} is tied to {', '.join(others)}; expanding would untie them: "
                    f"left alone")
    return None


def _is_parametrized_layer(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) and (
        issubclass(base_type(module), LAYER_TYPES) or registry.lookup(module) is not None)


def _opaque_children(model: nn.Module) -> dict[int, str]:
    """Layers inside built-in torch.nn modules that FX keeps opaque (MultiheadAttention, …)."""
    opaque: dict[int, str] = {}
    for path, module in model.named_modules():
        builtin = type(module).__module__.startswith("torch.nn")
        container = isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        if builtin and not container and not registry.is_layer(module):
            for child in module.modules():
                if child is not module:
                    opaque.setdefault(id(child), f"'{path}' ({type(module).__name__})")
    return opaque
