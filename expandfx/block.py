"""``ExpandedBlock``: the module that stands in for one expanded conv/linear layer.

A block is the original layer's template, its factor modules (plain ``nn.Conv{1,2,3}d`` /
``nn.Linear``; one ``nn.ConvTranspose{1,2,3}d`` in a transposed conv's CL chain) and a
*topology* over them (:mod:`expandfx.linear.ir`): a chain (CL, CK, FC), parallel branches
summed (ACNet, RepVGG), or branches that are chains. ``sequential``
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

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import execution, layer_types
from .copying import parameter_free_copy
from .errors import ConfigError, ContractionError, FoldError, NonFiniteError
from .execution import MEASURE_ENV, MODES, check_mode, frozen, measuring_enabled, set_mode
from .finite import check_model

# Re-exported from their homes (execution.py, layer_types.py) for modules that import them here.
from .layer_types import (  # noqa: E402
    CONV_TYPES,
    HYPERPARAMETERS,
    LAYER_TYPES,
    base_type,
    layer_signature,
    torch_layer_type,
)
from .linear.compose import WeightBias, compose_chain
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

__all__ = ["CONV_TYPES", "HYPERPARAMETERS", "LAYER_TYPES", "MEASURE_ENV", "MODES",
           "ExpandedBlock", "base_type", "check_mode", "explicit_padding", "frozen",
           "layer_signature", "measuring_enabled", "set_mode", "torch_layer_type"]

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
                 rule: str, r: float | None, pre_pad: list[int] | None = None,
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
        self.r = None if r is None or not _uses_r(rule) else float(r)  # None: no rate
        self.pre_pad = pre_pad
        self.pad_mode = PAD_MODES[getattr(original, "padding_mode", "zeros")]
        self.signatures = [layer_signature(layer) for layer in self.factors]
        # Kept out of the module tree on purpose: not in state_dict, not moved by .to().
        object.__setattr__(self, "template", parameter_free_copy(original))
        self.train(original.training)
        if self.mode == "collapsed":
            self._refuse_collapsed()
        self._check_fold_matches(rule)
        self.register_load_state_dict_post_hook(_drop_explained_keys)
        groups = getattr(self.template, "groups", 1)
        self._plain_chain = self.is_chain and all(  # conv layout: compose_chain's arithmetic
            getattr(f, "groups", 1) == groups and not layer_types.is_transposed(f)
            for f in self.layers)

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

    @property
    def shift_to_next_norm(self) -> bool:
        """Whether the compact layer has no bias for the block's eval-mode shift (a bias-free
        layer with ``norm="bn"``: the branch BNs' ``β − γ·μ/σ``), so that :meth:`contract`
        must move it into the BatchNorm the layer's result goes to (``shift_into``)."""
        return getattr(self.template, "bias", None) is None and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

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
        want = (tuple(self.template.weight.shape),
                self.template.bias is not None or self.shift_to_next_norm,  # see contract
                Geometry.of(self.template).canonical(kernel))
        if found != want:
            raise ContractionError(
                f"ExpandedBlock({rule}): the factors fold to (weight shape, bias, geometry) "
                f"{found}, but the {type(self.template).__name__} they replace has {want}; the "
                f"rule built a block that does not compute a map of that layer.")

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` cannot compile a block (its forward interprets a topology):
        say so, and what to do, instead of TorchScript's error about a lambda."""
        raise ConfigError(f"torch.jit.script: the model holds an expanded block "
                          f"({self.label}, replacing a "
                          f"{type(self.template).__name__}), which TorchScript cannot compile. "
                          f"Contract first and script the compact model "
                          f"(torch.jit.script(expandfx.contract(model))); torch.compile works on "
                          f"expanded models.")

    def __setstate__(self, state: dict[str, Any]) -> None:  # blocks pickled before topologies
        super().__setstate__(state)
        if "topology" not in self.__dict__:
            self.topology = self._current_topology()
        if _drop_explained_keys not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_drop_explained_keys)

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
        return layer_types.original_layout(self, self.weight_bias()[0])

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

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """The block on ``x``; ``output_size`` as a replaced ``ConvTransposeNd`` takes it (it
        picks the output_padding; the block's 1×1 factors keep the spatial size)."""
        if output_size is not None and not layer_types.is_transposed(self.template):
            raise ConfigError(f"ExpandedBlock ({self.rule}): output_size is an argument of a "
                              f"transposed convolution's forward, but this block replaces a "
                              f"{type(self.template).__name__}. Call it with the input only.")

        def call(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
            if output_size is not None and layer_types.is_transposed(layer):
                return layer(y, output_size)
            return layer(y)

        if getattr(self, "act", None) is not None:  # nonlinear counterpart: layer, act, layer
            if self.pre_pad is not None:
                x = F.pad(x, self.pre_pad, mode=self.pad_mode)
            for i, layer in enumerate(self.layers):
                x = call(layer, x) if i == 0 else call(layer, self.act(x))
            return x
        if self.resolve_mode(x) == "collapsed":
            weight, bias = self.folded()  # the original layer's op
            return layer_types.layer_call(self.template, x, weight, bias, output_size)
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        return run(self.topology, x, lambda path, y: call(self.get_submodule(path), y))

    def resolve_mode(self, x: torch.Tensor | Sequence[int]) -> str:
        """``"sequential"`` or ``"collapsed"`` for this input (a tensor, or just its shape);
        see :func:`expandfx.execution.resolve_mode`."""
        return execution.resolve_mode(self, x)

    @property
    def auto_decisions(self) -> dict[tuple[Any, ...], str]:
        """What ``auto`` mode chose for each input it has seen (a copy): ``(shape, dtype,
        device, grad enabled, autocast) -> "sequential" | "collapsed"``; emptied by
        :func:`~expandfx.execution.set_mode` and
        :func:`~expandfx.execution.forget_measurements`."""
        return dict(self._auto)

    def folded(self) -> WeightBias:
        """:meth:`weight_bias` in the working dtype; cached only inside :func:`frozen`
        (see :func:`expandfx.execution.folded`)."""
        return execution.folded(self)

    def _structure(self) -> tuple[Any, ...]:
        return execution.structure(self)

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

    def weight_bias(self, dtype: torch.dtype | None = None, *,
                    params: dict[str, WeightBias] | None = None) -> WeightBias:
        """The effective (weight, bias) of the whole block, differentiable, in ``dtype``;
        ``params`` substitutes ``{factor path: (w, b)}`` for the factors' own tensors."""
        if self.act is not None:
            self.check()  # raises: a nonlinear block has no single effective weight
        if self.is_chain and self.__dict__.get("_plain_chain"):
            # fast path, same arithmetic: a chain whose factors all have the template's
            # groups folds to compose_chain (checked by fold() once, at construction)
            factors = ([params[p] for p in self.factor_paths] if params is not None
                       else [(f.weight, f.bias) for f in self.layers])
            if dtype is not None:
                factors = [(w.to(dtype), None if b is None else b.to(dtype)) for w, b in factors]
            return compose_chain(factors, getattr(self.template, "groups", 1))
        one = fold(self.linear_map(dtype, params=params))
        return one.weight, one.bias

    def _current_topology(self) -> Node:
        """The topology the module tree describes now (a replaced identity, an appended
        layer: not the one built)."""
        if self.is_chain:
            return _chain_topology("layers", len(self.layers))
        return Par(tuple(_branch_topology(f"branches.{name}", f)
                         for name, f in self.branches.items()))

    def contract(self, path: str = "", *, shift_into: nn.Module | None = None) -> nn.Module:
        """The original layer with the folded weights (composed in float64, cast back).

        ``shift_into``: for a block whose compact layer has no bias for its shift
        (:attr:`shift_to_next_norm`), the BatchNorm that is the layer's only use; the shift
        ``b`` moves into its running mean, ``μ ← μ − b`` — exact, ``BN(Wx + b)`` with ``μ``
        is ``BN(Wx)`` with ``μ − b`` in eval mode, a batch mean cancels ``b`` in training
        mode, and running-mean updates keep ``μ − b`` (``expandfx.contract`` finds the BN).
        """
        self.check(path)
        check_model(self, "contract", prefix=path)  # a NaN factor folds to a NaN weight
        path = path or "this ExpandedBlock"
        factors = self.factors
        ref = factors[0].weight
        with torch.no_grad():
            weight, bias = self.weight_bias(torch.float64)
            _check_cast(path, weight, bias, ref.dtype)
        if self.shift_to_next_norm and bias is not None:
            if shift_into is None:
                raise ContractionError(
                    f"contract: block {path!r} ({self.rule}, norm='bn') has a shift (its branch "
                    f"BatchNorms' β − γ·mean/σ) but its layer has no bias to hold it. "
                    f"expandfx.contract(model) moves it into the BatchNorm that follows the "
                    f"layer; contract the whole model, or pass shift_into=that BatchNorm.")
            with torch.no_grad():
                mean = shift_into.running_mean
                mean.copy_((mean.double() - bias).to(mean.dtype))
            bias = None
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
        return layer_types.restore(self, layer, path)  # a registered class, e.g. HF Conv1D

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        error_msgs: list[str] = args[-1]
        path = prefix.rstrip(".") or "<root>"
        before = len(error_msgs)
        if prefix + "weight" in state_dict:
            error_msgs.append(
                f"'{path}' is an expanded block ({self.label}) but the checkpoint "
                f"holds a compact layer ('{prefix}weight'). Load the checkpoint into the compact "
                f"model first, then expand it (init='preserve' keeps its function), or "
                f"contract this model before loading."
            )
        mismatch = self._structure_mismatch(state_dict, prefix)
        if mismatch:
            error_msgs.append(
                f"'{path}': the checkpoint holds {mismatch[0]} but this block ({self.label}) "
                f"has {mismatch[1]}: the checkpoint was saved from another "
                f"expansion rule. Expand the fresh model with the checkpoint's rule (and r).")
        for factor_path, layer in zip(self.factor_paths, self.factors, strict=True):
            key = f"{prefix}{factor_path}.weight"
            if key in state_dict and tuple(state_dict[key].shape) != tuple(layer.weight.shape):
                error_msgs.append(
                    f"'{path}': the checkpoint's '{key}' has shape "
                    f"{tuple(state_dict[key].shape)} but this block ({self.label}) "
                    f"has {tuple(layer.weight.shape)}: the checkpoint was saved from another "
                    f"expansion. Expand the fresh model with the same rule and r as the "
                    f"checkpoint."
                )
                break
        # our diagnosis explains this block's missing/unexpected keys: _drop_explained_keys
        # removes them after loading, so that torch's message leads with the diagnosis
        diagnosed = len(error_msgs) > before
        self.__dict__["_explained_prefix"] = prefix if diagnosed else None
        if diagnosed:  # nothing raw after the diagnosis: the factors' size mismatches it explains
            for key in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[key]  # torch's own copy, filtered again for each child
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

    @property
    def label(self) -> str:
        """``CL, r=4`` (or ``RepVGG``: a rule without a rate) — how messages name the block."""
        return self.rule if self.r is None else f"{self.rule}, r={self.r:g}"

    def extra_repr(self) -> str:
        rate = "" if self.r is None else f", r={self.r:g}"
        return f"rule={self.rule}{rate}, folds_to={self.original_type.__name__}"


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


def _drop_explained_keys(block: nn.Module, incompatible: Any) -> None:
    """A load_state_dict post-hook: once a block has diagnosed a checkpoint mismatch (another
    rule or r, a compact checkpoint), the missing and unexpected keys under it are what that
    diagnosis explains; torch would list them (kilobytes of keys) before it."""
    prefix = block.__dict__.pop("_explained_prefix", None)
    if prefix is None:
        return
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [k for k in keys if not k.startswith(prefix)]


def _norm_affine(bn: nn.Module, template: nn.Module, meta: bool) -> Affine:
    """A branch BatchNorm as its eval-mode affine map (running statistics)."""
    dims = len(getattr(template, "kernel_size", ()))
    if meta:
        bn = copy.deepcopy(bn).to("meta")
    return batchnorm(bn, dims)


def _check_cast(path: str, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> None:
    """Raise if the folded weight or bias (finite factors, composed in float64) is not finite
    in ``dtype``: the product overflows its range (float16 tops out at 65504)."""
    for name, t in (("weight", weight), ("bias", bias)):
        cast = None if t is None or t.device.type == "meta" else t.to(dtype)
        if cast is not None and not bool(torch.isfinite(cast).all()):
            bad, peak, top = int((~torch.isfinite(cast)).sum()), t.abs().max().item(), \
                torch.finfo(dtype).max
            raise NonFiniteError(
                f"contract: block {path!r} folds to a {name} ('{path}.{name}') of magnitude "
                f"up to {peak:.4g}, "
                f"beyond {dtype}'s range (±{top:.4g}): cast, it holds {bad} non-finite "
                f"value(s) — the product of its factors overflows. Contract in a wider dtype "
                f"(expandfx.contract(model.float())) or rescale the factors.",
                where=f"{path}.{name}", numbers={"non_finite": bad, "max_abs": peak,
                                                 "dtype_max": top})


def _like(value: torch.Tensor, ref: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(value.to(dtype=ref.dtype, device=ref.device).contiguous(), requires_grad)


def _uses_r(rule: str) -> bool:
    """Whether the registered rule ``rule`` takes an expansion rate (a user's own block with
    an unregistered rule name keeps the ``r`` it was given)."""
    from .rules import find  # the rules build blocks: imported when a block is made

    found = find(rule) if isinstance(rule, str) else None
    return found is None or found.uses_r
