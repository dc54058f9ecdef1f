"""A small CNN of your own, with layers the deploykit zoo does not use: depthwise-separable convolutions, LayerNorm
over channels, GELU and a squeeze-excite block. deploykit builds it through `build` (model.factory in pipeline.yaml)."""

from __future__ import annotations

import torch
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (as in ConvNeXt)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.act = nn.GELU()
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(scale))))


class Block(nn.Module):
    """Depthwise 3x3 -> LayerNorm -> pointwise 1x1 -> GELU -> squeeze-excite, with a residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin)
        self.norm = ChannelLayerNorm(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1)
        self.act = nn.GELU()
        self.se = SqueezeExcite(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.act(self.pointwise(self.norm(self.depthwise(x)))))
        return x + y if self.residual else y


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU())
        self.blocks = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def build(num_classes: int = 10, width: int = 32) -> nn.Module:
    return TinyNet(num_classes=num_classes, width=width)
