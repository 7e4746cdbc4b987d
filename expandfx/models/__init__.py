"""Small, plain PyTorch reference networks (no expandfx dependencies).

Example:
    >>> import torch
    >>> from expandfx.models import EXAMPLE_SHAPES, get_model
    >>> model = get_model("smallnet_7x7").eval()
    >>> model(torch.randn(EXAMPLE_SHAPES["smallnet_7x7"])).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cnn1d import CNN1D
from .mobilenet import DepthwiseSeparable, MobileNetV1
from .resnet import BasicBlock, TinyResNet
from .smallnet import (
    SmallNet,
    smallnet_3x3,
    smallnet_7x7,
    smallnet_7x7_ablation,
    smallnet_digits,
)
from .unet import DoubleConv, TinyUNet, Up

__all__ = [
    "CNN1D",
    "EXAMPLE_SHAPES",
    "MODELS",
    "BasicBlock",
    "DepthwiseSeparable",
    "DoubleConv",
    "MobileNetV1",
    "SmallNet",
    "TinyResNet",
    "TinyUNet",
    "Up",
    "get_model",
    "smallnet_3x3",
    "smallnet_7x7",
    "smallnet_7x7_ablation",
    "smallnet_digits",
]

#: Zero-argument factories for every reference model, keyed by name.
MODELS: dict[str, Callable[[], nn.Module]] = {
    "smallnet_3x3": smallnet_3x3,
    "smallnet_7x7": smallnet_7x7,
    "smallnet_7x7_ablation": smallnet_7x7_ablation,
    "smallnet_digits": smallnet_digits,
    "mobilenet_v1": MobileNetV1,
    "tiny_resnet": TinyResNet,
    "tiny_unet": TinyUNet,
    "cnn1d": CNN1D,
}

#: A batch-2 example input shape for every model in :data:`MODELS`.
EXAMPLE_SHAPES: dict[str, tuple[int, ...]] = {
    "smallnet_3x3": (2, 3, 32, 32),
    "smallnet_7x7": (2, 3, 32, 32),
    "smallnet_7x7_ablation": (2, 3, 32, 32),
    "smallnet_digits": (2, 1, 8, 8),
    "mobilenet_v1": (2, 3, 32, 32),
    "tiny_resnet": (2, 3, 32, 32),
    "tiny_unet": (2, 3, 32, 32),
    "cnn1d": (2, 1, 40),
}


def get_model(name: str) -> nn.Module:
    """Build the registered model ``name`` with its default arguments.

    Raises:
        KeyError: If ``name`` is not registered; the message lists known names.

    Example:
        >>> type(get_model("tiny_resnet")).__name__
        'TinyResNet'
    """
    try:
        factory = MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise KeyError(f"unknown model {name!r}; known models: {known}") from None
    return factory()
