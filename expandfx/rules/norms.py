"""Per-branch normalization for the branch rules (RepVGG, ACNet, DBB, MobileOne): ``norm=``.

- ``None`` — plain linear branches (the block is one convolution, reparameterized).
- ``"scale"`` (OREPA, Hu et al., CVPR 2022) — each branch ends in a learnable per-output-
  channel scale (a depthwise 1×…×1 convolution without bias, ``<branch>.<i>.weight`` of
  shape ``[n, 1, 1, …]``). It is linear, so the block still folds differentiably and trains
  collapsed exactly; the model's own norm after the layer plays OREPA's "one norm after the
  sum". Init: ``1/√B`` for a block of ``B`` branches under ``init="default"`` — the branches
  start independent, so the sum then has the output variance of one default-initialised
  branch instead of ``B`` times it (plain sums, ``norm=None``, start ``√B`` larger);
  ``1`` under ``init="preserve"`` (the block then computes exactly the layer).
- ``"bn"`` (RepVGG, ACNet, DBB, MobileOne as published) — each branch ends in its own
  ``BatchNorm`` (``<branch>.<i>.weight/bias/running_mean/running_var``); the branch
  convolutions lose their biases (the BN's shift replaces them). In training mode a BN
  normalizes by batch statistics, which is not a linear map of the weights' sum, so the
  block runs its branches (``mode="sequential"``; ``"auto"`` picks it, ``"collapsed"`` is
  refused). In eval mode each BN is the affine map of its running statistics
  (:func:`expandfx.linear.ir.batchnorm`), so ``contract``/``fold`` fold it exactly; a
  block contracted while in training mode uses the running statistics too (its eval-mode
  form — the deployable one). The eval-mode form has a shift (``β − γ·μ/σ`` summed): a
  biased layer holds it in its bias; a bias-free layer (conv → BN nets, e.g. every
  torchvision ResNet conv) can take ``"bn"`` only where its result goes to a BatchNorm and
  nowhere else, and ``expandfx.contract`` moves the shift ``b`` into that BN's running mean
  (``μ ← μ − b``, exact in eval and training mode: :meth:`ExpandedBlock.contract
  <expandfx.block.ExpandedBlock.contract>`); ``expand`` refuses any other bias-free layer.
  ``init="preserve"`` cannot hold with ``"bn"`` (a batch-statistics BN changes the
  function) and is refused.

Where a published block puts a BN inside a branch (DBB's 1×1 → BN → k×k), the norm here
sits at the branch's end only: a shift before a zero-padded k×k is not a convolution's
bias (DBB pads with the BN's shift instead), and the 1×1 is linear in front of the k×k.

Example::

    >>> import torch.nn as nn
    >>> from expandfx.rules import repvgg
    >>> block = repvgg.build(nn.Conv2d(4, 4, 3, padding=1), norm="bn")
    >>> [type(m).__name__ for m in block.branches["identity"]]
    ['BatchNorm2d']
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..block import torch_layer_type
from ..errors import ConfigError

__all__ = ["NORMS", "add_norms", "check_norm", "is_branch_norm", "is_norm"]

NORMS = (None, "scale", "bn")
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_norm(norm: str | None, rule: str, where: str = "") -> str | None:
    if norm not in NORMS:
        raise ConfigError(f"{rule}{' for ' + repr(where) if where else ''}: norm must be one "
                          f"of {NORMS} (None: plain branches, 'scale': OREPA's per-branch "
                          f"channel scale, 'bn': a BatchNorm per branch), got {norm!r}.")
    return norm


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a per-branch BatchNorm (a leaf folded by its running stats)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_branch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is the norm :func:`add_norms` ends a branch with: a BatchNorm or a
    channel scale (``norm="scale"``, marked ``branch_norm``). Neither is a factor of the
    branch's product in the ExpandNets sense (``expandfx.optim.param_groups``)."""
    return is_norm(module) or getattr(module, "branch_norm", None) == "scale"


def add_norms(conv: nn.Module, branches: dict[str, Any], norm: str | None, init: str, *,
              rule: str, path: str = "", device: torch.device | str | None = None
              ) -> dict[str, Any]:
    """``branches`` (``{name: layer | [layers] | nn.Identity()}``) with ``norm`` appended to
    each branch (a branch becomes a list); unchanged for ``norm=None``."""
    check_norm(norm, rule, path)
    if norm is None:
        return branches
    where = f"'{path}'" if path else f"this {type(conv).__name__}"
    n, dims, ref = conv.out_channels, len(conv.kernel_size), conv.weight
    device = device or ref.device
    if norm == "bn":
        if init == "preserve":
            raise ConfigError(
                f"{rule}: init='preserve' with norm='bn' for {where}: a BatchNorm in training "
                f"mode normalizes by batch statistics, so no initialisation makes the block "
                f"compute the layer. Use init='default', or norm='scale' / None.")
    out: dict[str, Any] = {}
    scale = 1.0 if init == "preserve" else 1.0 / math.sqrt(len(branches))
    for name, branch in branches.items():
        chain = [] if isinstance(branch, nn.Identity) else \
            list(branch) if isinstance(branch, (list, nn.ModuleList)) else [branch]
        if norm == "bn":
            for layer in chain:  # the BN's shift replaces the convolutions' biases
                if layer.bias is not None:
                    layer.register_parameter("bias", None)
            bn = _BN[dims](n, device=device, dtype=ref.dtype)
            bn.weight.requires_grad_(ref.requires_grad)
            bn.bias.requires_grad_(ref.requires_grad)
            chain.append(bn)
        else:
            layer = torch_layer_type(conv)(n, n, 1, groups=n, bias=False, device=device,
                                           dtype=ref.dtype)
            layer.branch_norm = "scale"  # not a factor of the branch (see is_norm)
            with torch.no_grad():
                layer.weight.fill_(scale)
            layer.weight.requires_grad_(ref.requires_grad)
            chain.append(layer)
        out[name] = chain
    return out
