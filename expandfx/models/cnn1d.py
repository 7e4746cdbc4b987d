"""A small 1-D CNN for MNIST-1D-style sequences of shape (batch, 1, 40).

The kernels are 5 wide on purpose, so that k > 3 expansion rules apply.

Example:
    >>> import torch
    >>> from expandfx.models.cnn1d import CNN1D
    >>> model = CNN1D().eval()
    >>> model(torch.randn(2, 1, 40)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["CNN1D"]


class CNN1D(nn.Module):
    """``Conv1d -> ReLU`` stages (first stride 1, later stride 2) + linear head.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        length: Input sequence length; used to compute the flattened features.
        widths: Output channels of each convolution.
        kernel_size: Kernel size of every convolution (odd; "same" padding).

    The convolutions are ``features.0``, ``features.2``, ... and the head is
    ``classifier``. With the defaults the length goes 40 -> 40 -> 20 -> 10.

    Example:
        >>> import torch
        >>> model = CNN1D(num_classes=3, length=64, widths=(16, 16)).eval()
        >>> model(torch.randn(2, 1, 64)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        length: int = 40,
        widths: Sequence[int] = (32, 32, 32),
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [
                nn.Conv1d(channels, width, kernel_size, stride=stride, padding=padding),
                nn.ReLU(),
            ]
            channels = width
            length = (length + 2 * padding - kernel_size) // stride + 1
            if length < 1:
                raise ValueError("input length is too short for the given widths")
        self.features = nn.Sequential(*layers)
        self.num_features = channels * length
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))
