"""The layer registry: the classes expandfx treats as conv/linear layers — torch's own and
registered ones that compute a plain linear map or convolution — and how to read each.

Some libraries ship their own linear layers: transformers' ``Conv1D`` (GPT-2 and
relatives: ``y = x @ W + b`` with the weight stored ``[in, out]``), timm's ``Linear`` (an
``nn.Linear`` whose ``forward`` only adds a TorchScript cast). A registered class is
planned, expanded and contracted like the torch layer of its ``kind``; ``weight_to`` turns
its stored weight into torch's layout (``[out, in]`` / ``[out, in/groups, *kernel]``),
``weight_from`` turns it back, and ``contract`` returns the layer in its own class and
layout. Registering a class that computes anything else (weight standardisation, a scale)
would make expansion wrong: only register what is exactly the torch op.

Example::

    >>> import torch, torch.nn as nn, expandfx as efx
    >>> class XW(nn.Module):                        # y = x @ W + b, W stored [in, out]
    ...     def __init__(self, n_in, n_out):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
    ...         self.bias = nn.Parameter(torch.zeros(n_out))
    ...     def forward(self, x):
    ...         return x @ self.weight + self.bias
    >>> efx.register_layer(XW, kind="linear", weight_to=torch.t, weight_from=torch.t)
    >>> model = nn.Sequential(XW(4, 8), nn.ReLU(), XW(8, 2))
    >>> big = efx.expand(model, "FC", r=2, include=["0", "2"])
    >>> type(efx.contract(big)[0]).__name__, efx.contract(big)[0].weight.shape
    ('XW', torch.Size([4, 8]))
    >>> big[0].weight.shape                         # a block answers in the class's layout
    torch.Size([4, 8])
    >>> efx.unregister_layer(XW)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .copying import parameter_free_copy
from .errors import ConfigError, ContractionError

__all__ = ["CONV_TYPES", "HYPERPARAMETERS", "LAYER_TYPES", "TORCH_TYPES", "TRANSPOSED_TYPES",
           "LayerType", "as_torch", "attach", "base_type", "conv_type", "is_layer", "is_linear",
           "is_transposed", "kind", "layer_call", "layer_signature", "lookup",
           "original_layout", "original_template", "qualified_name", "register_layer",
           "restore", "torch_layer_type", "unregister_layer"]


TORCH_TYPES: dict[str, type[nn.Module]] = {
    "linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "groups", "padding_mode")
Layout = Callable[[torch.Tensor], torch.Tensor]


# Layer classification (used by block, compander, planning, linear_groups).
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES: tuple[type[nn.Module], ...] = (*CONV_TYPES, nn.Linear)
# Transposed convolutions: layers too, which CL alone expands (expandfx.planning.legality).
TRANSPOSED_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def base_type(layer: nn.Module) -> type[nn.Module]:
    """The layer's class, looking through ``torch.nn.utils.parametrize``."""
    return parametrize.type_before_parametrizations(layer)


def torch_layer_type(layer: nn.Module) -> type[nn.Module]:
    """The torch class a (possibly subclassed) conv/linear/transposed-conv layer derives
    from."""
    return next(c for c in base_type(layer).__mro__ if c in (*LAYER_TYPES, *TRANSPOSED_TYPES))


def is_transposed(layer: nn.Module) -> bool:
    """A ``ConvTranspose1d/2d/3d`` (or subclass; looking through parametrizations)."""
    return issubclass(base_type(layer), TRANSPOSED_TYPES)


def conv_type(dims: int) -> type[nn.Module]:
    """The plain convolution class of ``dims`` spatial dims (``nn.Conv2d`` for 2)."""
    return CONV_TYPES[dims - 1]


def layer_call(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, output_size: list[int] | None = None
               ) -> torch.Tensor:
    """The op of a torch conv/linear/transposed-conv ``layer`` with ``weight`` and ``bias`` in
    place of its own (``output_size``: a transposed conv's, as its ``forward`` takes it).

    >>> up = nn.ConvTranspose1d(2, 3, 3, stride=2)
    >>> x = torch.randn(1, 2, 5)
    >>> torch.equal(layer_call(up, x, up.weight, up.bias), up(x))
    True
    """
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if is_transposed(layer):
        dims = len(layer.kernel_size)
        output_padding = layer._output_padding(x, output_size, layer.stride, layer.padding,
                                               layer.kernel_size, dims, layer.dilation)
        op = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return op(x, weight, bias, layer.stride, layer.padding, output_padding, layer.groups,
                  layer.dilation)
    return torch_layer_type(layer)._conv_forward(layer, x, weight, bias)


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
    if issubclass(kind, TRANSPOSED_TYPES):
        return (kind, layer.in_channels, layer.out_channels, layer.kernel_size,
                layer.stride, layer.padding, layer.output_padding, layer.dilation,
                layer.groups, layer.bias is not None, layer.padding_mode)
    if issubclass(kind, CONV_TYPES):
        return (kind, layer.in_channels, layer.out_channels, layer.kernel_size,
                layer.stride, layer.padding, layer.dilation, layer.groups,
                layer.bias is not None, layer.padding_mode)
    return (kind,)


@dataclass(frozen=True)
class LayerType:
    """One registry entry: the computation ``kind`` and the weight layout conversions."""

    name: str
    kind: str
    weight_to: Layout | None = None
    weight_from: Layout | None = None

    @property
    def torch_type(self) -> type[nn.Module]:
        return TORCH_TYPES[self.kind]


_REGISTRY: dict[str, LayerType] = {}


def register_layer(cls: type[nn.Module] | str, kind: str = "linear", *,
                   weight_to: Layout | None = None, weight_from: Layout | None = None) -> None:
    """Declare that ``cls`` computes exactly a torch ``kind`` layer (see the module doc).

    ``cls`` may be a class or its dotted name (``"transformers.pytorch_utils.Conv1D"``), so
    that an entry needs no import. The class must hold ``weight`` and ``bias`` (or ``None``)
    parameters; a conv kind that is not a torch conv subclass must also have torch's conv
    attributes (``in_channels``, ``kernel_size``, ``stride``, …). Subclasses are covered too,
    unless they override a method of the registered class.
    """
    if kind not in TORCH_TYPES:
        raise ConfigError(f"register_layer: kind must be one of {tuple(TORCH_TYPES)}, got "
                          f"{kind!r}.")
    if (weight_to is None) != (weight_from is None):
        raise ConfigError("register_layer: give both weight_to and weight_from (inverse "
                          "layout conversions), or neither for torch's own layout.")
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        name = qualified_name(cls)
    elif isinstance(cls, str) and "." in cls:
        name = cls
    else:
        raise ConfigError(f"register_layer: cls must be an nn.Module subclass or its dotted "
                          f"name ('package.module.Class'), got {cls!r}.")
    _REGISTRY[name] = LayerType(name, kind, weight_to, weight_from)


def unregister_layer(cls: type[nn.Module] | str) -> None:
    """Remove an entry added by :func:`register_layer` (no error if absent)."""
    _REGISTRY.pop(cls if isinstance(cls, str) else qualified_name(cls), None)


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lookup(module: nn.Module) -> tuple[type[nn.Module], LayerType] | None:
    """The registered class ``module`` derives from (nearest first) and its entry."""
    for cls in parametrize.type_before_parametrizations(module).__mro__:
        entry = _REGISTRY.get(qualified_name(cls))
        if entry is not None:
            return cls, entry
    return None


def is_layer(module: nn.Module) -> bool:
    """A torch conv/linear/transposed-conv layer (or subclass) or a registered layer class."""
    return (isinstance(module, (*TORCH_TYPES.values(), *TRANSPOSED_TYPES))
            or lookup(module) is not None)


def kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv2d"``, ``"conv_transpose2d"``, … or ``None`` for other
    modules."""
    found = lookup(module)
    if found:
        return found[1].kind
    if isinstance(module, TRANSPOSED_TYPES):
        return f"conv_transpose{len(module.kernel_size)}d"
    return next((k for k, t in TORCH_TYPES.items() if isinstance(module, t)), None)


def is_linear(module: nn.Module) -> bool:
    return kind(module) == "linear"


def as_torch(module: nn.Module, device: torch.device | str | None = None,
             path: str = "") -> nn.Module:
    """The plain torch layer the expand passes build from: ``module`` itself when it is a
    torch layer (subclass) in torch's layout, else an equivalent ``nn.Linear``/``nn.ConvNd``
    (weights converted; on ``device="meta"`` shapes only)."""
    found = lookup(module)
    if found is None or (isinstance(module, found[1].torch_type) and not found[1].weight_to):
        return module
    entry = found[1]
    weight = module.weight
    if entry.weight_to is not None:
        weight = entry.weight_to(weight.detach())
    kwargs = {"bias": module.bias is not None, "dtype": weight.dtype,
              "device": device or weight.device}
    if entry.kind == "linear":
        if weight.dim() != 2:
            raise ConfigError(f"expand: '{path}' ({type(module).__name__}) is registered as "
                              f"linear but its converted weight has shape {tuple(weight.shape)}"
                              f"; check the weight_to of its register_layer entry.")
        layer = nn.Linear(weight.shape[1], weight.shape[0], **kwargs)
    else:
        missing = [a for a in _CONV_ATTRS if not hasattr(module, a)]
        if missing:
            raise ConfigError(f"expand: '{path}' ({type(module).__name__}) is registered as "
                              f"{entry.kind} but lacks {missing}; give it torch's conv "
                              f"attributes or expand it by hand.")
        layer = entry.torch_type(**{a: getattr(module, a) for a in _CONV_ATTRS}, **kwargs)
    if str(kwargs["device"]) != "meta":
        with torch.no_grad():
            layer.weight.copy_(weight)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
    layer.weight.requires_grad_(module.weight.requires_grad)
    if module.bias is not None:
        layer.bias.requires_grad_(module.bias.requires_grad)
    return layer.train(module.training)


def attach(block: nn.Module, original: nn.Module, torch_layer: nn.Module) -> None:
    """Remember ``original``'s class (parameter-free) on ``block`` when it was converted."""
    if torch_layer is not original:
        object.__setattr__(block, "origin", parameter_free_copy(original))


def original_template(block: nn.Module) -> nn.Module:
    """The parameter-free layer a block contracts to, in its own class."""
    return block.__dict__.get("origin") or block.template


def original_layout(block: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A block's torch-layout ``weight`` in its original class's layout (differentiable)."""
    origin = block.__dict__.get("origin")
    found = lookup(origin) if origin is not None else None
    if found is None or found[1].weight_from is None:
        return weight
    return found[1].weight_from(weight)


def restore(block: nn.Module, layer: nn.Module, path: str = "") -> nn.Module:
    """``layer`` (the folded torch layer) in the block's original class and weight layout."""
    origin = block.__dict__.get("origin")
    if origin is None:
        return layer
    found = lookup(origin)
    if found is None:
        raise ContractionError(f"contract: block '{path}' was expanded from a registered "
                               f"{type(origin).__name__}, which is no longer registered. "
                               f"Register it again (expandfx.register_layer) to contract.")
    entry = found[1]
    weight = layer.weight.detach()
    if entry.weight_from is not None:
        weight = entry.weight_from(weight)
    out = copy.deepcopy(origin)
    if tuple(weight.shape) != tuple(origin.weight.shape):
        raise ContractionError(f"contract: block '{path}' folds to a {type(origin).__name__} "
                               f"weight of shape {tuple(weight.shape)}, expected "
                               f"{tuple(origin.weight.shape)}; check the weight_from of its "
                               f"register_layer entry.")
    out.weight = nn.Parameter(weight.contiguous(), layer.weight.requires_grad)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().contiguous(), layer.bias.requires_grad)
    return out.train(layer.training)


def _transpose(weight: torch.Tensor) -> torch.Tensor:
    return weight.t()


# Shipped entries. transformers' Conv1D: y = addmm(b, x, W) with W stored [in, out].
register_layer("transformers.pytorch_utils.Conv1D", "linear",
               weight_to=_transpose, weight_from=_transpose)
# timm's Linear: F.linear(x, weight, bias); its forward only adds a cast under TorchScript.
register_layer("timm.layers.linear.Linear", "linear")
