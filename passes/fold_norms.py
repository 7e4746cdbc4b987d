"""Fold each eval-mode BatchNorm into the conv/linear layer that feeds it, on any model.

The graph view :func:`expandfx.fold` uses where FX cannot trace a model (every Hugging Face
model) and inside the modules FX keeps whole: one recorded forward on ``example_inputs``
*proves* the data flow. A BatchNorm folds into a layer when, in that run,

- the BatchNorm's input is the layer's output tensor itself, or a reshape of it that keeps
  the layer's feature dim in the BatchNorm's dim 1 (``flatten(0, 1)`` after a Linear —
  timm's ``LinearNorm`` — or ``flatten(2)`` after a conv);
- nothing else reads that tensor or its reshapes (no other op, not the model's output);
- the layer and the BatchNorm are each called once and compute their plain torch op.

Each fold is the IR's ``Seq(layer, batchnorm)`` composed in float64, written back into the
layer in its own class and weight layout (a bias is added if it had none); the BatchNorm is
replaced by ``nn.Identity``, and the folded layer is checked against the recorded BatchNorm
output. This is ``torch.ao.quantization.fuse_modules`` with the pairs found and verified for
you — it cannot merge chains or sums of layers (that needs a graph: FX). Like any recorded
view, it proves the flow on the example's path: a model whose forward would route the same
layer elsewhere for other inputs is outside its guarantee (docs/design.md §3.2).

Example::

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> done, kept = fold_norms(model, (torch.randn(1, 3, 8, 8),))
    >>> [type(m).__name__ for m in model], done[0]["modules"]
    (['Conv2d', 'Identity', 'ReLU'], ['0', '1'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from expandfx.passes.linear_groups import TRANSPOSED
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from expandfx import layer_types
from expandfx.errors import FoldError
from expandfx.linear import Affine, Seq, batchnorm, fold
from expandfx.surgery import replace
from expandfx.tolerances import rel_error, within

__all__ = ["fold_norms"]

Tensor = torch.Tensor
PLAIN_RTOL = 1e-6  # a layer or BatchNorm must compute its plain op this closely
# pure reshapes: row-major element order is kept, so an index survives when the sizes before
# and at its dim do
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "reshape_as", "view_as", "squeeze",
             "unsqueeze", "contiguous"}
_SHAPE_OF_ARG = {"reshape_as", "view_as", "expand_as", "type_as", "new_zeros", "new_ones",
                 "new_empty"}  # read only the shape (or dtype) of their other argument
_METADATA = {"dim", "size", "shape", "ndim", "numel", "dtype", "device", "is_contiguous",
             "requires_grad", "is_floating_point", "__len__", "stride", "ndimension"}


@dataclass
class _Output:
    """A layer's output (or a reshape of it) and where the layer's feature dim sits in it."""

    layer: int  # id of the producing layer module
    feature: int


@dataclass
class _Layer:
    module: nn.Module
    calls: int = 0
    x: Tensor | None = None  # its input on the recorded run (a copy)
    out_shape: tuple[int, ...] = ()
    readers: list[str] = field(default_factory=list)  # ops other than reshapes and one BN
    norm: int | None = None  # id of the BatchNorm that reads it
    plain: str | None = None  # why it does not compute the plain op, if so


@dataclass
class _Norm:
    module: nn.Module
    calls: int = 0
    source: _Output | None = None
    x_shape: tuple[int, ...] = ()
    out: Tensor | None = None
    plain: str | None = None


def fold_norms(model: nn.Module, inputs: tuple[Any, ...], tol: float = 1e-5
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Fold every provable layer → BatchNorm pair of ``model`` **in place**; return what was
    folded (``{"layer", "modules", "formula", "as"}``) and each BatchNorm kept, with why."""
    paths: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(path)
    layers = {id(m): _Layer(m) for m in model.modules()
              if (layer_types.is_layer(m) or type(m) in TRANSPOSED)
              and not parametrize.is_parametrized(m)}
    norms = {id(m): _Norm(m) for m in model.modules()
             if isinstance(m, _BatchNorm) and not m.training and m.running_var is not None}
    if not norms:
        return [], []
    _record(model, inputs, layers, norms)
    done, kept = [], []
    for key, norm in norms.items():
        name = paths[key][0]
        why = _why_not(norm, layers, paths)
        if why is None:
            layer = layers[norm.source.layer]
            why = _fold_pair(layer, norm, paths[norm.source.layer][0], name, tol)
        if why is not None:
            kept.append({"node": f"'{name}' ({type(norm.module).__name__})", "reason": why})
            continue
        replace(model, paths[key], nn.Identity())
        lpath = paths[norm.source.layer][0]
        done.append({"layer": lpath, "modules": [lpath, name], "formula": f"{lpath} → {name}",
                     "as": repr(layers[norm.source.layer].module)})
    return done, kept


class _Recorder(TorchFunctionMode):
    """Follows every layer output through reshapes to the ops that read it."""

    def __init__(self, layers: dict[int, _Layer], norms: dict[int, _Norm]) -> None:
        super().__init__()
        self.layers, self.norms = layers, norms
        self.outputs: dict[int, _Output] = {}
        self.keep: list[Tensor] = []  # keeps recorded tensors alive, so ids stay unique
        self.active_norm: list[int] = []
        self.running: set[int] = set()  # the layers whose forward is running
        self.weights = {id(p): key for key, rec in layers.items()
                        for p in (rec.module.weight, rec.module.bias) if p is not None}
        self.paused = False  # the hooks' own checks are not part of the model's data flow

    def track(self, t: Tensor, src: _Output) -> None:
        self.outputs[id(t)] = src
        self.keep.append(t)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = _name(func)
        if self.paused or name in _METADATA:
            return result
        flat = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        for t in flat:  # a weight used outside its layer would change with the fold
            owner = self.weights.get(id(t))
            if owner is not None and owner not in self.running:
                self.layers[owner].readers.append(f"{name} (on its weight)")
        found = [(i, self.outputs[id(t)]) for i, t in enumerate(tree_leaves((args, kwargs)))
                 if isinstance(t, Tensor) and id(t) in self.outputs]
        for i, src in found:
            layer = self.layers[src.layer]
            if i > 0 and name in _SHAPE_OF_ARG:
                continue
            if name in _RESHAPES and i == 0 and isinstance(result, Tensor):
                feature = _kept_dim(layer.out_shape, src.feature, tuple(result.shape))
                if feature is not None:
                    self.track(result, _Output(src.layer, feature))
                    continue
            if (func is F.batch_norm and i == 0 and self.active_norm
                    and self.norms[self.active_norm[-1]].source is None):
                norm = self.norms[self.active_norm[-1]]
                norm.source, norm.x_shape = src, tuple(args[0].shape)
                layer.norm = self.active_norm[-1] if layer.norm is None else -1
                continue
            layer.readers.append(name)
        return result


def _record(model: nn.Module, inputs: tuple[Any, ...], layers: dict[int, _Layer],
            norms: dict[int, _Norm]) -> Any:
    """Run the model once, filling ``layers`` and ``norms``; return its output."""
    recorder = _Recorder(layers, norms)

    def layer_in(m: nn.Module, args: tuple) -> None:
        rec = layers[id(m)]
        rec.calls += 1
        recorder.running.add(id(m))
        if rec.calls == 1 and len(args) == 1 and isinstance(args[0], Tensor):
            rec.x = args[0].detach().clone()

    def layer_out(m: nn.Module, args: tuple, out: Any) -> None:
        recorder.running.discard(id(m))
        rec = layers[id(m)]
        if rec.calls != 1 or rec.x is None or not isinstance(out, Tensor):
            return
        rec.out_shape = tuple(out.shape)
        recorder.paused = True
        rec.plain = _plain_problem(m, rec.x, out)
        recorder.paused = False
        feature = out.dim() - 1 if layer_types.is_linear(m) else 1
        if out.dim() > feature:
            recorder.track(out, _Output(id(m), feature))

    def norm_in(m: nn.Module, args: tuple) -> None:
        norms[id(m)].calls += 1
        recorder.active_norm.append(id(m))

    def norm_out(m: nn.Module, args: tuple, out: Any) -> None:
        recorder.active_norm.pop()
        rec = norms[id(m)]
        if rec.calls == 1 and isinstance(out, Tensor) and isinstance(args[0], Tensor):
            rec.out = out.detach().clone()
            recorder.paused = True
            want = F.batch_norm(args[0], m.running_mean, m.running_var, m.weight, m.bias,
                                False, 0.0, m.eps)
            recorder.paused = False
            if not within(rel_error(want, out), PLAIN_RTOL):
                rec.plain = "it does not compute plain F.batch_norm (eval) on its input"

    hooked = [(rec.module, layer_in, layer_out) for rec in layers.values()
              if not (rec.module._forward_hooks or rec.module._forward_pre_hooks)]
    hooked += [(rec.module, norm_in, norm_out) for rec in norms.values()]
    handles = [h for m, pre, post in hooked for h in (m.register_forward_pre_hook(pre),
                                                     m.register_forward_hook(post))]
    try:
        with torch.no_grad(), recorder:
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    for t in _tensors(out):  # a layer output the model returns has another reader
        src = recorder.outputs.get(id(t))
        if src is not None:
            layers[src.layer].readers.append("the model's output")
    return out


def _why_not(norm: _Norm, layers: dict[int, _Layer], paths: dict[int, list[str]]
             ) -> str | None:
    if norm.module._forward_hooks or norm.module._forward_pre_hooks:
        return "it has forward hooks, which folding would drop; remove them to fold it"
    if norm.calls != 1:
        return (f"it is called {norm.calls} times on the example input; only a BatchNorm "
                f"called once folds into its layer")
    if norm.plain:
        return norm.plain
    if norm.source is None:
        return ("its input is not the output of a conv/linear layer (or a reshape of it "
                "keeping the layer's feature dim): nothing to fold it into")
    layer = layers[norm.source.layer]
    lname = f"'{paths[norm.source.layer][0]}' ({type(layer.module).__name__})"
    if layer.calls != 1:
        return (f"its input comes from {lname}, which is called {layer.calls} times; "
                f"folding would change the other calls")
    if layer.plain:
        return f"its input comes from {lname}, which {layer.plain}"
    if layer.readers or layer.norm == -1:
        who = ", ".join(dict.fromkeys(layer.readers)) or "another BatchNorm"
        return (f"the output or weight of {lname} is also read by {who}; folding would "
                f"change what they read")
    if norm.source.feature != 1 or norm.x_shape[1] != norm.module.num_features:
        return (f"it normalises dim 1 of a reshape of {lname}'s output, which is not the "
                f"layer's feature dim; they do not fold")
    return None


def _fold_pair(layer: _Layer, norm: _Norm, lpath: str, npath: str, tol: float) -> str | None:
    """Write the folded weights into the layer, if they reproduce the BatchNorm's output."""
    module = layer.module
    plain = layer_types.as_torch(module, path=lpath)
    dims = len(getattr(plain, "kernel_size", ()))
    try:
        a = fold(Seq((Affine.of(plain).to(torch.float64),
                      batchnorm(norm.module, dims).to(torch.float64))), torch.float64)
    except FoldError as exc:
        return f"it does not fold into '{lpath}': {exc}"
    w = module.weight
    weight = a.weight.to(w.dtype)
    found = layer_types.lookup(module)
    if found is not None and found[1].weight_from is not None:
        weight = found[1].weight_from(weight)
    bias = a.bias.to(w.dtype)
    with torch.no_grad():
        got = _plain_call(plain, layer.x, a.weight.to(w.dtype), bias).reshape(norm.x_shape)
    err = rel_error(norm.out, got)
    if not within(err, tol):
        return (f"folding it into '{lpath}' differs from its output by {err:.1e} × "
                f"max|output| (tolerance {tol:g}); kept")
    module.weight = nn.Parameter(weight.contiguous().to(w.device), w.requires_grad)
    module.bias = nn.Parameter(bias.to(w.device), w.requires_grad)
    return None


def _plain_call(plain: nn.Module, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    if isinstance(plain, nn.Linear):
        return F.linear(x, weight, bias)
    if layer_types.is_transposed(plain):  # a subclass too: its plain op is checked first
        op = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[plain.weight.dim() - 3]
        return op(x, weight, bias, plain.stride, plain.padding, plain.output_padding,
                  plain.groups, plain.dilation)
    return layer_types.TORCH_TYPES[f"conv{len(plain.kernel_size)}d"]._conv_forward(
        plain, x, weight, bias)


def _plain_problem(module: nn.Module, x: Tensor, out: Tensor) -> str | None:
    """Why ``module`` does not compute its plain torch op on ``x``, if it does not."""
    if type(module) in (*layer_types.TORCH_TYPES.values(), *TRANSPOSED):
        return None
    try:
        plain = layer_types.as_torch(module)
        with torch.no_grad():
            want = _plain_call(plain, x, plain.weight, plain.bias)
    except Exception as exc:  # a wrong layout, an unusual signature
        return f"cannot be run as its plain op ({type(exc).__name__})"
    if want.shape != out.shape or not within(rel_error(want, out), PLAIN_RTOL):
        return "does not compute its plain torch op on the example input"
    return None


def _kept_dim(shape: tuple[int, ...], feature: int, new: tuple[int, ...]) -> int | None:
    """Where index ``feature`` of ``shape`` sits after a reshape to ``new``, if it survives:
    the elements before it and its size must be the same."""
    before = math.prod(shape[:feature])
    for i in range(len(new)):
        if math.prod(new[:i]) == before and new[i] == shape[feature]:
            return i
    return None


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, dict):  # also transformers' ModelOutput
        return [t for v in out.values() for t in _tensors(v)]
    return [t for t in tree_leaves(out) if isinstance(t, Tensor)]


def _name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "")
    return name
