"""Weight compander: train every conv/linear weight as ``w = Ψ(v) = a·f(v/b)``.

``compand`` registers a :class:`Compander` parametrization (``torch.nn.utils.parametrize``)
on the ``weight`` of every conv/linear layer (transposed convs too) — compact layers and
every factor of expanded blocks — never on biases or normalization layers; the model keeps
its class.
``v`` starts at ``Ψ⁻¹(w)``, so the model computes exactly what it computed before.
``bake`` turns ``Ψ(v)`` back into plain weights with the original ``state_dict`` keys.

Example::

    >>> import torch, expandfx as efx
    >>> from expandfx.models import smallnet_3x3
    >>> model = smallnet_3x3().eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> same = efx.compand(model, psi="arctan", a=1.0, b=0.6)   # a copy; model unchanged
    >>> torch.allclose(same(x), model(x), atol=1e-6)
    True
    >>> groups = efx.param_groups(same, lr=0.1, weight_decay=5e-4)  # decay on Ψ(v)
    >>> opt = torch.optim.SGD(groups, momentum=0.9)
    >>> list(efx.bake(same).state_dict()) == list(model.state_dict())
    True
"""

from __future__ import annotations

import copy
import logging
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .copying import as_module, copy_model
from .errors import ConfigError
from .finite import check_model, check_named
from .formatting import text_table
from .layer_types import LAYER_TYPES, TRANSPOSED_TYPES, base_type
from .patterns import check_names, first_match

__all__ = ["Compander", "LEARNABLE", "PSIS", "Psi", "bake", "compand", "companded",
           "modified_adaptive", "summary"]


log = logging.getLogger("expandfx")
Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Psi:
    """A compander shape ``f`` with its inverse, derivative and bound ``sup |f|``.

    ``Ψ(v) = a·f(v/b)``, ``Ψ⁻¹(w) = b·inverse(w/a)``, ``Ψ'(v) = (a/b)·derivative(v/b)``.
    Pass one to ``compand(psi=...)`` for a custom shape (``f`` odd and increasing).
    """

    name: str
    f: Fn
    inverse: Fn
    derivative: Fn
    bound: float = math.inf


PSIS = {
    "arctan": Psi("arctan", torch.atan, torch.tan, lambda u: 1 / (1 + u * u), math.pi / 2),
    "arsinh": Psi("arsinh", torch.asinh, torch.sinh, lambda u: torch.rsqrt(1 + u * u)),
    "erf": Psi("erf", torch.erf, torch.erfinv,
               lambda u: 2 / math.sqrt(math.pi) * torch.exp(-u * u), 1.0),
}
LEARNABLE = (None, "layer", "global")


class Compander(nn.Module):
    """The parametrization ``v ↦ a·f(v/b)``; ``a``, ``b`` are parameters when learnable."""

    def __init__(self, psi: Psi, a: torch.Tensor, b: torch.Tensor, learnable: str | None) -> None:
        super().__init__()
        self.psi = psi
        self.learnable = learnable
        if learnable:
            self.a, self.b = a, b  # nn.Parameter, possibly shared by every layer
        else:
            self.register_buffer("a", a)
            self.register_buffer("b", b)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.a * self.psi.f(v / self.b)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        limit = (self.a * self.psi.bound).item()
        if w.abs().max().item() >= limit:
            raise ValueError(f"compander: |w| reaches {w.abs().max().item():.4g}, outside the "
                             f"range |w| < a·{self.psi.bound:.4g} = {limit:.4g} of Ψ; raise a.")
        return self.b * self.psi.inverse(w / self.a)

    def get_extra_state(self) -> dict[str, str]:
        return {"psi": self.psi.name}

    def set_extra_state(self, state: dict[str, str]) -> None:
        if state.get("psi") != self.psi.name:
            raise ConfigError(f"compander: the checkpoint was companded with psi="
                              f"{state.get('psi')!r} but this model uses psi={self.psi.name!r}; "
                              f"compand with the same psi before loading.")

    def derivative(self, v: torch.Tensor) -> torch.Tensor:
        """``dΨ/dv`` in closed form."""
        return self.a / self.b * self.psi.derivative(v / self.b)

    def extra_repr(self) -> str:
        return (f"psi={self.psi.name}, a={self.a.item():.4g}, b={self.b.item():.4g}, "
                f"learnable={self.learnable}")


def compand(model: nn.Module, psi: str | Psi = "arctan", a: float = 1.0, b: float = 1.0,
            learnable: str | None = None, *, include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (``model`` itself with ``inplace=True``) with every conv/linear
    ``weight`` reparameterized as ``a·f(v/b)``; write ``big = efx.compand(big, ...)``.

    A copy by default, as every verb of expandfx (``expand``, ``contract``, ``bake``):
    ``torch.nn.utils.parametrize`` registers in place, so ``inplace=True`` is that
    behaviour. ``include``/``exclude``: module-name globs. ``learnable="layer"`` gives each
    layer its own
    ``a``, ``b`` parameters (the paper's "fine" version), ``"global"`` one pair for
    the whole network ("coarse"); ``None`` keeps them fixed.
    """
    shape = _psi(psi)
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"compand: {name} must be a positive number, got {name}={value!r}"
                              f" (the paper uses a, b in 0.5 … 1.0).")
    if learnable not in LEARNABLE:
        raise ConfigError(f"compand: learnable must be one of {LEARNABLE}, got {learnable!r}.")
    model = as_module(model, "compand")
    target = model if inplace else copy_model(model, "compand")
    layers = _select(target, include, exclude)
    for path, layer in layers:
        if layer.weight.device.type == "meta":
            raise ConfigError(f"compand: '{path}' is on the meta device (its weight has no "
                              f"values), so v = Ψ⁻¹(w) cannot be computed. Materialize the "
                              f"model first (model.to_empty(device='cpu') and load_state_dict).")
        check_named([(f"{path}.weight", layer.weight)], "compand")  # Ψ⁻¹(NaN) is NaN
        if parametrize.is_parametrized(layer, "weight"):
            raise ConfigError(f"compand: '{path}' already has a parametrization on weight "
                              f"({_describe(layer)}); compand a model once, or call "
                              f"expandfx.bake(model) first.")
        limit = a * shape.bound
        peak = layer.weight.detach().abs().max().item()
        if peak >= limit:
            raise ConfigError(f"compand: '{path}' has |w| up to {peak:.4g}, outside Ψ's range "
                              f"|w| < a·{shape.bound:.4g} = {limit:.4g} (psi={shape.name}, "
                              f"a={a:g}): Ψ⁻¹(w) would be inf or NaN. Use a > "
                              f"{peak / shape.bound:.4g}, or exclude this layer.")
    shared = None
    for _path, layer in layers:
        ref = layer.weight
        if learnable == "global":
            shared = shared or _pair(a, b, ref, learnable)
            pa, pb = shared
        else:
            pa, pb = _pair(a, b, ref, learnable)
        parametrize.register_parametrization(layer, "weight", Compander(shape, pa, pb, learnable))
    if not layers:
        log.warning("compand: no conv/linear layer matched in %s", type(model).__name__)
    log.info("compand:\n%s", summary(target))
    return target


def bake(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every ``Ψ(v)`` by its value as a plain ``weight`` (keys as before ``compand``).
    Raises :class:`~expandfx.errors.NonFiniteError` naming a ``v`` (or ``a``, ``b``) that
    holds NaN or inf (Ψ would hide an inf ``v`` as ``±a·π/2``)."""
    model = as_module(model, "bake")
    for path, layer, _ in companded(model):  # all checked before any layer is baked
        check_model(layer.parametrizations["weight"], "bake",
                    prefix=f"{path}.parametrizations.weight".lstrip("."))
    target = model if inplace else copy.deepcopy(model)
    for _, layer, _ in companded(target):
        # parametrize edits the layer's (dynamically made) class, which a deepcopy shares
        # with the model it was copied from: give this layer a class of its own first.
        cls = type(layer)
        layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        if "bias" in layer._parameters:  # restore the key order: weight, then bias
            layer._parameters["bias"] = layer._parameters.pop("bias")
    return target


def companded(model: nn.Module) -> list[tuple[str, nn.Module, Compander]]:
    """``(path, layer, compander)`` for every companded weight of ``model``."""
    found = []
    for path, layer in model.named_modules():
        if parametrize.is_parametrized(layer, "weight"):
            chain = layer.parametrizations["weight"]
            if len(chain) == 1 and isinstance(chain[0], Compander):
                found.append((path, layer, chain[0]))
    return found


def summary(model: nn.Module) -> str:
    """A table of companded weights: path, Ψ, a, b, learnable."""
    rows = [("weight", "psi", "a", "b", "learnable")]
    rows += [(f"{path}.weight", c.psi.name, f"{c.a.item():.4g}", f"{c.b.item():.4g}",
              str(c.learnable or "fixed")) for path, _, c in companded(model)]
    return text_table(rows)


def modified_adaptive(optimizer: torch.optim.Optimizer, model: nn.Module
                      ) -> torch.optim.Optimizer:
    """The paper's "modified adaptive optimizer" (after Powerpropagation), on any optimizer.

    Patches ``optimizer.step`` (in place; the same object is returned, so LR schedulers
    keep working): for every companded ``v`` the optimizer computes its step from the raw
    gradient ``∂L/∂Ψ(v)`` — Adam's moments see ``∂L/∂w`` — and the step is then scaled by
    ``Ψ'(v)``; every other parameter is stepped as usual. A ``closure`` is evaluated first
    (with gradients), so it works too (not for LBFGS, which re-evaluates it: refused).
    Optimizer weight decay on ``v`` (learnable a, b with :func:`expandfx.param_groups`) is part of
    the rescaled step. Only the ``v`` this optimizer owns are touched. The patch lives on
    the optimizer object: re-apply it to a deep-copied or reloaded optimizer.

    Example::

        opt = efx.modified_adaptive(torch.optim.Adam(model.parameters(), lr=1e-3), model)
        loss.backward()
        opt.step()   # v.grad is turned into ∂L/∂w in place before the inner step
    """
    if getattr(optimizer, "_expandfx_modified_adaptive", False):
        raise ConfigError(f"modified_adaptive: this {type(optimizer).__name__} is already "
                          f"patched; apply modified_adaptive once per optimizer.")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ConfigError("modified_adaptive: LBFGS re-evaluates its closure inside step(), "
                          "so its gradients cannot be rescaled; use an Adam-style optimizer.")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    targets = [(layer.parametrizations["weight"].original, comp)
               for _, layer, comp in companded(model)
               if id(layer.parametrizations["weight"].original) in owned]
    if not targets:
        raise ConfigError(f"modified_adaptive: the optimizer holds no companded weight of "
                          f"{type(model).__name__}; call expandfx.compand(model) before "
                          f"building the optimizer, and give it the model's parameters.")
    inner_step = optimizer.step

    def step(self: torch.optim.Optimizer,
             closure: Callable[[], torch.Tensor] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved = []
        with torch.no_grad():
            for v, comp in targets:
                if v.grad is None:
                    continue
                slope = comp.derivative(v)
                v.grad.div_(slope.clamp_min(torch.finfo(slope.dtype).tiny))  # → ∂L/∂w
                saved.append((v, v.detach().clone(), slope))
        inner_step()
        with torch.no_grad():
            for v, before, slope in saved:
                v.copy_(before + (v - before) * slope)
        return loss

    optimizer.step = types.MethodType(step, optimizer)  # a bound method, as schedulers expect
    optimizer._expandfx_modified_adaptive = True
    return optimizer


def _psi(psi: str | Psi) -> Psi:
    if isinstance(psi, Psi):
        return psi
    if psi not in PSIS:
        raise ConfigError(f"compand: unknown psi {psi!r}; use one of {sorted(PSIS)} or an "
                          f"expandfx.Psi(name, f, inverse, derivative, bound).")
    return PSIS[psi]


def _select(model: nn.Module, include: Any, exclude: Any) -> list[tuple[str, nn.Module]]:
    inc = [include] if isinstance(include, str) else include
    exc = [exclude] if isinstance(exclude, str) else (exclude or [])
    modules = dict(model.named_modules())
    layers = [path for path, layer in modules.items()
              if issubclass(base_type(layer), (*LAYER_TYPES, *TRANSPOSED_TYPES))]
    for where, patterns in (("include=", inc), ("exclude=", exc)):
        check_names(patterns, layers, "compand", where, modules=list(modules), stacklevel=5)
    return [(path, modules[path]) for path in layers
            if (inc is None or first_match(path, inc) is not None)
            and not first_match(path, exc)]


def _pair(a: float, b: float, ref: torch.Tensor, learnable: str | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    make = (lambda x: nn.Parameter(torch.tensor(float(x), dtype=ref.dtype, device=ref.device))
            ) if learnable else (lambda x: torch.tensor(float(x), dtype=ref.dtype,
                                                         device=ref.device))
    return make(a), make(b)


def _unique(params: list[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _describe(layer: nn.Module) -> str:
    chain = layer.parametrizations["weight"]
    return ", ".join(type(p).__name__ for p in chain)
