"""A shortened MobileNetV1 built from depthwise-separable convolutions.

Example:
    >>> import torch
    >>> from expandfx.models.mobilenet import MobileNetV1
    >>> model = MobileNetV1().eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MobileNetV1"]

# (output channels, stride) of each depthwise-separable block, before width scaling.
_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
)
_STEM_CHANNELS = 32


def _scaled(channels: int, width_mult: float, divisor: int = 8) -> int:
    """Scale ``channels`` by ``width_mult`` and round to a multiple of ``divisor``."""
    value = channels * width_mult
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # never round down by more than 10%
        rounded += divisor
    return rounded


def _conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv + BN + ReLU, then pointwise 1x1 conv + BN + ReLU.

    Example:
        >>> import torch
        >>> block = DepthwiseSeparable(8, 16, stride=2)
        >>> block(torch.randn(2, 8, 16, 16)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = _conv_bn_relu(in_channels, in_channels, 3, stride, groups=in_channels)
        self.pointwise = _conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """MobileNetV1-style classifier (shortened block list) for small images.

    Stem: 3x3 stride-2 conv + BN + ReLU, then depthwise-separable blocks with
    channels 64, 128, 128, 256, 256, 512 (strides 1, 2, 1, 2, 1, 2), all
    scaled by ``width_mult`` and rounded to a multiple of 8, global average
    pooling and a linear classifier.

    Args:
        num_classes: Number of output logits.
        width_mult: Channel multiplier applied to every layer.
        in_channels: Number of input image channels.

    Example:
        >>> import torch
        >>> model = MobileNetV1(num_classes=5, width_mult=0.5).eval()
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 0.25,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        channels = _scaled(_STEM_CHANNELS, width_mult)
        layers: list[nn.Module] = [_conv_bn_relu(in_channels, channels, 3, stride=2)]
        for out_channels, stride in _BLOCKS:
            out_channels = _scaled(out_channels, width_mult)
            layers.append(DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)
