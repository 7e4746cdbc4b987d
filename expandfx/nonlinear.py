"""Nonlinear-counterpart initialization (the ExpandNets paper's "+Init", supplement A.1).

Train the expanded model first *with* a nonlinearity between the layers of every block
(the nonlinear counterpart), then remove the nonlinearities keeping the weights, train on
as an ExpandNet, and contract. ``contract`` refuses a block that still has its
nonlinearity.

The recipe that works (measured in ``benchmarks/accuracy_study.py``):

1. ``nonlinear_counterpart(big, "relu")`` — factors re-initialized with He init
   (``init="he"``, the default), which a counterpart without batch norm needs to train;
2. train it with ``expandfx.param_groups(big, lr)`` (nonlinear blocks get the full ``lr``);
3. ``linearize(big, calibrate=batches)`` — removes the nonlinearities and rescales every
   block to the output scale it had *with* its nonlinearity on those batches (without it,
   removing the ReLUs multiplies the logits' scale by 10 or more and training diverges),
   then re-estimates batch-norm statistics;
4. train on as an ExpandNet with *fresh* groups,
   ``expandfx.param_groups(big, lr, chain_lr="norm")``: the trained factors are several
   times larger than at init, and ``"norm"`` shrinks their steps accordingly (plain
   ``lr/N`` diverged here on digits at lr 0.1); then contract.

The paper's rule (supplement A.1): use +Init only where the nonlinear counterpart trains
to a better accuracy than the ExpandNet itself; otherwise train the ExpandNet directly.

Example::

    >>> import torch, expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> big = efx.nonlinear_counterpart(efx.expand(smallnet_7x7(), "CK+FC", r=4))
    >>> type(big.features[0].act).__name__
    'ReLU'
    >>> # ... train big ...
    >>> batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    >>> big = efx.linearize(big, calibrate=batches)   # weights rescaled; an ExpandNet again
    >>> small = efx.contract(big)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .block import ExpandedBlock
from .copying import as_module, copy_model
from .errors import ConfigError
from .restoring import training_flags

__all__ = ["ACTIVATIONS", "linearize", "nonlinear_counterpart"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "tanh": nn.Tanh,
}
INITS = ("he", "keep")


def nonlinear_counterpart(model: nn.Module, act: str | Callable[[], nn.Module] = "relu",
                          init: str = "he", *, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace=True``) with a fresh ``act``
    between the layers of every expanded block; write ``big = nonlinear_counterpart(big)``.

    ``init="he"`` (default) re-initializes every factor with He (Kaiming) normal weights
    for ``act`` and zero biases, so that a deep counterpart without batch norm trains;
    ``init="keep"`` keeps the factors' current weights.
    """
    make = ACTIVATIONS.get(act) if isinstance(act, str) else act
    hint = (f"act must be one of {sorted(ACTIVATIONS)} or a zero-argument callable returning "
            f"an nn.Module (pass nn.ReLU, not nn.ReLU())")
    if make is None or not callable(make) or isinstance(make, nn.Module):
        raise ConfigError(f"nonlinear_counterpart: {hint}; got {act!r}.")
    if init not in INITS:
        raise ConfigError(f"nonlinear_counterpart: init must be one of {INITS}, got {init!r}.")
    _blocks(model, "nonlinear_counterpart")  # refuse before copying
    model = as_module(model, "nonlinear_counterpart")
    model = model if inplace else copy_model(model, "nonlinear_counterpart")
    found = _blocks(model, "nonlinear_counterpart")
    for block in found:
        try:
            module = make()
        except Exception as exc:
            raise ConfigError(f"nonlinear_counterpart: calling {act!r} failed ({exc}); {hint}."
                              ) from None
        if not isinstance(module, nn.Module):
            raise ConfigError(f"nonlinear_counterpart: {act!r} returned "
                              f"{type(module).__name__}; {hint}.")
        ref = block.layers[0].weight
        block.act = module.to(device=ref.device, dtype=ref.dtype)
        if init == "he":
            _he_init(block, _gain(module))
    return model


def linearize(model: nn.Module, calibrate: Iterable[Any] | None = None, *,
              inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace=True``) without the
    nonlinearities of :func:`nonlinear_counterpart`; write ``big = linearize(big, ...)``.

    Without ``calibrate`` the weights stay as they are. With ``calibrate`` — an iterable of
    inputs (tensors, or tuples/lists whose first element is the input, as data loaders
    yield them) — every block, in forward order, is rescaled so that its output's root
    mean square on those batches equals what it was with its nonlinearity (one positive
    scalar, spread evenly over the factors, which scales the block's output exactly), and
    every batch-norm layer's running statistics are then
    re-estimated on the same batches (after each block, so the next block is measured on
    its final input: two passes over the batches per block). Nothing else changes; the
    model keeps its mode.
    """
    _blocks(model, "linearize")  # refuse before copying
    model = as_module(model, "linearize")
    model = model if inplace else copy_model(model, "linearize")
    found = _blocks(model, "linearize")
    if calibrate is None:
        for block in found:
            block.act = None
        return model
    batches = [_input(b) for b in calibrate]
    if not batches:
        raise ConfigError("linearize: calibrate is empty; pass a few input batches (e.g. "
                          "[x for x, _ in itertools.islice(loader, 8)]).")
    nonlinear = [b for b in found if b.act is not None]
    target = _output_rms(model, nonlinear, batches)
    for block in nonlinear:  # forward order: each block sees the already rescaled inputs
        block.act = None
        current = _output_rms(model, [block], batches)[block]
        if current > 0 and math.isfinite(current):
            _scale_evenly(block, target[block] / current)
        _reestimate_batchnorm(model, batches)  # so the next block sees its final input
    return model


def _blocks(model: nn.Module, caller: str) -> list[ExpandedBlock]:
    found = [m for m in model.modules() if isinstance(m, ExpandedBlock)]
    if not found:
        raise ConfigError(f"{caller}: {type(model).__name__} has no expanded blocks; call "
                          f"expandfx.expand(model, ...) first.")
    branched = [path for path, m in model.named_modules()
                if isinstance(m, ExpandedBlock) and not m.is_chain]
    if branched:
        raise ConfigError(
            f"{caller}: {branched[:3]} hold parallel branches (rule "
            f"{model.get_submodule(branched[0]).rule}); +Init puts a nonlinearity between the "
            f"factors of a chain, which branches do not have. Expand those layers with a "
            f"chain rule (CL, CK, FC) or exclude them before using +Init.")
    return found


def _gain(act: nn.Module) -> float:
    if isinstance(act, nn.LeakyReLU):
        return nn.init.calculate_gain("leaky_relu", act.negative_slope)
    if isinstance(act, nn.Tanh):
        return nn.init.calculate_gain("tanh")
    return nn.init.calculate_gain("relu")  # ReLU, GELU and unknown activations


@torch.no_grad()
def _he_init(block: ExpandedBlock, gain: float) -> None:
    for layer in block.layers:
        weight = layer.weight
        fan_in = weight[0].numel()  # in_features, or in_channels/groups · kernel volume
        _set_weight(layer, torch.randn_like(weight) * (gain / math.sqrt(fan_in)))
        if layer.bias is not None:
            layer.bias.zero_()


@torch.no_grad()
def _scale_evenly(block: ExpandedBlock, scale: float) -> None:
    """Multiply the block's output by ``scale``, spread evenly over its N factors.

    Factor ``i`` (1-based) gets its weight times ``c = scale^(1/N)`` and its bias times
    ``c^i`` — exact, since the bias of factor ``i`` passes through factors ``i+1…N``.
    Spreading keeps the factors' norms balanced; putting all of ``scale`` on one factor
    would leave the others large, and under SGD the step of the folded weight grows with
    the norms of the factors (see :mod:`expandfx.optim`).
    """
    c = scale ** (1.0 / len(block.layers))
    for i, layer in enumerate(block.layers, start=1):
        _set_weight(layer, layer.weight * c)
        if layer.bias is not None:
            layer.bias.mul_(c**i)


def _set_weight(layer: nn.Module, value: torch.Tensor) -> None:
    """Write ``value`` as the layer's weight (through ``Ψ⁻¹`` where it is companded)."""
    if parametrize.is_parametrized(layer, "weight"):
        layer.weight = value
    else:
        layer.weight.copy_(value)


def _input(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"linearize: calibrate must yield tensors or (input, ...) tuples, "
                          f"got {type(x).__name__}.")
    return x


@torch.no_grad()
def _output_rms(model: nn.Module, blocks: list[ExpandedBlock], batches: list[torch.Tensor]
                ) -> dict[ExpandedBlock, float]:
    """Root mean square of each block's output over ``batches`` (model in eval mode)."""
    sums = {b: [0.0, 0] for b in blocks}

    def record(block: nn.Module, _args: Any, out: torch.Tensor) -> None:
        acc = sums[block]
        acc[0] += out.double().pow(2).sum().item()
        acc[1] += out.numel()

    handles = [b.register_forward_hook(record) for b in blocks]
    try:
        with training_flags(model):
            model.eval()
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {b: math.sqrt(s / max(n, 1)) for b, (s, n) in sums.items()}


@torch.no_grad()
def _reestimate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Running statistics of every batch norm, recomputed as a plain average over ``batches``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    try:
        with training_flags(model):
            model.eval()
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average
                m.train()
            for x in batches:
                model(x)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
