"""Building factor layers: widths, factor constructors and function-preserving init.

Shared by the rules (``expandfx.rules.cl``, ``ck``, ``fc``, ``acnet``, ``repvgg``).

Example::

    >>> width(4, 3, groups=1), width(0.25, 3, groups=1), width(1.5, 32, groups=32)
    (12, 1, 64)
"""

from __future__ import annotations

__all__ = ["conv_factor", "first_padding", "linear_factor", "match_requires_grad",
           "preserve_three", "transposed_factor", "width"]

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..layer_types import conv_type, is_transposed, torch_layer_type
from ..linear.compose import grouped, ungrouped
from ..linear.ir import explicit_padding


def width(r: float, channels: int, groups: int = 1) -> int:
    """``r * channels`` rounded (half up) to a positive multiple of ``groups``."""
    return max(1, math.floor(r * channels / groups + 0.5)) * groups


def conv_factor(original: nn.Module, in_ch: int, out_ch: int, kernel: tuple[int, ...], *,
                stride: tuple[int, ...] | int = 1, padding: tuple[int, ...] | int = 0,
                dilation: tuple[int, ...] | int = 1, padding_mode: str = "zeros",
                bias: bool | None = None, device: torch.device | str | None = None
                ) -> nn.Module:
    """A plain conv of the original's dimensionality, groups and dtype (and bias presence,
    unless ``bias`` says otherwise); a plain ``ConvNd`` for a transposed original too."""
    ref = original.weight
    cls = (conv_type(len(original.kernel_size)) if is_transposed(original)
           else torch_layer_type(original))
    return cls(
        in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation,
        groups=original.groups, bias=original.bias is not None if bias is None else bias,
        padding_mode=padding_mode,
        device=device or ref.device, dtype=ref.dtype,
    )


def transposed_factor(original: nn.Module, in_ch: int, out_ch: int, *,
                      device: torch.device | str | None = None) -> nn.Module:
    """A plain ``ConvTransposeNd`` ``in_ch → out_ch`` with every other hyperparameter of the
    transposed ``original`` (kernel, stride, padding, output_padding, dilation, groups, bias
    presence) and its dtype."""
    ref = original.weight
    return torch_layer_type(original)(
        in_ch, out_ch, original.kernel_size, stride=original.stride, padding=original.padding,
        output_padding=original.output_padding, groups=original.groups,
        bias=original.bias is not None, dilation=original.dilation,
        device=device or ref.device, dtype=ref.dtype,
    )


def linear_factor(original: nn.Linear, in_f: int, out_f: int, *,
                  device: torch.device | str | None = None) -> nn.Linear:
    ref = original.weight
    return nn.Linear(in_f, out_f, bias=original.bias is not None,
                     device=device or ref.device, dtype=ref.dtype)


def first_padding(conv: nn.Module) -> tuple[tuple[int, ...], list[int] | None]:
    """Split the original padding into (conv padding of the first factor, block pre-pad).

    Symmetric padding goes on the first factor, as in the paper; an asymmetric one
    (``padding="same"`` with an even effective kernel) becomes a block pre-pad.
    """
    pads = explicit_padding(conv)
    lefts, rights = pads[0::2], pads[1::2]
    if lefts == rights:
        return tuple(reversed(lefts)), None
    return (0,) * len(lefts), pads


def match_requires_grad(original: nn.Module, layers: list[nn.Module]) -> None:
    """Give every factor the original's ``requires_grad`` for weight and bias."""
    for layer in layers:
        layer.weight.requires_grad_(original.weight.requires_grad)
        if layer.bias is not None:
            layer.bias.requires_grad_(original.bias.requires_grad)


@torch.no_grad()
def preserve_three(original: nn.Module, layers: list[nn.Module], groups: int = 1, *,
                   path: str = "", r: float = 1.0) -> None:
    """Set a pointwise · middle · pointwise chain to compute exactly ``original``.

    With ``U`` (p×m, orthonormal columns) and ``V`` (q×n, orthonormal columns), per
    group: ``W1 = U``, ``W2[tap] = V W[tap] Uᵀ``, ``W3 = Vᵀ``, so that
    ``W3 W2 W1 = Vᵀ V W Uᵀ U = W``. Intermediate biases are zero and ``b3 = b``:
    no factor is all-zero (unless the original is). Needs ``p ≥ m`` and ``q ≥ n``
    per group (r ≥ 1). A transposed ``original`` and middle factor (weights
    ``[in, out/g, *k]``) are the same per tap, in their own layout: the chain folds to
    ``W[i, o] = Σ_{a,b} W1[a, i] W2[a, b] W3[o, b]`` (``expandfx.linear.fold``), which is
    ``(W3 W2ᵀ W1)ᵀ`` per tap.
    """
    first, middle, last = layers
    (p, m), (n, q) = first.weight.shape[:2], last.weight.shape[:2]
    if p < m * groups or q * groups < n:
        raise ConfigError(
            f"expand: init='preserve' cannot keep '{path}' exact with r={r:g}: the widths "
            f"p={p}, q={q * groups} are smaller than the layer's m={m * groups}, n={n}. Use "
            f"r >= 1 for this layer, or init='default'."
        )
    transposed = is_transposed(original)
    w = grouped(original.weight.detach().double(), groups)  # [g, n_g, m_g, *k]
    if transposed:  # stored [g, m_g, n_g, *k]
        w = w.transpose(1, 2)
    g, n_g, m_g = w.shape[:3]
    p_g, q_g = first.weight.shape[0] // groups, last.weight.shape[1]
    u = torch.linalg.qr(torch.randn(g, p_g, m_g, dtype=torch.float64))[0]  # [g, p_g, m_g]
    v = torch.linalg.qr(torch.randn(g, q_g, n_g, dtype=torch.float64))[0]  # [g, q_g, n_g]
    mid = torch.einsum("gqn,gnm...,gpm->gqp...", v, w, u)
    if transposed:
        mid = mid.transpose(1, 2)  # [g, p_g, q_g, *k]
    spatial = first.weight.shape[2:]
    first.weight.copy_(ungrouped(u).reshape(first.weight.shape[:2] + spatial))
    middle.weight.copy_(ungrouped(mid))
    last.weight.copy_(ungrouped(v.transpose(1, 2)).reshape(last.weight.shape))
    for layer in (first, middle):
        if layer.bias is not None:
            layer.bias.zero_()
    if original.bias is not None:
        last.bias.copy_(original.bias)
