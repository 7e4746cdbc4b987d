"""Each layer described once: what every later stage of planning reads about it.

:func:`describe_layer` asks the layer registry, once per module at the start of planning,
what a conv/linear layer is: the class it must not override, the kind of layer a rule
applies to, a view of it in torch's layout (shapes and geometry), its
one-line description and its call sites. Legality, rule choice, counting and the plan's
table read this :class:`LayerView` instead of asking the registry again.

Example::

    >>> import torch.nn as nn
    >>> view = describe_layer(nn.Conv2d(3, 8, 3, stride=2), ["0"])
    >>> view.kind, view.text, tuple(view.torch.weight.shape)
    ('conv', 'Conv2d(3→8, k3, s2)', (8, 3, 3, 3))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .. import layer_types
from ..layer_types import base_type

__all__ = ["LayerView", "describe", "describe_layer", "unhandled_reason"]


@dataclass(frozen=True)
class LayerView:
    """One module that holds a linear map's weight, as planning sees it.

    Attributes:
        path, aliases: its first module path and the other paths it is registered under.
        module: the module itself (the model's, not a copy).
        kind: the :attr:`~expandfx.rules.base.Rule.kind` a rule must have to expand it
            (``"conv"`` — transposed convs included — or ``"linear"``); ``None`` for a
            module expandfx lists but does not expand (:attr:`unhandled`).
        transposed: whether it is a transposed convolution.
        plain: the class it must not override to count as plain (its registered class,
            else the torch layer class it derives from).
        torch: the layer in torch's weight layout (``[out, in/groups, *kernel]``): the
            module itself when it is a torch layer, else an equivalent torch layer on the
            meta device (a registered class: shapes and hyperparameters only); ``None`` when
            unhandled.
        text: the plan's one-line description (``Conv2d(3→8, k3, s2)``).
        unhandled: why expandfx does not expand it (an RNN, attention's input projection).
        call_sites: calls in the traced or recorded forward (``None``: not checked).
    """

    path: str
    module: nn.Module = field(repr=False, compare=False)
    kind: str | None
    transposed: bool
    plain: type[nn.Module] | None
    torch: nn.Module | None = field(repr=False, compare=False)
    text: str
    unhandled: str | None = None
    aliases: tuple[str, ...] = ()
    call_sites: int | None = None


def describe_layer(module: nn.Module, paths: list[str], call_sites: int | None = None
                   ) -> LayerView:
    """The :class:`LayerView` of ``module`` (registered under ``paths``); the registry is
    asked here and nowhere later in planning."""
    path, aliases = paths[0], tuple(sorted(set(paths[1:])))
    unhandled = unhandled_reason(module)
    if unhandled is not None:
        return LayerView(path, module, None, False, None, None, _describe_other(module),
                         unhandled, aliases, call_sites)
    found = layer_types.lookup(module)
    torch_layer = layer_types.as_torch(module, device="meta", path=path)
    kind = "linear" if (found[1].kind if found else layer_types.kind(module)) == "linear" \
        else "conv"
    plain = found[0] if found else layer_types.torch_layer_type(module)
    text = describe(torch_layer)
    if torch_layer is not module:  # a registered class: Conv1D(32→96)
        text = type(module).__name__ + "(" + text.partition("(")[2]
    return LayerView(path, module, kind, layer_types.is_transposed(torch_layer), plain,
                     torch_layer, text, None, aliases, call_sites)


def unhandled_reason(module: nn.Module) -> str | None:
    """Why a module that holds a linear map's weight is not a layer expandfx handles (so the
    plan lists it with this reason), or ``None`` for every other module."""
    cls = type(module).__name__
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return (f"{cls} applies its weight_ih/weight_hh matrices itself, inside its "
                f"recurrence: not a layer type expandfx expands")
    if isinstance(module, nn.MultiheadAttention):
        return (f"{cls} applies its input projection (in_proj_weight) itself, in "
                f"F.multi_head_attention_forward: not a layer type expandfx expands (its "
                f"out_proj has its own row)")
    return None


def describe(layer: nn.Module) -> str:
    """``Conv2d(3→8, k7, s1, p3)`` — a short one-line description of a torch layer (or of
    any module that holds a linear map's weight).

    >>> describe(nn.Conv2d(3, 8, 3, stride=2, padding=1))
    'Conv2d(3→8, k3, s2, p1)'
    """
    if unhandled_reason(layer) is not None:
        return _describe_other(layer)
    torch_layer = layer_types.as_torch(layer, device="meta")
    if torch_layer is not layer:
        return type(layer).__name__ + "(" + describe(torch_layer).partition("(")[2]
    kind = base_type(layer)
    if issubclass(kind, nn.Linear):
        return f"Linear({layer.in_features}→{layer.out_features})"
    extras = [f"k{_short(layer.kernel_size)}"]
    for attr, tag, default in (("stride", "s", 1), ("padding", "p", 0),
                               ("output_padding", "op", 0), ("dilation", "d", 1),
                               ("groups", "g", 1)):
        value = getattr(layer, attr, default)
        if _short(value) != str(default):
            extras.append(f"{tag}{_short(value)}")
    if layer.padding_mode != "zeros":
        extras.append(layer.padding_mode)
    return f"{kind.__name__}({layer.in_channels}→{layer.out_channels}, {', '.join(extras)})"


def _describe_other(layer: nn.Module) -> str:
    """RNNs and attention: ``LSTM(8→16, 2 layers)``, ``MultiheadAttention(32, 4 heads)``."""
    if isinstance(layer, (nn.RNNBase, nn.RNNCellBase)):
        layers = f", {layer.num_layers} layers" if getattr(layer, "num_layers", 1) > 1 else ""
        return f"{type(layer).__name__}({layer.input_size}→{layer.hidden_size}{layers})"
    return f"{type(layer).__name__}({layer.embed_dim}, {layer.num_heads} heads)"


def _short(value: Any) -> str:
    """``3`` for ``(3, 3)``, ``3x1`` for ``(3, 1)``."""
    if isinstance(value, tuple) and len(set(value)) == 1:
        return str(value[0])
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)
