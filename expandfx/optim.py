"""Optimizer parameter groups for expanded and companded models: one home for the rules.

The rules, all about *what the optimizer should see* rather than what the model computes:

- **Per-factor learning rate** (``chain_lr``). Under plain SGD, a step on the factors of a
  linear chain ``W = W_N ⋯ W_1`` moves the folded weight by
  ``ΔW ≈ Σ_i W_N⋯W_{i+1} ΔW_i W_{i-1}⋯W_1``: N terms, each scaled by the norms of the
  *other* factors. The folded weight's effective step therefore grows with the factors
  (measured on a digits net: ×1 at step 0, ×3–16 by step 300, ×44 on a diverging seed)
  and training with the compact net's learning rate can diverge. Giving each factor of an
  N-factor block ``lr / N`` keeps the folded step at the compact layer's scale at init
  (N terms of ``lr/N``) and removed every divergence we measured. Blocks that still carry
  a nonlinearity (:func:`expandfx.nonlinear_counterpart`) are ordinary deeper networks
  and keep ``lr``; rebuild the groups after :func:`expandfx.linearize`.
- **Weight decay of companded weights** (weight-compander paper): with fixed ``a, b`` decay
  acts on ``w = Ψ(v)``, not on ``v``: ``v`` gets no optimizer decay and the returned
  groups' :meth:`ParamGroups.penalty` gives ``weight_decay/2 · Σ‖Ψ(v)‖²`` to add to the
  loss (its gradient is ``weight_decay · Ψ(v) · Ψ'(v)``, ordinary decay of ``w`` under the
  chain rule); with learnable ``a, b`` decay acts on ``v`` (optimizer ``weight_decay``),
  never on ``a`` or ``b``. Every other parameter gets ordinary decay.
- **Who decays what** (the conventions of timm's ``param_groups_weight_decay`` and
  ``create_optimizer_v2``, and of the Hugging Face Trainer). ``weight_decay=None`` (the
  default) writes no ``weight_decay`` into the groups that decay, so the optimizer's own
  setting applies (``AdamW(groups)``: 0.01; ``AdamW(groups, weight_decay=0.5)``: 0.5); a
  number sets it for them. Biases and normalization parameters (every parameter with
  ``ndim <= 1`` or a name ending in ``bias``, timm's rule) get ``weight_decay=0`` by default
  (``decay_bias_and_norm=True`` decays them too, as before): decaying a BatchNorm's scale
  or a bias only shrinks a parameter that costs nothing to keep, and the factors' biases
  of an expanded block are biases too. The parameters the model names in
  ``model.no_weight_decay()`` (a ViT's ``pos_embed``, ``cls_token``) and those whose name
  contains a keyword of ``model.no_weight_decay_keywords()`` get ``weight_decay=0`` too,
  as timm does (an expanded model keeps its class, so both still answer), and so do the
  parameters ``no_decay=`` names. Frozen parameters (``requires_grad=False``) are left out
  of the groups, as timm leaves them out.
- **Each optimizer gets copies.** ``torch.optim`` writes its defaults (``momentum``,
  ``betas``, ...) into the group dicts it is given; a :class:`ParamGroups` hands out fresh
  copies whenever it is iterated or indexed, so ``SGD(groups)`` then ``AdamW(groups)``
  share no settings. Each copy carries ``"expandfx_group": i`` (its index), by which
  :meth:`ParamGroups.rescale` finds an optimizer's groups: ``groups.rescale(opt)``.

Example::

    >>> import torch, expandfx as efx
    >>> from expandfx.models import smallnet_7x7
    >>> big = efx.expand(smallnet_7x7(), "CL", r=2)
    >>> groups = efx.param_groups(big, lr=0.05, weight_decay=5e-4)
    >>> opt = torch.optim.SGD(groups, momentum=0.9)
    >>> sorted({g["lr"] for g in opt.param_groups})     # CL blocks have 3 factors
    [0.016666666666666666, 0.05]
    >>> loss = big(torch.randn(2, 3, 32, 32)).sum() + groups.penalty()
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .block import ExpandedBlock
from .compander import companded
from .errors import ConfigError, ExpandFXWarning
from .linear.ir import Identity, Node, Par, Seq, multiplicity
from .patterns import check_names, closest, matches
from .rules.norms import is_branch_norm

__all__ = ["ChainLR", "ParamGroups", "chain_scale", "param_groups", "step_gain"]

ChainLR = str | float | Callable[[ExpandedBlock], float] | None
#: the key each group handed to an optimizer carries: its index in the ParamGroups
GROUP_KEY = "expandfx_group"


class ParamGroups(Sequence):
    """Optimizer parameter groups (pass them to any ``torch.optim`` optimizer), plus
    :meth:`penalty`, the loss term that fixed-``a, b`` companded weights need for their
    weight decay (a zero tensor when there are none), and :meth:`rescale`.

    A read-only sequence of dicts: iterating or indexing it gives *fresh copies* (a new
    dict and ``params`` list each time), because ``torch.optim`` writes its defaults into
    the dicts it is given; so two optimizers built from the same groups never share a
    setting. Each copy carries ``"expandfx_group": i``, its index here.
    """

    def __init__(self, groups: list[dict[str, Any]], penalty: Callable[[], torch.Tensor],
                 tracked: list[tuple[int, ExpandedBlock]] | None = None,
                 chain_lr: ChainLR = None) -> None:
        self._groups = [{**group, GROUP_KEY: i} for i, group in enumerate(groups)]
        self._penalty = penalty
        self._tracked = tracked or []
        self._chain_lr = chain_lr

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [_copy(group) for group in self._groups[index]]
        return _copy(self._groups[index])

    def __repr__(self) -> str:
        """One line per group: how many parameters, their lr and decay (no tensors)."""
        lines = []
        for group in self._groups:
            params = group["params"]
            lr = f"lr={group['lr']:.4g}" if "lr" in group else "lr=optimizer's"
            wd = (f"weight_decay={group['weight_decay']:g}" if "weight_decay" in group
                  else "weight_decay=optimizer's")
            lines.append(f"  {len(params)} tensors ({sum(p.numel() for p in params):,} "
                         f"values): {lr}, {wd}")
        return f"ParamGroups({len(self)} groups\n" + "\n".join(lines) + ")"

    def penalty(self) -> torch.Tensor:
        """``weight_decay/2 · Σ‖Ψ(v)‖²`` over fixed-``a, b`` companded weights (add to the loss)."""
        return self._penalty()

    def rescale(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Re-apply a rule that depends on the current weights (``"norm"``, a callable) to
        ``optimizer``'s groups that came from these groups (found by their
        ``"expandfx_group"`` key and their parameters): each block's ``lr`` is multiplied
        by new scale / old scale, so a scheduler's changes are kept. Call it every few
        dozen steps; a no-op for static rules. Only ``optimizer``'s groups change (every
        optimizer holds copies of the groups); refused for an optimizer that holds none of
        these groups, and without an optimizer."""
        if optimizer is None:
            raise ConfigError("ParamGroups.rescale: pass the optimizer to rescale: "
                              "groups.rescale(opt). Every optimizer built from the groups "
                              "holds copies of them (so that two optimizers never share "
                              "settings), so the groups alone reach no optimizer.",
                              code="missing_optimizer")
        theirs = getattr(optimizer, "param_groups", None)
        if not isinstance(theirs, list):
            raise ConfigError(f"ParamGroups.rescale: takes the torch.optim optimizer built "
                              f"from these groups, got a {type(optimizer).__name__}.",
                              where="optimizer")
        found: dict[int, list[dict[str, Any]]] = {}
        for group in theirs:
            i = group.get(GROUP_KEY) if isinstance(group, dict) else None
            if (isinstance(i, int) and 0 <= i < len(self._groups)
                    and _same_params(group, self._groups[i])):
                found.setdefault(i, []).append(group)
        if not found:
            raise ConfigError(f"ParamGroups.rescale: this {type(optimizer).__name__} holds none "
                              f"of these {len(self)} groups (no param group with their "
                              f"'{GROUP_KEY}' key and parameters); pass the optimizer built "
                              f"from them (torch.optim.SGD(groups, ...)), or rebuild the "
                              f"groups for this optimizer's model.", where="optimizer")
        for i, block in self._tracked:
            new = chain_scale(block, self._chain_lr)
            for group in found.get(i, ()):
                old = group.get("chain_scale", self._groups[i]["chain_scale"])
                if "lr" in group:
                    group["lr"] *= new / old
                group["chain_scale"] = new


def _copy(group: dict[str, Any]) -> dict[str, Any]:
    return {**group, "params": list(group["params"])}


def _same_params(group: dict[str, Any], ours: dict[str, Any]) -> bool:
    params = group.get("params", ())
    return len(params) == len(ours["params"]) and all(
        p is q for p, q in zip(params, ours["params"], strict=True))


def chain_scale(block: ExpandedBlock, chain_lr: ChainLR = "1/N") -> float:
    """The learning-rate factor of ``block``'s factors under rule ``chain_lr``.

    ``"1/N"``: ``1/N`` for a chain of N factors (for branches, N counts every factor a
    gradient step moves the folded weight through: :func:`expandfx.linear.ir.multiplicity`).
    A per-branch norm (``norm="scale"``'s channel scale, ``norm="bn"``'s BatchNorm) is not a
    factor: it rescales its branch's output per channel (one value per channel, whose step
    is the gradient's projection on the branch), not a weight matrix of the product
    ``W_N ⋯ W_1``; nor is a fixed map (DBB's and OREPA's average pooling, OREPA's frequency
    prior: ``requires_grad=False``, no step). So a branch k×k → scale counts 1, and a DBB
    block 5 (k×k 1, 1×1 1, 1×1 → k×k 2, 1×1 → pooling 1) with every ``norm``; a MobileOne
    block (k=4, identity) 5, not 11 with ``norm="scale"``; OREPA 8.
    ``"norm"``: ``1 / Σ_i Π_{j≠i} g_j²`` for a chain, where
    ``g_j = ‖W_j‖_F / E‖W_j‖_F`` is factor j's growth over PyTorch's default init
    (``E‖W‖_F² = numel / (3·fan_in)``): equal to ``1/N`` at init, and smaller as the other
    factors grow, so that the folded weight's first-order step stays at the compact
    layer's scale (over branches, the terms of every branch add up; per-branch norms and
    fixed maps, not factors, add no step and no growth). Use it for blocks whose
    factors did not start at the default init (after :func:`expandfx.linearize`, or when
    fine-tuning a trained ExpandNet).

    >>> import torch.nn as nn
    >>> from expandfx.rules import fc
    >>> chain_scale(fc.build(nn.Linear(4, 2), r=2))
    0.3333333333333333
    """
    if chain_lr is None or getattr(block, "act", None) is not None:
        return 1.0
    if isinstance(chain_lr, str):
        rule = chain_lr.replace(" ", "").upper()
        if rule == "1/N":
            return 1.0 / max(1, multiplicity(block.topology, lambda path: _is_factor(
                block.get_submodule(path))))
        if rule == "NORM":
            return 1.0 / _steps(block, block.topology)[0]
        raise ConfigError(f"param_groups: chain_lr must be '1/N', 'norm', None, a positive "
                          f"number or a callable (block) -> scale; got {chain_lr!r}.")
    scale = chain_lr(block) if callable(chain_lr) else chain_lr
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ConfigError(f"param_groups: chain_lr gave {scale!r} for a {block.rule} block; "
                          f"a learning-rate scale must be a positive number.")
    return float(scale)


def step_gain(block: ExpandedBlock, probes: int = 8, seed: int = 0) -> float:
    """How far one SGD step of unit lr on every factor moves the folded weight, relative to
    the same step on the compact layer's weight (which has gain 1): the first-order
    ``E_G[Σ_i ‖∂⟨W, G⟩/∂θ_i‖²] / E‖G‖²`` over the block's weight parameters ``θ_i``, for
    Gaussian loss gradients ``G`` (``probes`` of them, seeded: deterministic). It measures,
    on the current weights, what ``"1/N"`` assumes (N at balanced init) and ``"norm"``
    models. A diagnostic: at PyTorch's default init it is 0.5–3.9 for the blocks of the
    study's nets, not N = 3; yet dividing the lr by it (re-measured every 10 steps) trains
    worse than ``lr/N`` (``benchmarks/results/accuracy_study_measured.md``).

    >>> import torch.nn as nn
    >>> from expandfx.rules import fc
    >>> round(step_gain(fc.build(nn.Linear(64, 64), r=1)), 2) < 1    # default init: small
    True
    """
    weights = [p for p in block.parameters() if p.requires_grad and p.dim() > 1]
    if not weights:
        return 1.0
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        folded = block.weight_bias(torch.float64)[0]
        total = 0.0
        for i in range(probes):
            g = torch.randn(folded.shape, generator=gen, dtype=torch.float64)
            grads = torch.autograd.grad((folded * g).sum(), weights, retain_graph=i < probes - 1)
            total += sum(float(x.double().square().sum()) for x in grads) / float(g.square().sum())
    return total / probes


def _steps(block: ExpandedBlock, node: Node) -> tuple[float, float]:
    """``(S, G)`` of a topology node: ``S`` the first-order step of the folded weight per
    unit lr, in units of the compact layer's, ``G`` the squared growth of its folded
    weight. A factor: ``(1, g²)``; a chain multiplies growths (``S = Σ_k S_k Π_{l≠k} G_l``);
    branches add both; an identity moves nothing and has growth 1."""
    if isinstance(node, Identity):
        return 0.0, 1.0
    if isinstance(node, Par):
        parts = [_steps(block, part) for part in node.parts]
        return sum(s for s, _ in parts), sum(g for _, g in parts)
    if isinstance(node, Seq):
        parts = [_steps(block, part) for part in node.parts]
        growths = [g for _, g in parts]
        step = sum(s * math.prod(growths[:k] + growths[k + 1:]) for k, (s, _) in enumerate(parts))
        return step, math.prod(growths)
    layer = block.get_submodule(node)
    if not _is_factor(layer):
        return 0.0, 1.0
    return 1.0, _growth(layer.weight) ** 2


def _is_factor(layer: nn.Module) -> bool:
    """A factor of the block's product: a trainable weight that is not a per-branch norm."""
    weight = getattr(layer, "weight", None)
    return (not is_branch_norm(layer) and isinstance(weight, torch.Tensor)
            and weight.requires_grad)


def _growth(weight: torch.Tensor) -> float:
    """‖W‖_F over its expectation under PyTorch's default init, U(±1/√fan_in)."""
    fan_in = weight[0].numel()
    return weight.detach().norm().item() * math.sqrt(3 * fan_in / weight.numel())


def param_groups(model: nn.Module, lr: float, weight_decay: float | None = None,
                 chain_lr: ChainLR = "1/N", *, no_decay: str | Iterable[str] | None = None,
                 decay_bias_and_norm: bool = False) -> ParamGroups:
    """Parameter groups for any ``torch.optim`` optimizer, with the rules of this module.

    Args:
        model: a compact, expanded and/or companded model.
        lr: the learning rate you would use for the compact model.
        weight_decay: ``None`` (default): the optimizer's own ``weight_decay`` applies to
            the parameters that decay; a number: that decay, applied to companded weights
            as the compander paper says (see the module docstring). The penalty of
            fixed-``a, b`` companded weights needs the number.
        chain_lr: ``"1/N"`` (default: each factor of an N-factor block gets ``lr / N``),
            ``"norm"`` (``lr/N`` corrected for how much the factors have grown, see
            :func:`chain_scale`; for linearized +Init models and fine-tuning),
            ``None`` (every parameter gets ``lr``), a number (every factor gets
            ``lr · chain_lr``) or a callable ``(block) -> scale``.
        no_decay: names or globs of parameters, or of modules (a module's path means all
            its parameters), that get ``weight_decay=0`` (and no compander penalty). An
            exact name (no ``* ? [``) that matches nothing raises
            :class:`~expandfx.errors.ConfigError` naming the closest real names; a glob
            that matches nothing warns (:class:`~expandfx.errors.ExpandFXWarning`).
        decay_bias_and_norm: ``False`` (default): biases and normalization parameters
            (``ndim <= 1`` or named ``*bias``) get ``weight_decay=0``, as in timm and the
            Hugging Face Trainer; ``True``: they decay like every other parameter.

    As timm's ``create_optimizer_v2`` does, the parameters that ``model.no_weight_decay()``
    names (exactly, as a glob or as a module path) and those whose name contains a keyword
    of ``model.no_weight_decay_keywords()`` get ``weight_decay=0`` whatever
    ``decay_bias_and_norm`` says. A name the model claims that is no parameter of it
    matches nothing in silence, as in timm (models list optional parameters they may lack:
    a ViT's ``dist_token``), except a name inside an expanded block (``'head.weight'``
    once ``head`` is expanded: the parameter moved), which warns
    (:class:`~expandfx.errors.ExpandFXWarning`) and says to pass the block to
    ``no_decay=``. Frozen parameters (``requires_grad=False``) are left out of the
    groups, as in timm: unfreeze, then rebuild the groups (or ``opt.add_param_group``).

    Returns a :class:`ParamGroups`: parameters with the same learning rate and decay share
    a group, except that rules which depend on the weights give each block its own group,
    for :meth:`ParamGroups.rescale`; every optimizer built from it gets copies of the
    groups. Add ``groups.penalty()`` to the loss; it is zero unless the model has
    fixed-``a, b`` companded weights.
    """
    _check_number(lr, "lr")
    return _build(model, lr, weight_decay, chain_lr, decay_bias_and_norm, no_decay)


def _build(model: nn.Module, lr: float | None, weight_decay: float | None, chain_lr: ChainLR,
           decay_bias_and_norm: bool, no_decay: str | Iterable[str] | None = None
           ) -> ParamGroups:
    if weight_decay is not None:
        _check_number(weight_decay, "weight_decay", allow_zero=True)
    requested = _names(no_decay)
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    # a module path names all its parameters: the paths that hold one are targets too
    owners = list(dict.fromkeys(path for n in names for path in _ancestors(n)[1:]))
    check_names(requested, names + owners, "param_groups", "no_decay=",
                modules=[path for path, _ in model.named_modules() if path], noun="parameter")
    exempt = {id(p) for n, p in named if _named_by(n, requested)}
    exempt |= _claimed(model, named, requested)
    found = companded(model)
    not_factors = {id(t) for _, _, comp in found for t in (comp.a, comp.b)}
    scale: dict[int, float] = {}  # factor parameters (weights, v, biases) -> lr factor
    owner: dict[int, ExpandedBlock] = {}  # ... -> its block, where the rule can change
    dynamic = chain_lr is not None and not isinstance(chain_lr, (int, float)) and (
        callable(chain_lr) or chain_lr.replace(" ", "").upper() != "1/N")
    for block in model.modules():
        if isinstance(block, ExpandedBlock):
            s = chain_scale(block, chain_lr)
            for p in block.parameters():
                if id(p) not in not_factors:
                    scale.setdefault(id(p), s)
                    if dynamic:
                        owner.setdefault(id(p), block)
    decay: dict[int, float] = dict.fromkeys(exempt, 0.0)  # where it differs from weight_decay
    if not decay_bias_and_norm:
        for name, p in named:
            if p.dim() <= 1 or name.endswith("bias"):
                decay[id(p)] = 0.0
    fixed = []
    for _, layer, comp in found:
        v = layer.parametrizations["weight"].original
        if comp.learnable:
            decay[id(comp.a)] = decay[id(comp.b)] = 0.0
        else:
            decay[id(v)] = 0.0
            if id(v) not in exempt and v.requires_grad:
                fixed.append(layer)
            if isinstance(comp.a, nn.Parameter):  # not learnable but registered as params
                decay[id(comp.a)] = decay[id(comp.b)] = 0.0
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    tracked: dict[int, ExpandedBlock] = {}  # group index -> its block
    for p in model.parameters():
        if not p.requires_grad:
            continue  # frozen: left out, as timm does
        s, wd = scale.get(id(p), 1.0), decay.get(id(p), weight_decay)
        block = owner.get(id(p))
        key = (s, wd, id(block) if block is not None else None)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"params": []}
            if wd is not None:
                group["weight_decay"] = wd
            if lr is not None:
                group["lr"] = lr * s
            if block is not None:
                group["chain_scale"] = s
                tracked[len(groups) - 1] = block
        group["params"].append(p)

    if fixed and weight_decay is None:
        warnings.warn(f"param_groups: {type(model).__name__} has {len(fixed)} companded "
                      f"weights with fixed a, b, whose decay is groups.penalty() on Ψ(v), not "
                      f"the optimizer's; without weight_decay= it is zero. Pass "
                      f"param_groups(..., weight_decay=wd) to decay them.", stacklevel=3)

    def penalty() -> torch.Tensor:
        total = torch.zeros(())
        if not weight_decay:
            return total
        for layer in fixed:
            total = total + layer.weight.pow(2).sum()
        return 0.5 * weight_decay * total

    return ParamGroups(list(groups.values()), penalty, list(tracked.items()), chain_lr)


def _names(no_decay: str | Iterable[str] | None) -> list[str]:
    """``no_decay=`` as a list of names (one string is one name)."""
    if no_decay is None:
        return []
    items = [no_decay] if isinstance(no_decay, str) else no_decay
    try:
        items = list(items)
    except TypeError:
        items = [items]
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise ConfigError(f"param_groups: no_decay= takes parameter or module names (or globs) "
                          f"as strings, got {bad[0]!r}.", where="no_decay")
    return items


def _ancestors(name: str) -> list[str]:
    """``'a.b.c'`` → ``['a.b.c', 'a.b', 'a']``: the name, then its modules' paths."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def _named_by(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches the parameter's name or the path of a module holding it."""
    return any(matches(path, pattern) for pattern in patterns for path in _ancestors(name))


def _claimed(model: nn.Module, named: list[tuple[str, nn.Parameter]],
             requested: Sequence[str] = ()) -> set[int]:
    """The parameters that the model's ``no_weight_decay()`` names and those whose name holds
    a keyword of ``no_weight_decay_keywords()`` (timm's convention). A claimed name inside
    an expanded block (``'head.weight'`` once ``head`` is expanded: the parameter moved)
    warns; other names that match nothing are silent, as in timm, because models list
    optional parameters they may lack (timm's ViT names ``dist_token`` and ``reg_token``
    whether or not it has them). ``requested`` (``no_decay=``) covering the block
    silences the warning: the user has said what to exempt."""
    claims = _claims(model, "no_weight_decay")
    keywords = _claims(model, "no_weight_decay_keywords")
    if not claims and not keywords:
        return set()
    names = [n for n, _ in named]
    for claim in claims:
        block = _expanded_owner(model, claim)
        if block is not None and not any(_named_by(n, [claim]) for n in names) and not any(
                _named_by(n, requested) for n in names if matches(n, block)):
            warnings.warn(f"param_groups: {type(model).__name__}.no_weight_decay() names "
                          f"{claim!r}, but {block!r} is an expanded block whose parameters "
                          f"have other names{closest(claim, names)}, so it exempts nothing "
                          f"from weight decay; pass no_decay=[{block!r}] to exempt the block.",
                          ExpandFXWarning, stacklevel=4)
    return {id(p) for n, p in named
            if _named_by(n, claims) or any(keyword in n for keyword in keywords)}


def _expanded_owner(model: nn.Module, name: str) -> str | None:
    """The path of the expanded block that ``name`` points into, if any."""
    for path in reversed(_ancestors(name)):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return None
        if isinstance(module, ExpandedBlock):
            return path
    return None


def _claims(model: nn.Module, method: str) -> list[str]:
    fn = getattr(model, method, None)
    if not callable(fn):
        return []
    got = fn()
    items = [got] if isinstance(got, str) else list(got or ())
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise ConfigError(f"param_groups: {type(model).__name__}.{method}() must return names "
                          f"(strings), got {bad[0]!r}.", where=method)
    return sorted(set(items))


def _check_number(value: Any, name: str, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        kind = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"param_groups: {name} must be a {kind} number, got {name}={value!r}.")
