"""SmallNet: the small CIFAR-10 network from the ExpandNets paper.

SmallNet (Guo et al., "ExpandNets: Linear Over-parameterization to Train
Compact Convolutional Networks", NeurIPS 2020) is a plain stack of
``Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d(2)`` stages followed by a
two-layer fully-connected classifier.

Example:
    >>> import torch
    >>> from expandfx.models.smallnet import smallnet_3x3
    >>> model = smallnet_3x3().eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "SmallNet",
    "smallnet_3x3",
    "smallnet_7x7",
    "smallnet_7x7_ablation",
    "smallnet_digits",
]


class SmallNet(nn.Module):
    """Conv-BN-ReLU-MaxPool stages followed by ``Linear -> ReLU -> Linear``.

    Args:
        kernel_size: Square kernel size of every convolution.
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        widths: Output channels of each convolutional stage.
        padding: Convolution padding. ``None`` selects 0 for ``kernel_size=3``
            (the paper's 3x3 SmallNet is unpadded) and ``(k - 1) // 2``
            ("same" padding) for larger kernels.
        hidden: Width of the hidden fully-connected layer.
        input_size: Spatial size (height = width) of the expected input; used
            to compute the flattened feature count.

    The convolutions are ``features.0``, ``features.4``, ... and the linear
    layers are ``classifier.0`` and ``classifier.2``.

    Example:
        >>> import torch
        >>> model = SmallNet(kernel_size=7).eval()
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        kernel_size: int = 3,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (8, 16, 32),
        padding: int | None = None,
        hidden: int = 64,
        input_size: int = 32,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = 0 if kernel_size == 3 else (kernel_size - 1) // 2

        layers: list[nn.Module] = []
        channels = in_channels
        size = input_size
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size, padding=padding, bias=True),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
            size = (size + 2 * padding - kernel_size + 1) // 2
            if size < 1:
                raise ValueError(
                    f"input_size={input_size} is too small for {len(widths)} stages "
                    f"with kernel_size={kernel_size} and padding={padding}"
                )
        self.features = nn.Sequential(*layers)
        self.num_features = channels * size * size
        self.classifier = nn.Sequential(
            nn.Linear(self.num_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def smallnet_3x3(num_classes: int = 10) -> SmallNet:
    """The paper's CIFAR SmallNet with unpadded 3x3 kernels (15,050 params).

    Example:
        >>> import torch
        >>> smallnet_3x3()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return SmallNet(kernel_size=3, num_classes=num_classes, widths=(8, 16, 32), padding=0)


def smallnet_7x7(num_classes: int = 10) -> SmallNet:
    """The paper's CIFAR SmallNet with 7x7 kernels, padding 3 (66,186 params).

    Example:
        >>> import torch
        >>> smallnet_7x7()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return SmallNet(kernel_size=7, num_classes=num_classes, widths=(8, 16, 32), padding=3)


def smallnet_7x7_ablation(num_classes: int = 10) -> SmallNet:
    """The paper's deeper 7x7 ablation SmallNet (Table 6, 150,346 params).

    Four stages of widths 8, 16, 32, 64 with 7x7 kernels and padding 3 on
    32x32 inputs (32 -> 16 -> 8 -> 4 -> 2), then 256 -> 64 -> 10.

    Example:
        >>> import torch
        >>> model = smallnet_7x7_ablation()
        >>> sum(p.numel() for p in model.parameters())
        150346
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return SmallNet(
        kernel_size=7,
        num_classes=num_classes,
        widths=(8, 16, 32, 64),
        padding=3,
        input_size=32,
    )


def smallnet_digits(num_classes: int = 10) -> SmallNet:
    """SmallNet adapted to scikit-learn's 8x8 grayscale digits (8,282 params).

    Two 5x5 (padding 2) stages of widths 8 and 16: 8 -> 4 -> 2, then 64 -> 64 -> 10.

    Example:
        >>> import torch
        >>> smallnet_digits()(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    return SmallNet(
        kernel_size=5,
        num_classes=num_classes,
        in_channels=1,
        widths=(8, 16),
        padding=2,
        hidden=64,
        input_size=8,
    )
