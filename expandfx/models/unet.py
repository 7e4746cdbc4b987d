"""A tiny two-level U-Net for dense (per-pixel) prediction.

Every learnable layer is an ``nn.Conv2d``: upsampling is nearest-neighbour
``nn.Upsample`` followed by a 3x3 convolution — or, with ``upsample="transposed"``, one
``nn.ConvTranspose2d`` (3x3, stride 2, padding 1, output_padding 1: exactly 2x).

Example:
    >>> import torch
    >>> from expandfx.models.unet import TinyUNet
    >>> model = TinyUNet().eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 2, 32, 32])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DoubleConv", "TinyUNet", "Up"]


class DoubleConv(nn.Sequential):
    """``(conv3x3 pad 1 -> BN -> ReLU) x 2``.

    Example:
        >>> import torch
        >>> DoubleConv(3, 8)(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class Up(nn.Module):
    """Upsample x2, 3x3 conv, concatenate the skip, then a DoubleConv.

    Example:
        >>> import torch
        >>> up = Up(16, 8)
        >>> up(torch.randn(2, 16, 8, 8), torch.randn(2, 8, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, upsample: str = "nearest") -> None:
        super().__init__()
        if upsample == "transposed":  # learned upsampling: one ConvTranspose2d, 2x exactly
            self.up = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1,
                                         output_padding=1)
            self.conv = nn.Identity()
        elif upsample == "nearest":
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        else:
            raise ValueError(f"Up: upsample must be 'nearest' or 'transposed', got "
                             f"{upsample!r}")
        self.block = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.up(x))
        return self.block(torch.cat([skip, x], dim=1))


class TinyUNet(nn.Module):
    """Two-level U-Net: widths w, 2w and a 4w bottleneck.

    Input height and width must be divisible by 4.

    Args:
        in_channels: Number of input image channels.
        num_classes: Number of output channels (per-pixel logits).
        width: Channels of the first encoder level.
        upsample: ``"nearest"`` (``nn.Upsample`` then a 3x3 conv) or ``"transposed"`` (a
            ``nn.ConvTranspose2d``) in the decoder.

    Example:
        >>> import torch
        >>> model = TinyUNet(in_channels=1, num_classes=3, width=4).eval()
        >>> model(torch.randn(2, 1, 24, 40)).shape
        torch.Size([2, 3, 24, 40])
        >>> TinyUNet(upsample="transposed").eval()(torch.randn(1, 3, 16, 16)).shape
        torch.Size([1, 2, 16, 16])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 8,
                 upsample: str = "nearest") -> None:
        super().__init__()
        self.enc1 = DoubleConv(in_channels, width)
        self.pool1 = nn.MaxPool2d(2)
        self.enc2 = DoubleConv(width, 2 * width)
        self.pool2 = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(2 * width, 4 * width)
        self.up2 = Up(4 * width, 2 * width, upsample)
        self.up1 = Up(2 * width, width, upsample)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool1(s1))
        x = self.bottleneck(self.pool2(s2))
        x = self.up2(x, s2)
        x = self.up1(x, s1)
        return self.head(x)
