"""ResNet-18/34/50/101/152 (He et al., 2015) with torchvision's v1.5 layout and state_dict names."""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from deploykit.zoo.common import (
    ModelSpec,
    ResidualBlock,
    ZooModel,
    init_weights,
    make_divisible,
    scale_depth,
    stem_geometry,
)

OPTIONS = ("stem", "width_mult", "depth_mult", "dropout", "zero_init_residual")
STAGE_WIDTHS = (64, 128, 256, 512)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs; H(x) = F(x) + x. Each ReLU is its own module so no module runs twice per forward."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample
        self.relu2 = nn.ReLU(inplace=True)

    def residual_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(ResidualBlock):
    """1x1 reduce -> 3x3 (carries the stride, v1.5) -> 1x1 expand by 4; H(x) = F(x) + x."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.downsample = downsample
        self.relu3 = nn.ReLU(inplace=True)

    def residual_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(ZooModel):
    """Stem (conv1, bn1, relu, maxpool) -> layer1..layer4 -> global pool -> fc."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        repeats: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        widths = [make_divisible(w * width_mult) for w in STAGE_WIDTHS]
        kernel, stride = stem_geometry(stem, imagenet_kernel=7)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel, stride, padding=kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        # Identity keeps the module names identical across stems; 32x32 inputs cannot afford the downsampling.
        self.maxpool = nn.Identity() if stem == "cifar" else nn.MaxPool2d(3, stride=2, padding=1)

        channels = widths[0]
        for index, (width, n) in enumerate(zip(widths, repeats)):
            stride = 1 if index == 0 else 2  # layer1 keeps the stem's resolution
            stage, channels = self._make_stage(block, channels, width, scale_depth(n, depth_mult), stride)
            setattr(self, f"layer{index + 1}", stage)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        head = ["avgpool", "flatten"]
        if dropout > 0:
            self.dropout = nn.Dropout(dropout)
            head.append("dropout")
        self.fc = nn.Linear(channels, num_classes)

        body = [[f"layer{i}"] for i in range(1, 5)]
        self._stage_groups = [["conv1", "bn1", "relu", "maxpool"], *body, [*head, "fc"]]
        init_weights(self, zero_init_residual=zero_init_residual)

    @staticmethod
    def _make_stage(
        block: type[BasicBlock | Bottleneck], in_channels: int, width: int, blocks: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        out_channels = width * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            # Projection shortcut so F(x) + x has matching shapes.
            downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        layers = [block(in_channels, width, stride, downsample)]
        layers += [block(out_channels, width, 1, None) for _ in range(blocks - 1)]
        return nn.Sequential(*layers), out_channels


_CONFIGS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}

MODELS = {
    name: ModelSpec("resnet", partial(ResNet, block, repeats), OPTIONS) for name, (block, repeats) in _CONFIGS.items()
}
