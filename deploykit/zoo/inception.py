"""GoogLeNet / Inception v1 (Szegedy et al., 2014) with torchvision's layout (no aux logits) and state_dict names."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deploykit.zoo.common import ModelSpec, ZooModel, init_weights, make_divisible, stem_geometry

OPTIONS = ("stem", "width_mult", "dropout")

# Per module: (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection) output channels, from the paper's table 1.
_INCEPTION = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}
# Body stages in forward order; a max-pool opens each stage after the first.
_STAGES = (
    ("inception3a", "inception3b"),
    ("maxpool3", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e"),
    ("maxpool4", "inception5a", "inception5b"),
)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN(eps=1e-3) -> ReLU, named conv/bn like torchvision's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->"5x5"; 3x3 max-pool->1x1) concatenated on channels."""

    def __init__(
        self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, 1), BasicConv2d(ch3x3red, ch3x3, 3))
        # The paper's 5x5 conv is 3x3 in torchvision (pytorch/vision#906); we match it so its state_dicts load.
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, 1), BasicConv2d(ch5x5red, ch5x5, 3))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), BasicConv2d(in_channels, pool_proj, 1)
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(ZooModel):
    """Stem convs and pools -> nine Inception modules in three stages -> global pool -> dropout -> fc."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        width_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()

        def scale(channels: int) -> int:
            return make_divisible(channels * width_mult)

        kernel, stride = stem_geometry(stem, imagenet_kernel=7)
        self.conv1 = BasicConv2d(in_channels, scale(64), kernel, stride)
        # Identity keeps the module names identical across stems; 32x32 inputs cannot afford the early pools.
        self.maxpool1 = nn.Identity() if stem == "cifar" else nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(scale(64), scale(64), 1)
        self.conv3 = BasicConv2d(scale(64), scale(192), 3)
        self.maxpool2 = nn.Identity() if stem == "cifar" else nn.MaxPool2d(3, stride=2, ceil_mode=True)

        channels = scale(192)
        for name, widths in _INCEPTION.items():
            module = Inception(channels, *(scale(w) for w in widths))
            setattr(self, name, module)
            channels = module.out_channels
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

        self._stage_groups = [
            ["conv1", "maxpool1", "conv2", "conv3", "maxpool2"],
            *[list(stage) for stage in _STAGES],
            ["avgpool", "flatten", "dropout", "fc"],
        ]
        init_weights(self, init_linear=_init_linear)


def _init_linear(linear: nn.Linear) -> None:
    # torchvision's GoogLeNet rule for the classifier weight: N(0, 0.01), truncated; the bias keeps PyTorch's default.
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.01, a=-2, b=2)


MODELS = {"googlenet": ModelSpec("inception", GoogLeNet, OPTIONS)}
ALIASES = {"inception_v1": "googlenet"}
