"""Conformance check of one model: expand, randomize, contract, compare — layer by layer.

Used by the model-zoo tests and ``benchmarks/conformance.py``. Besides the end-to-end
output, every expanded block is compared with its contracted layer on the very input it
received in the forward pass, so a model whose output happens to be insensitive to a
layer (a tiny classifier init, a layer scale of 1e-6) cannot hide a wrong fold.

Example::

    >>> import torch
    >>> from expandfx.models import TinyResNet
    >>> rec = roundtrip_record(TinyResNet(), "CL", 2, torch.randn(2, 3, 32, 32))
    >>> rec["expanded"], rec["keys_equal"], rec["layer_error"] < 1e-5
    (9, True, True)
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import nn

from .block import ExpandedBlock
from .passes.contract import contract
from .planning import plan
from .surgery import blocks, expand


def randomize_factors(model: nn.Module, seed: int = 0) -> None:
    """Fresh factor weights of a trained-like scale (1/sqrt(fan-in)) in every block."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block, _ in blocks(model).values():
            for p in block.parameters():
                scale = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) * scale)


def roundtrip_record(model: nn.Module, rule: Any, r: float, x: torch.Tensor,
                     seed: int = 0) -> dict[str, Any]:
    """Expand ``model`` (eval mode), randomize the factors, contract; errors and timings."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        the_plan = plan(model, rule, r)
        t0 = time.perf_counter()
        big = expand(model, rule, r).eval()
        expand_s = time.perf_counter() - t0
    randomize_factors(big, seed)
    inputs: dict[int, torch.Tensor] = {}
    def record(module: nn.Module, args: tuple) -> None:  # returns None: the input stays
        inputs.setdefault(id(module), args[0])

    hooks = [b.register_forward_pre_hook(record) for b, _ in blocks(big).values()]
    with torch.no_grad():
        y_big = big(x)
    for h in hooks:
        h.remove()
    t0 = time.perf_counter()
    small = contract(big)
    contract_s = time.perf_counter() - t0
    layer_error = 0.0
    with torch.no_grad():
        y_small = small(x)
        for block, paths in blocks(big).values():
            if id(block) in inputs:
                x_in = inputs[id(block)]
                ref = block(x_in)
                got = small.get_submodule(paths[0])(x_in)
                layer_error = max(layer_error, _rel(ref, got))
    skipped = {row.path: row.reason for row in the_plan.skipped}
    return {
        "expanded": len(the_plan.expanded),
        "skipped": skipped,
        "params_train": sum(p.numel() for p in big.parameters()),
        "params_test": sum(p.numel() for p in small.parameters()),
        "expand_s": expand_s,
        "contract_s": contract_s,
        "output_error": _rel(y_big, y_small),
        "layer_error": layer_error,
        "keys_equal": list(small.state_dict()) == list(model.state_dict()),
        "class_equal": type(small) is type(model),
        "blocks_left": sum(isinstance(m, ExpandedBlock) for m in small.modules()),
        "expanded_model": big,
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if isinstance(a, (tuple, list)):
        return max(_rel(x, y) for x, y in zip(a, b, strict=True))
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


# The model zoo of the conformance suite: name -> (factory "module:callable", kwargs).
# All with random init (pretrained=False); torchvision and timm are test-only dependencies.
ZOO: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("torchvision.models:resnet18", {}),
    "mobilenet_v2": ("torchvision.models:mobilenet_v2", {}),
    "mobilenet_v3_small": ("torchvision.models:mobilenet_v3_small", {}),
    "shufflenet_v2_x0_5": ("torchvision.models:shufflenet_v2_x0_5", {}),
    "efficientnet_b0": ("torchvision.models:efficientnet_b0", {}),
    "regnet_x_400mf": ("torchvision.models:regnet_x_400mf", {}),
    "squeezenet1_1": ("torchvision.models:squeezenet1_1", {}),
    "convnext_tiny": ("torchvision.models:convnext_tiny", {}),
    "densenet121": ("torchvision.models:densenet121", {}),
    "googlenet": ("torchvision.models:googlenet", {"aux_logits": False, "init_weights": True}),
    "timm/mobilenetv3_small_100": ("timm:create_model", {"model_name": "mobilenetv3_small_100"}),
    "timm/efficientnet_b0": ("timm:create_model", {"model_name": "efficientnet_b0"}),
    "timm/repvgg_a0": ("timm:create_model", {"model_name": "repvgg_a0"}),
    "timm/mobileone_s0": ("timm:create_model", {"model_name": "mobileone_s0"}),
    "timm/resnet18": ("timm:create_model", {"model_name": "resnet18"}),
    "timm/vit_tiny": ("timm:create_model", {"model_name": "vit_tiny_patch16_224",
                                            "img_size": 64}),
}
ZOO_INPUT = (2, 3, 64, 64)


def build_zoo_model(name: str) -> nn.Module:
    """Instantiate a zoo model (imports torchvision / timm on demand)."""
    import importlib

    target, kwargs = ZOO[name]
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)(**kwargs)


def applicable_rules(model: nn.Module) -> list[str]:
    """The single rules (CL, CK, FC) that expand at least one layer of ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [rule for rule in ("CL", "CK", "FC") if plan(model, rule, 2).expanded]
