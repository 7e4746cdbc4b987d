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
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import layer_types
from ..block import ExpandedBlock
from ..errors import ConfigError
from ..layer_types import LAYER_TYPES, TRANSPOSED_TYPES, base_type
from ..linear.costs import param_count
from ..patterns import first_match
from ..rules import RULES
from ..rules.spec import RuleSpec
from ..tracing import GraphView
from .layers import LayerView, unhandled_reason
from .report import _human

__all__ = ["TRANSPOSED_RULES", "capacity_reason", "check_r", "how_requested", "norm_for_shift",
           "requested_explicitly", "shift_reason", "transposed_reason", "unhandled_reason"]

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
    return how_requested(paths, include, rule) is not None


def how_requested(paths: list[str], include: list[str] | None, rule: RuleSpec) -> str | None:
    """How the user named this very layer (``"include=['fc']"``, ``"rule mapping key 'fc'"``),
    or ``None`` when only a glob (or nothing) selects it.

    >>> how_requested(["fc"], ["*", "fc"], "FC")
    "include=['fc']"
    """
    if include is not None:
        named = [p for p in paths if p in include]
        if named:
            return f"include=[{named[0]!r}]"
    spec = dict([rule]) if isinstance(rule, tuple) else rule
    if isinstance(spec, Mapping):
        matched = first_match(paths[0], spec)
        if matched is not None and matched in paths:
            return f"rule mapping key {matched!r}"
    return None


def _output_reason(path: str, view: GraphView) -> str:
    how = ("its result is the model's output" if view.checked else
           "the last linear layer in module order, taken as the output layer because the "
           "model could not be traced")
    mapping = "{" + repr(path) + ": 'FC', ...}"
    return (f"the model's output layer ({how}); the FC rule leaves it alone, as the paper's "
            f"authors do. To expand it, name it exactly: include=['*', {path!r}] or a rule "
            f"mapping {mapping} (command line: --include '*,{path}')")


def _last_linear(layers: list[LayerView], inside_block: dict[int, str]) -> set[int]:
    linear = [id(v.module) for v in layers
              if v.kind == "linear" and id(v.module) not in inside_block]
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


def _not_plain(layer: LayerView) -> str | None:
    """Why a subclass or a hooked layer may compute something else (warned and reported)."""
    path, module, base = layer.path, layer.module, layer.plain
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
                          f"not been initialized: its shapes are unknown until it sees an input. "
                          f"Call the model once on a real input (model(x)), then expand.")


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
        issubclass(base_type(module), (*LAYER_TYPES, *TRANSPOSED_TYPES))
        or layer_types.lookup(module) is not None)


def _opaque_children(model: nn.Module) -> dict[int, str]:
    """Layers inside built-in torch.nn modules that FX keeps opaque (MultiheadAttention, …)."""
    opaque: dict[int, str] = {}
    for path, module in model.named_modules():
        builtin = type(module).__module__.startswith("torch.nn")
        container = isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
        if builtin and not container and not layer_types.is_layer(module):
            for child in module.modules():
                if child is not module:
                    opaque.setdefault(id(child), f"'{path}' ({type(module).__name__})")
    return opaque


def capacity_reason(path: str, rule: str, layer: nn.Module, r: float,
                    build: Callable[[float], ExpandedBlock]) -> str | None:
    """Why the expansion of ``layer`` (a torch layer) would *contract* it, or ``None``.

    An expansion must be able to represent every weight of the layer it replaces (the
    paper's premise: over-parameterization changes training, never what the network can
    compute). Two necessary conditions are checked on the block ``build(r)`` (meta tensors):

    - it holds at least as many parameters as the layer (the composed map is a polynomial
      in the factors, so fewer parameters reach a set of lower dimension);
    - for chains, the composed map can reach the layer's rank: cut the chain after factor
      ``j``; the weight flattened to ``[n, m·K]`` is a product through ``c_j·S_after``
      values (``c_j`` channels per group at the cut, ``S_after`` the taps of the composed
      kernel of the factors after it), and flattened to ``[n·K, m]`` through ``c_j·S_before``.
      A generic layer has rank ``min(n, m·K)`` and ``min(n·K, m)`` (per group).

    The reason names the smallest ``r`` (in steps of 0.25) that passes both.
    """
    def problem(rate: float) -> str | None:
        block = build(rate)
        have, need = param_count(block), param_count(layer)
        if have < need:
            return (f"would hold {_human(have)} parameters for a {_human(need)} layer, so it "
                    f"cannot represent every weight of the layer it replaces")
        bound = _rank_bound(block, layer)
        if bound is not None and bound[0] < bound[1]:
            return (f"composes a map of rank at most {bound[0]} (per group) where the layer "
                    f"reaches rank {bound[1]}, so it cannot represent every weight of the "
                    f"layer it replaces")
        return None

    found = problem(r)
    if found is None:
        return None
    fix = next((f"use r >= {c:g}" for c in (math.floor(r * 4) / 4 + k / 4 for k in range(1, 257))
                if problem(c) is None), "no r up to 64 avoids it; use another rule")
    return f"{rule} at r={r:g} on '{path}' {found}: {fix} (or another rule)"


def _rank_bound(block: ExpandedBlock, layer: nn.Module) -> tuple[int, int] | None:
    """(the chain's largest reachable rank, the layer's) over both flattenings, per group;
    ``None`` for branches and for chains whose factors change the groups."""
    if not block.is_chain:
        return None
    factors = list(block.layers)
    groups = getattr(layer, "groups", 1)
    if any(getattr(f, "groups", 1) != groups for f in factors):
        return None

    def channels(f: nn.Module, side: str) -> int:
        if isinstance(f, nn.Linear):
            return f.in_features if side == "in" else f.out_features
        return (f.in_channels if side == "in" else f.out_channels) // groups

    def taps(chain: list[nn.Module]) -> int:
        sizes = [tuple(getattr(f, "kernel_size", ())) for f in chain]
        dims = max((len(k) for k in sizes), default=0)
        return math.prod(sum(k[d] - 1 for k in sizes if k) + 1 for d in range(dims))

    m, n = channels(factors[0], "in"), channels(factors[-1], "out")
    kernel = math.prod(tuple(getattr(layer, "kernel_size", ())))
    cuts = range(1, len(factors))
    reach_out = min((channels(factors[j - 1], "out") * taps(factors[j:]) for j in cuts),
                    default=min(n, m * kernel))
    reach_in = min((channels(factors[j - 1], "out") * taps(factors[:j]) for j in cuts),
                   default=min(m, n * kernel))
    need_out, need_in = min(n, m * kernel), min(m, n * kernel)
    if reach_out < need_out:
        return reach_out, need_out
    if reach_in < need_in:
        return reach_in, need_in
    return None



# The rules that expand transposed convolutions exactly (expandfx.rules.cl builds the chain).
TRANSPOSED_RULES = frozenset({"CL"})
_WHY_NOT_TRANSPOSED = {
    "CK": "a chain of k×k transposed convolutions does not fold exactly into one "
          "(expandfx.linear.fold folds a chain through one transposed convolution, with "
          "pointwise maps around it)",
}
_BRANCHES = ("sums of transposed-convolution branches are not folded by expandfx.linear.fold "
             "(their cropping and output_padding would have to align per stride phase)")


def transposed_reason(rule: str, layer: LayerView) -> str | None:
    """Why ``rule`` cannot expand the transposed convolution ``layer``, or ``None`` (CL, and
    any layer that is no transposed convolution).

    >>> from expandfx.planning.layers import describe_layer
    >>> up = describe_layer(nn.ConvTranspose2d(4, 4, 5), ["up"])
    >>> print(transposed_reason("CK", up))  # doctest: +ELLIPSIS
    CK does not apply to transposed convolutions: a chain of k×k ...; use CL
    """
    if not layer.transposed or rule in TRANSPOSED_RULES:
        return None
    found = RULES.get(rule)
    branches = found is not None and "norm" in found.options  # RepVGG, ACNet, DBB, ...
    why = _WHY_NOT_TRANSPOSED.get(rule, _BRANCHES if branches else
                                  "it builds blocks of plain convolutions")
    return f"{rule} does not apply to transposed convolutions: {why}; use CL"

def norm_for_shift(view: GraphView, layer: nn.Module, path: str) -> nn.Module | str:
    """The BatchNorm that a bias-free layer's (or its block's) result goes to and nowhere
    else — where the shift of its branch BNs can go (:meth:`ExpandedBlock.contract`) — or
    why there is none (a sentence that says what to do)."""
    fix = (f"use norm='scale' (no shift), give the layer a bias, or exclude '{path}' "
           f"(exclude=[{path!r}])")
    if not view.traced:
        return (f"torch.fx could not trace the model ({view.error}), so it cannot be checked "
                f"that its result goes only to a BatchNorm, which must take the branch BNs' "
                f"shift (the layer has no bias for it); {fix}")
    bn = view.norm_after.get(id(layer))
    if bn is None or view.call_sites[id(layer)] != 1 or view.call_sites[id(bn)] != 1:
        return (f"its result does not go only to a BatchNorm with running statistics (called "
                f"once), so the branch BNs' shift (β − γ·mean/σ) has nowhere to go in the "
                f"compact layer, which has no bias; {fix}")
    return bn


def shift_reason(layer: LayerView, config: Any, view: GraphView,
                 build: Callable[[float | None], ExpandedBlock]) -> str | None:
    """Why a bias-free layer cannot take ``config``'s per-branch BatchNorms
    (``norm="bn"``), or ``None``: their summed shift must go into the BatchNorm that is the
    layer's only use (:func:`norm_for_shift`)."""
    if getattr(layer.torch, "bias", None) is not None or dict(config.options).get("norm") != "bn":
        return None
    if not build(config.r).shift_to_next_norm:
        return None
    why = norm_for_shift(view, layer.module, layer.path)
    return f"{config.rule} with norm='bn' on a bias-free layer: {why}" if isinstance(why, str) \
        else None
