"""``ExpandedBlock``: the module that stands in for one expanded conv/linear layer.

A block is the original layer's template, its factor modules (plain ``nn.Conv{1,2,3}d`` /
``nn.Linear``) and a *topology* over them (:mod:`expandfx.linear.ir`): a chain (CL, CK,
FC), parallel branches summed (ACNet, RepVGG), or branches that are chains. ``sequential``
mode interprets the topology, ``collapsed`` folds it differentiably, ``contract`` folds it
exactly (float64). The ``state_dict`` keys follow the module tree and are stable::

    <path>.layers.0.weight, <path>.layers.1.weight, ...        # a chain
    <path>.branches.kxk.weight, <path>.branches.1x1.weight, ... # branches

so a checkpoint saved mid-training loads into ``expand(fresh_model, same args)``.
It remembers the original layer (as a parameter-free template, outside the
``state_dict``) so that :meth:`ExpandedBlock.contract` rebuilds the exact
original class and hyperparameters.

Example::

    >>> import torch, torch.nn as nn
    >>> from expandfx.rules import cl
    >>> conv = nn.Conv2d(3, 8, 5, padding=2)
    >>> block = cl.build(conv, r=2)
    >>> [k for k in block.state_dict()][:2]
    ['layers.0.weight', 'layers.0.bias']
    >>> small = block.contract()
    >>> type(small) is nn.Conv2d and small.padding == (2, 2)
    True
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import registry
from .copying import parameter_free_copy
from .errors import ConfigError, ContractionError, FoldError
from .linear import costs
from .linear.compose import WeightBias, compose_chain, tune_kernels
from .linear.fold import fold
from .linear.ir import (
    PAD_MODES,
    Affine,
    Geometry,
    Identity,
    Node,
    Par,
    Seq,
    batchnorm,
    explicit_padding,
    leaves,
    map_leaves,
    pairs_from_pad,
    run,
)

__all__ = ["CONV_TYPES", "HYPERPARAMETERS", "LAYER_TYPES", "MODES", "ExpandedBlock", "base_type",
           "check_mode", "explicit_padding", "frozen", "layer_signature", "set_mode",
           "torch_layer_type"]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES: tuple[type[nn.Module], ...] = (*CONV_TYPES, nn.Linear)


def base_type(layer: nn.Module) -> type[nn.Module]:
    """The layer's class, looking through ``torch.nn.utils.parametrize``."""
    return parametrize.type_before_parametrizations(layer)


def torch_layer_type(layer: nn.Module) -> type[nn.Module]:
    """The torch class a (possibly subclassed) conv/linear layer derives from."""
    return next(c for c in base_type(layer).__mro__ if c in LAYER_TYPES)


# Hyperparameters an ExpandedBlock answers for its original layer (``block.in_features``).
HYPERPARAMETERS = frozenset({
    "in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
    "padding", "dilation", "groups", "padding_mode", "transposed", "output_padding",
})


def layer_signature(layer: nn.Module) -> tuple[Any, ...]:
    """Everything about a factor layer that its place in an exact chain depends on."""
    kind = base_type(layer)
    if issubclass(kind, nn.Linear):
        return (kind, layer.in_features, layer.out_features, layer.bias is not None)
    if issubclass(kind, CONV_TYPES):
        return (kind, layer.in_channels, layer.out_channels, layer.kernel_size,
                layer.stride, layer.padding, layer.dilation, layer.groups,
                layer.bias is not None, layer.padding_mode)
    return (kind,)


MODES = ("auto", "collapsed", "sequential")
# Blocks inside efx.frozen(): block -> [depth, (key, folded weights) or None]. Kept outside
# the blocks so that deepcopy / pickle never carry a cache or the frozen state along.
_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"execution mode must be one of {MODES}, got {mode!r}.")
    return mode


# Set to "0" to make ``mode="auto"`` decide by the MAC model alone (reproducible runs).
MEASURE_ENV = "EXPANDFX_AUTO_MEASURE"


def measuring_enabled() -> bool:
    """Whether ``auto`` blocks may time their modes (the ``EXPANDFX_AUTO_MEASURE`` switch)."""
    return os.environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# (block structure, input key) -> the measured mode, shared by identical blocks of a process
_DECISIONS: dict[tuple[Any, ...], str] = {}


def set_mode(model: nn.Module, mode: str, *, measure: bool | None = None) -> nn.Module:
    """Switch every expanded block of ``model`` to ``mode`` (in place); returns ``model``.

    ``measure`` (for ``"auto"``): ``True``/``False`` lets the blocks time both executions
    or makes them decide by the MAC model alone; ``None`` keeps each block's setting
    (default: follow ``EXPANDFX_AUTO_MEASURE``, on unless set to ``0``). Forgets the
    decisions ``auto`` measured so far for blocks of these structures.

    >>> import expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> big = efx.set_mode(efx.expand(smallnet_7x7(), "CL", r=2), "collapsed")
    >>> big.features[0].mode
    'collapsed'
    """
    check_mode(mode)
    for module in model.modules():
        if isinstance(module, ExpandedBlock):
            module.mode = mode
            if measure is not None:
                module.measure = bool(measure)
            module._auto.clear()
            for key in [k for k in _DECISIONS if k[0] == module._structure()]:
                del _DECISIONS[key]
    return model


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Inference with folded weights cached between forwards (eval mode, ``no_grad``).

    Inside the block, collapsed blocks compose their factors once instead of at every
    forward. Do not edit weights through ``.data`` inside it (version counters cannot
    see such edits); optimizer steps and ``load_state_dict`` are detected.

    >>> import torch, expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> big = efx.expand(smallnet_7x7(), "CL", r=2, mode="collapsed").eval()
    >>> with efx.frozen(big), torch.no_grad():
    ...     y = big(torch.randn(2, 3, 32, 32))
    """
    found = [m for m in model.modules() if isinstance(m, ExpandedBlock)]
    for block in found:  # [nesting depth, cached fold]; copies of a block are not in here
        _FROZEN.setdefault(block, [0, None])[0] += 1
    try:
        yield model
    finally:
        for block in found:
            state = _FROZEN.get(block)
            if state is not None:
                state[0] -= 1
                if state[0] <= 0:
                    del _FROZEN[block]


class ExpandedBlock(nn.Module):
    """Factor layers and a linear topology over them, equivalent after folding to one layer.

    Args:
        original: the layer being replaced; only its hyperparameters are kept.
        layers: the factors. A list is a chain (applied in order, registered as
            ``layers``); a dict ``{name: factor}`` is a set of parallel branches whose
            outputs are summed (registered as ``branches``), where a factor is a layer, a
            list of layers (a chain inside a branch) or ``nn.Identity()`` (the input).
        rule: the rule's name (``"CL"``, ``"ACNet"``, ...; recorded for plans and reprs).
        r: the expansion rate used.
        pre_pad: padding in ``F.pad`` order applied before the first layer of a chain, for
            paddings a conv cannot express (asymmetric ``"same"``); ``None`` if the
            first layer pads itself.
        mode: ``"sequential"`` runs the topology layer by layer (as in the paper);
            ``"collapsed"`` folds the factors into one weight (differentiably, in the
            working dtype) and runs the original layer's op once — same function, same
            gradients for every factor, the compact layer's activations; ``"auto"``
            picks the faster per input shape, dtype, device and grad mode: it times both
            once (forward, and backward when gradients are needed; a few repeats), where
            that is safe, else decides by the MAC model (see :meth:`resolve_mode`).
    """

    __jit_unused_properties__ = ["original_type", "weight", "bias", "factors"]

    def __init__(self, original: nn.Module, layers: list[nn.Module] | dict[str, Any],
                 rule: str, r: float, pre_pad: list[int] | None = None,
                 mode: str = "auto") -> None:
        super().__init__()
        self.mode = check_mode(mode)
        self.measure: bool | None = None  # None: follow EXPANDFX_AUTO_MEASURE
        self._auto: dict[tuple[Any, ...], str] = {}
        self.act: nn.Module | None = None  # only for nonlinear-counterpart init (+Init)
        if isinstance(layers, dict):
            if pre_pad is not None:
                raise ConfigError("ExpandedBlock: pre_pad applies to chains only; give each "
                                  "branch its own padding.")
            self.branches = nn.ModuleDict(
                {name: nn.ModuleList(f) if isinstance(f, list) else f
                 for name, f in layers.items()})
        else:
            self.layers = nn.ModuleList(layers)
        self.topology: Node = self._current_topology()  # fixed now; check() compares
        self.rule = rule
        self.r = float(r)
        self.pre_pad = pre_pad
        self.pad_mode = PAD_MODES[getattr(original, "padding_mode", "zeros")]
        self.signatures = [layer_signature(layer) for layer in self.factors]
        # Kept out of the module tree on purpose: not in state_dict, not moved by .to().
        object.__setattr__(self, "template", parameter_free_copy(original))
        self.train(original.training)
        if self.mode == "collapsed":
            self._refuse_collapsed()
        self._check_fold_matches(rule)
        groups = getattr(self.template, "groups", 1)
        self._plain_chain = self.is_chain and all(
            getattr(f, "groups", 1) == groups for f in self.layers)

    @property
    def mode(self) -> str:
        """``"auto"``, ``"collapsed"`` or ``"sequential"``; setting ``"collapsed"`` on a block
        whose branch BatchNorms are in training mode raises (see :meth:`batch_statistics`)."""
        state = self.__dict__
        return state.get("_mode", state.get("mode", "auto"))  # "mode": pickled before this

    @mode.setter
    def mode(self, value: str) -> None:
        check_mode(value)
        if value == "collapsed":
            self._refuse_collapsed()
        self.__dict__["_mode"] = value

    def batch_statistics(self) -> list[str]:
        """Paths of the block's BatchNorms that normalize by batch statistics now (training
        mode, or no running statistics): while any does, the block is not a linear map of
        its input and runs only sequentially. Empty for blocks without ``norm="bn"``."""
        modules = self.__dict__.get("_modules", {})
        if "branches" not in modules:
            return []
        return [path for path, m in self.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and (m.training or not m.track_running_stats)]

    def _refuse_collapsed(self) -> None:
        found = self.batch_statistics()
        if found:
            raise ConfigError(
                f"ExpandedBlock ({self.rule}, norm='bn'): mode='collapsed' is refused while its "
                f"branch BatchNorms {found[:3]} are in training mode: a BatchNorm normalizes by "
                f"the batch's statistics then, which is not a linear map, so the branches "
                f"cannot be folded into one convolution. Use mode='sequential' or 'auto' "
                f"(which runs the branches), norm='scale' (linear, trains collapsed), or put "
                f"the model in eval mode (the BNs then fold with their running statistics).")

    def _check_fold_matches(self, rule: str) -> None:
        """A rule cannot build a wrong block: its topology must fold (on meta tensors) to the
        original layer's weight shape, bias presence and geometry."""
        kernel = tuple(getattr(self.template, "kernel_size", ()))
        try:
            one = fold(self.linear_map(meta=True))
        except FoldError as exc:
            raise ContractionError(f"ExpandedBlock({rule}): the factors do not fold to one "
                                   f"layer ({exc}); the rule built an invalid block.") from None
        found = (tuple(one.weight.shape), one.bias is not None, one.geometry.canonical(kernel))
        want = (tuple(self.template.weight.shape), self.template.bias is not None,
                Geometry.of(self.template).canonical(kernel))
        if found != want:
            raise ContractionError(
                f"ExpandedBlock({rule}): the factors fold to (weight shape, bias, geometry) "
                f"{found}, but the {type(self.template).__name__} they replace has {want}; the "
                f"rule built a block that does not compute a map of that layer.")

    def __setstate__(self, state: dict[str, Any]) -> None:  # blocks pickled before topologies
        super().__setstate__(state)
        if "topology" not in self.__dict__:
            self.topology = self._current_topology()

    @property
    def is_chain(self) -> bool:
        """Whether the block is one chain of factors (CL, CK, FC), not branches."""
        return "layers" in self._modules

    @property
    def factors(self) -> list[nn.Module]:
        """Every factor layer, in topology order (``Identity`` branches have none)."""
        return [self.get_submodule(path) for path in self.factor_paths]

    @property
    def factor_paths(self) -> list[str]:
        return [leaf for leaf in leaves(self.topology) if not isinstance(leaf, Identity)]

    @property
    def original_type(self) -> type[nn.Module]:
        return type(self.template)

    @property
    def weight(self) -> torch.Tensor:
        """The block's effective weight (differentiable): what ``contract`` will fold to, in
        the original layer's layout (``[in, out]`` for transformers' Conv1D)."""
        return registry.original_layout(self, self.weight_bias()[0])

    @property
    def bias(self) -> torch.Tensor | None:
        """The block's effective bias (differentiable), or ``None``."""
        return self.weight_bias()[1]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in HYPERPARAMETERS and hasattr(self.__dict__.get("template"), name):
                return getattr(self.__dict__["template"], name)  # e.g. fc.in_features
            raise

    def linear_map(self, dtype: torch.dtype | None = None, *, meta: bool = False,
                   params: dict[str, WeightBias] | None = None) -> Node:
        """The topology with each factor as an :class:`~expandfx.linear.ir.Affine` of its
        current weight and bias (differentiable); ``params`` substitutes ``{path: (w, b)}``,
        ``meta=True`` uses shape-only tensors. ``fold(block.linear_map())`` is the block."""
        first = self.factor_paths[0] if self.pre_pad is not None else None

        def affine(path: str) -> Affine:
            layer = self.get_submodule(path)
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):  # a per-branch norm
                return _norm_affine(layer, self.template, meta).to(dtype)
            w, b = params[path] if params is not None else (layer.weight, layer.bias)
            if meta:
                w, b = w.to("meta"), None if b is None else b.to("meta")
            geometry = Geometry.of(layer)
            if path == first:  # the block pads before its first layer
                geometry = geometry.with_padding(pairs_from_pad(self.pre_pad),
                                                 self.template.padding_mode)
            return Affine(w, b, geometry).to(dtype)

        return map_leaves(self.topology, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "act", None) is not None:  # nonlinear counterpart: layer, act, layer
            if self.pre_pad is not None:
                x = F.pad(x, self.pre_pad, mode=self.pad_mode)
            for i, layer in enumerate(self.layers):
                x = layer(x) if i == 0 else layer(self.act(x))
            return x
        if self.resolve_mode(x) == "collapsed":
            weight, bias = self.folded()
            if isinstance(self.template, nn.Linear):
                return F.linear(x, weight, bias)
            return self.template._conv_forward(x, weight, bias)  # the original layer's op
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return run(self.topology, x, lambda path, y: self.get_submodule(path)(y))

    def resolve_mode(self, x: torch.Tensor | Sequence[int]) -> str:
        """``"sequential"`` or ``"collapsed"`` for this input (a tensor, or just its shape).

        ``auto`` decides once per input shape, dtype, device, grad mode and autocast state
        and caches the choice — shared by every block of the same structure in the process,
        so identical blocks (copies, a checkpoint loaded into a fresh expansion) run the same
        mode and compute the same bits. Given a tensor in ordinary eager execution it *measures*:
        both executions run on detached copies of the input and of the factor weights
        (forward, plus backward through ``torch.autograd.grad`` when gradients are needed;
        a warm-up round, then one timed round, or three interleaved ones when the two are
        within 3×; median), so no autograd graph, ``.grad``, hook or RNG state of the caller
        is touched. A block whose warm-up takes over a second is not timed further (the MAC
        model decides). It falls back to the MAC
        model of :mod:`expandfx.linear.costs` (and does not cache) under ``torch.compile``, FX or
        JIT tracing, functorch transforms, CUDA graph capture, for meta/fake/subclass
        tensors, when given a shape only, and when measuring is switched off
        (``set_mode(model, "auto", measure=False)`` or ``EXPANDFX_AUTO_MEASURE=0``). When
        the MAC model already sees one mode 8× cheaper, that decides without timing. Both
        modes compute the same function; only the speed depends on the choice.
        """
        if self.mode != "auto":
            if self.mode == "collapsed":
                self._refuse_collapsed()
            return self.mode
        if self.batch_statistics():  # training-mode BN branches: not a linear map
            return "sequential"
        if not isinstance(x, torch.Tensor):
            return self._model_choice(tuple(x))
        grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        key = (tuple(x.shape), x.dtype, x.device, grad, _autocast(x))
        found = self._auto.get(key)
        if found is not None:
            return found
        if not self._may_measure(x):
            return self._model_choice(tuple(x.shape))
        # one decision per block structure in the process: identical blocks (a copy, a
        # checkpoint loaded into a fresh expansion) run the same mode, so compute the same bits
        shared = (self._structure(), key)
        choice = _DECISIONS.get(shared)
        if choice is None:
            choice = _DECISIONS[shared] = self._measure(x, grad)
        self._auto[key] = choice
        return choice

    def _structure(self) -> tuple[Any, ...]:
        return (layer_signature(self.template), tuple(self.signatures), self.topology,
                None if self.pre_pad is None else tuple(self.pre_pad), self.pad_mode,
                tuple(p.requires_grad for p in self.parameters()))

    def _model_choice(self, shape: tuple[int, ...]) -> str:
        return costs.cheaper_mode(self, shape)

    def _may_measure(self, x: torch.Tensor) -> bool:
        measure = self.__dict__.get("measure")  # absent on blocks pickled before it existed
        enabled = measure if measure is not None else measuring_enabled()
        if not enabled or _tracing_or_transformed():
            return False
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules()):
            return False  # eval-mode branch BNs: the MAC model decides (timing runs convs)
        tensors = [x, *self.parameters()]
        if any(type(t) not in (torch.Tensor, nn.Parameter) or t.is_meta
               or t.device != x.device for t in tensors):
            return False
        if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
            return False
        return not (x.is_cuda and torch.cuda.is_current_stream_capturing())

    def _measure(self, x: torch.Tensor, grad: bool) -> str:
        seq_macs = costs.sequential_macs(self, x.shape)
        col_macs = costs.collapsed_macs(self, x.shape)
        if seq_macs > 8 * col_macs or col_macs > 8 * seq_macs:
            return "collapsed" if col_macs <= seq_macs else "sequential"
        paths = self.factor_paths
        params = [(layer.weight, layer.bias) for layer in self.factors]
        with torch.no_grad():  # current values (through any parametrization), as new leaves
            weights = [(w.detach(), None if b is None else b.detach()) for w, b in params]
        if grad:
            for (w, b), (w0, b0) in zip(weights, params, strict=True):
                w.requires_grad_(w0.requires_grad)
                if b is not None:
                    b.requires_grad_(b0.requires_grad)
        x = x.detach().requires_grad_(grad and x.requires_grad)
        leaves = [t for pair in weights for t in pair if t is not None and t.requires_grad]
        if grad and x.requires_grad:
            leaves.append(x)
        if grad and self.is_chain:
            tune_kernels(weights, getattr(self.template, "groups", 1))
        by_path = dict(zip(paths, weights, strict=True))

        def apply(path: str, y: torch.Tensor) -> torch.Tensor:
            layer, (w, b) = self.get_submodule(path), by_path[path]
            return F.linear(y, w, b) if isinstance(layer, nn.Linear) else \
                layer._conv_forward(y, w, b)

        def sequential() -> torch.Tensor:
            y = x if self.pre_pad is None else F.pad(x, self.pre_pad, mode=self.pad_mode)
            return run(self.topology, y, apply)

        def collapsed() -> torch.Tensor:
            one = fold(self.linear_map(params=by_path))
            w, b = one.weight, one.bias
            if isinstance(self.template, nn.Linear):
                return F.linear(x, w, b)
            return self.template._conv_forward(x, w, b)

        runs = {"sequential": sequential, "collapsed": collapsed}
        # identity hooks on top: the caller's saved-tensor hooks (checkpointing) never see ours
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            warm = {name: _timed(fn, leaves, x.device) for name, fn in runs.items()}
            if max(warm.values()) > 1.0:  # too slow to time twice: the MAC model decides
                return self._model_choice(tuple(x.shape))
            first = {name: _timed(fn, leaves, x.device) for name, fn in runs.items()}
            if max(first.values()) > 3 * min(first.values()):  # plain after the warm-up
                return min(first, key=first.__getitem__)
            # two more interleaved rounds unless slow (deciding must stay cheap)
            times = {name: [t] for name, t in first.items()}
            for _ in range(0 if max(first.values()) > 0.1 else 2):
                for name, fn in runs.items():
                    times[name].append(_timed(fn, leaves, x.device))
        return min(times, key=lambda name: statistics.median(times[name]))

    def folded(self) -> WeightBias:
        """:meth:`weight_bias` in the working dtype; cached only inside :func:`frozen`.

        Even there the cache key holds the identity, version counter, storage, dtype and
        device of every parameter and buffer, so an optimizer step, ``load_state_dict``,
        ``.to()`` or a reassigned ``.data`` invalidates it; in-place edits through ``.data``
        are invisible to version counters, which is why caching is opt-in.
        """
        state = _FROZEN.get(self)
        if state is None or self.training or torch.is_grad_enabled():
            return self.weight_bias()
        key = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device)
                    for t in (*self.parameters(), *self.buffers()))
        if state[1] is None or state[1][0] != key:
            state[1] = (key, self.weight_bias())
        return state[1][1]

    def check(self, path: str = "") -> None:
        """Raise :class:`ContractionError` unless the block still folds exactly."""
        where = f"'{path}'" if path else "this ExpandedBlock"
        if self.act is not None:
            raise ContractionError(
                f"contract: block {where} still has its nonlinearity "
                f"({type(self.act).__name__}) from nonlinear-counterpart init, so it is not a "
                f"linear chain. Call expandfx.linearize(model) to remove it (the weights stay), "
                f"train on as an ExpandNet, then contract.")
        now = self._current_topology()
        current = [layer_signature(self.get_submodule(p)) for p in leaves(now)
                   if not isinstance(p, Identity)]
        if now != self.topology or current != self.signatures:
            raise ContractionError(
                f"contract: block {where} was edited after expansion: its layers are now "
                f"{[s[0].__name__ for s in current]} with "
                f"hyperparameters that differ from the {len(self.signatures)} linear layers "
                f"expand() built. Only an unchanged linear topology folds exactly: restore the "
                f"block (e.g. remove inserted nonlinearities) or re-create the model with "
                f"expandfx.expand."
            )
        hooked = [p for p, layer in zip(self.factor_paths, self.factors, strict=True)
                  if layer._forward_hooks or layer._forward_pre_hooks]
        if hooked or self._forward_hooks or self._forward_pre_hooks:
            raise ContractionError(
                f"contract: block {where} has forward hooks (on {hooked} or the block); "
                f"a hook can change what the block computes, so folding it would not be exact. "
                f"Remove the hooks (handle.remove()) before contracting."
            )

    def weight_bias(self, dtype: torch.dtype | None = None) -> WeightBias:
        """The effective (weight, bias) of the whole block, differentiable, in ``dtype``."""
        if self.act is not None:
            self.check()  # raises: a nonlinear block has no single effective weight
        if self.is_chain and self.__dict__.get("_plain_chain"):
            # fast path, same arithmetic: a chain whose factors all have the template's
            # groups folds to compose_chain (checked by fold() once, at construction)
            factors = [(f.weight, f.bias) for f in self.layers]
            if dtype is not None:
                factors = [(w.to(dtype), None if b is None else b.to(dtype)) for w, b in factors]
            return compose_chain(factors, getattr(self.template, "groups", 1))
        one = fold(self.linear_map(dtype))
        return one.weight, one.bias

    def _current_topology(self) -> Node:
        """The topology the module tree describes now (a replaced identity, an appended
        layer: not the one built)."""
        if self.is_chain:
            return _chain_topology("layers", len(self.layers))
        return Par(tuple(_branch_topology(f"branches.{name}", f)
                         for name, f in self.branches.items()))

    def contract(self, path: str = "") -> nn.Module:
        """The original layer with the folded weights (composed in float64, cast back)."""
        self.check(path)
        path = path or "this ExpandedBlock"
        factors = self.factors
        ref = factors[0].weight
        with torch.no_grad():
            weight, bias = self.weight_bias(torch.float64)
        layer = copy.deepcopy(self.template)
        expected = tuple(layer.weight.shape)
        if tuple(weight.shape) != expected:  # a guard on our own algebra
            raise ContractionError(
                f"contract: block {path!r} folds to weight shape {tuple(weight.shape)}, "
                f"expected {expected}; please report this as an expandfx bug."
            )
        layer.weight = _like(weight, ref, any(f.weight.requires_grad for f in factors))
        if layer.bias is not None:
            layer.bias = _like(bias, ref, any(f.bias.requires_grad for f in factors
                                              if f.bias is not None))
        layer.train(self.training)
        return registry.restore(self, layer, path)  # a registered class, e.g. HF Conv1D

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        error_msgs: list[str] = args[-1]
        path = prefix.rstrip(".") or "<root>"
        if prefix + "weight" in state_dict:
            error_msgs.append(
                f"'{path}' is an expanded block ({self.rule}, r={self.r:g}) but the checkpoint "
                f"holds a compact layer ('{prefix}weight'). Load the checkpoint into the compact "
                f"model first, then expand it (init='preserve' keeps its function), or "
                f"contract this model before loading."
            )
        mismatch = self._structure_mismatch(state_dict, prefix)
        if mismatch:
            error_msgs.append(
                f"'{path}': the checkpoint holds {mismatch[0]} but this block ({self.rule}, "
                f"r={self.r:g}) has {mismatch[1]}: the checkpoint was saved from another "
                f"expansion rule. Expand the fresh model with the checkpoint's rule and r.")
        for factor_path, layer in zip(self.factor_paths, self.factors, strict=True):
            key = f"{prefix}{factor_path}.weight"
            if key in state_dict and tuple(state_dict[key].shape) != tuple(layer.weight.shape):
                error_msgs.append(
                    f"'{path}': the checkpoint's '{key}' has shape "
                    f"{tuple(state_dict[key].shape)} but this block ({self.rule}, r={self.r:g}) "
                    f"has {tuple(layer.weight.shape)}: the checkpoint was saved from another "
                    f"expansion. Expand the fresh model with the same rule and r as the "
                    f"checkpoint."
                )
                break
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _structure_mismatch(self, state_dict: dict[str, Any], prefix: str
                            ) -> tuple[str, str] | None:
        """(theirs, ours) when the checkpoint's factors under ``prefix`` are laid out as
        another topology (a chain vs branches, other branch names), else ``None``."""
        def describe(kind: str, names: set[str]) -> str:
            return "a chain of layers" if kind == "layers" else f"branches {sorted(names)}"

        theirs: dict[str, set[str]] = {}
        for key in state_dict:
            parts = key[len(prefix):].split(".") if key.startswith(prefix) else []
            if len(parts) > 2 and parts[0] in ("layers", "branches"):
                theirs.setdefault(parts[0], set()).add(parts[1])
        ours_kind = "layers" if self.is_chain else "branches"
        ours = set(self.layers._modules if self.is_chain else self.branches._modules)
        if not theirs or theirs == {ours_kind: theirs.get(ours_kind)} and (
                ours_kind == "layers" or _params_named(self, theirs[ours_kind])):
            return None
        kind = next(iter(theirs))
        return describe(kind, theirs[kind]), describe(ours_kind, ours)

    def extra_repr(self) -> str:
        return f"rule={self.rule}, r={self.r:g}, folds_to={self.original_type.__name__}"


def _chain_topology(prefix: str, n: int) -> Seq:
    return Seq(tuple(f"{prefix}.{i}" for i in range(n)))


def _branch_topology(path: str, factor: nn.Module) -> Node:
    if isinstance(factor, nn.Identity):
        return Identity()
    if isinstance(factor, nn.ModuleList):
        return _chain_topology(path, len(factor))
    return path


def _params_named(block: ExpandedBlock, names: set[str]) -> bool:
    """Whether ``names`` are exactly the block's branches that hold parameters."""
    return names == {n for n, m in block.branches.items() if any(True for _ in m.parameters())}


def _tracing_or_transformed() -> bool:
    """True under torch.compile, FX / JIT tracing or scripting, or a functorch transform."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_scripting()
                or torch.jit.is_tracing() or _fx_tracing()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def _fx_tracing() -> bool:
    trace = torch.fx._symbolic_trace
    check = getattr(trace, "is_fx_symbolic_tracing", None) or trace.is_fx_tracing
    return bool(check())


def _autocast(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return False


def _timed(run: Callable[[], torch.Tensor], leaves: list[torch.Tensor],
           device: torch.device) -> float:
    """Seconds of ``run()`` plus, if there are leaves, the backward to them."""
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type != "cpu" and sync is not None:
        sync()
    start = time.perf_counter()
    out = run()
    if leaves:
        torch.autograd.grad(out, leaves, torch.ones_like(out))
    if device.type != "cpu" and sync is not None:
        sync()
    return time.perf_counter() - start


def _norm_affine(bn: nn.Module, template: nn.Module, meta: bool) -> Affine:
    """A branch BatchNorm as its eval-mode affine map (running statistics)."""
    dims = len(getattr(template, "kernel_size", ()))
    if meta:
        bn = copy.deepcopy(bn).to("meta")
    return batchnorm(bn, dims)


def _like(value: torch.Tensor, ref: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(value.to(dtype=ref.dtype, device=ref.device).contiguous(), requires_grad)
