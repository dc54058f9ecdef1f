"""EfficientNet-B0..B7 (Tan & Le, 2019) with torchvision's layout and state_dict names.

Compound scaling multiplies depth by alpha^phi, width by beta^phi and resolution by gamma^phi
(alpha=1.2, beta=1.1, gamma=1.15); `compound_scaling` and the `phi` option implement that formula. The named
B0..B7 models instead use the published (width, depth, resolution, dropout) coefficients, because those, not
the formula's values, are what the released pretrained weights were trained with.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from deploykit.zoo.common import (
    ConvNormAct,
    ModelSpec,
    Norm,
    ResidualBlock,
    ZooModel,
    init_weights,
    make_divisible,
    scale_depth,
    stem_geometry,
)

OPTIONS = ("stem", "width_mult", "depth_mult", "dropout", "phi", "stochastic_depth", "zero_init_residual")
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224

# (expansion, kernel, first stride, input channels, output channels, repeats) per B0 stage, the paper's table 1.
_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# Published (width, depth, resolution, dropout) per variant.
VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}
# B5..B7 weights were ported from TensorFlow, whose BN uses these settings; torchvision builds them the same way.
_TF_NORM_VARIANTS = {"efficientnet_b5", "efficientnet_b6", "efficientnet_b7"}

_SiLU = partial(nn.SiLU, inplace=True)


def compound_scaling(phi: float) -> tuple[float, float, int]:
    """(depth multiplier, width multiplier, input resolution) for compound coefficient `phi`, from B0."""
    return ALPHA**phi, BETA**phi, round(BASE_RESOLUTION * GAMMA**phi)


class SqueezeExcitation(nn.Module):
    """Channel attention: global pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid gate on the input."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.scale_activation = nn.Sigmoid()

    def reset_parameters(self) -> None:
        """PyTorch's fan-in default for both 1x1 convs, which act as Linear layers on the pooled vector.

        The fan-out He init that init_weights gives every conv (torchvision's rule too) sizes fc1 by its squeeze
        width, ~1/24 of its input width, so fc1 starts ~5x too large. Measured at init (width 0.25, 16x16, 4 classes,
        classifier init fixed): the largest grad/weight ratio was 33 with it and 4 with this (ResNet-18: 0.7).
        Only the init changes; names and shapes stay torchvision's.
        """
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per sample with probability p while training, rescaling survivors."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
        return x * keep / survival


class MBConv(ResidualBlock):
    """1x1 expand -> kxk depthwise -> squeeze-excitation -> 1x1 linear projection, residual when shapes allow."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        drop_prob: float,
        norm: Norm,
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and in_channels == out_channels
        hidden = make_divisible(in_channels * expand_ratio)
        layers: list[nn.Module] = []
        if hidden != in_channels:
            layers.append(ConvNormAct(in_channels, hidden, 1, activation=_SiLU, norm=norm))
        layers += [
            ConvNormAct(hidden, hidden, kernel, stride, groups=hidden, activation=_SiLU, norm=norm),
            SqueezeExcitation(hidden, max(1, in_channels // 4)),
            ConvNormAct(hidden, out_channels, 1, norm=norm),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop_prob)

    def residual_norm(self) -> nn.BatchNorm2d | None:
        return self.block[-1][1] if self.use_res_connect else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + self.stochastic_depth(out) if self.use_res_connect else out


class EfficientNet(ZooModel):
    """features: stem conv, seven MBConv stages, 1x1 conv; then pool -> classifier (dropout, linear).

    `width` and `depth` are the final multipliers of B0's channels and block repeats.
    """

    def __init__(
        self,
        width: float,
        depth: float,
        dropout: float,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        stochastic_depth: float = 0.2,
        norm: Norm = nn.BatchNorm2d,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        stages = [
            (t, k, s, make_divisible(cin * width), make_divisible(cout * width), scale_depth(n, depth))
            for t, k, s, cin, cout, n in _STAGES
        ]
        if stem == "cifar":
            # The cifar stem alone leaves a total stride of 16: 32x32 inputs end at 2x2 and 16x16 at 1x1, where
            # the 3x3/5x5 depthwise kernels see one pixel (16x16 shapes, 4 classes, 228 AdamW steps: 34% val, 45%
            # with stride 1 here). Stage 2 keeps its resolution too, for ResNet's cifar total of 8 (32x32 -> 4x4).
            # Shapes and names are unchanged.
            t, k, _, cin, cout, n = stages[1]
            stages[1] = (t, k, 1, cin, cout, n)
        kernel, stride = stem_geometry(stem, imagenet_kernel=3)
        stem_conv = ConvNormAct(in_channels, stages[0][3], kernel, stride, activation=_SiLU, norm=norm)
        features: list[nn.Module] = [stem_conv]

        total_blocks = sum(stage[-1] for stage in stages)
        block_id = 0
        for t, k, s, cin, cout, n in stages:
            blocks = []
            for i in range(n):
                # Drop probability grows linearly with depth, from 0 at the first block.
                drop_prob = stochastic_depth * block_id / total_blocks
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, t, drop_prob, norm))
                block_id += 1
            features.append(nn.Sequential(*blocks))

        last_channels = 4 * stages[-1][4]
        features.append(ConvNormAct(stages[-1][4], last_channels, 1, activation=_SiLU, norm=norm))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout, inplace=True), nn.Linear(last_channels, num_classes))

        self._stage_groups = [[f"features.{i}"] for i in range(len(features))] + [["avgpool", "flatten", "classifier"]]
        init_weights(self, init_linear=_init_linear, zero_init_residual=zero_init_residual)
        for module in self.modules():
            if isinstance(module, SqueezeExcitation):
                module.reset_parameters()  # after init_weights, which gives every conv the fan-out He init


def _init_linear(linear: nn.Linear) -> None:
    # torchvision's rule is U(+-1/sqrt(out_features)): 0.03 for 1000 classes, but 0.5 for 4, whose logits then start
    # with std 2-6 (initial loss 2.35 at width 0.25 and 6.1 at width 1, against ln 4 = 1.39): with the SE init, the
    # largest grad/weight ratio at init was 350 and training stayed at chance (25% on 4-class shapes). Scaling by
    # in_features keeps the ImageNet scale (0.028 for 1280 features) and makes the logits' scale class-count free.
    bound = 1.0 / math.sqrt(linear.in_features)
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)


def build(
    variant: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    width_mult: float = 1.0,
    depth_mult: float = 1.0,
    dropout: float | None = None,
    phi: float | None = None,
    stochastic_depth: float = 0.2,
    zero_init_residual: bool = False,
) -> EfficientNet:
    """The named variant, its width/depth further multiplied by `width_mult`/`depth_mult`.

    `phi` replaces the variant's published width/depth with `compound_scaling(phi)`'s (dropout and BN settings
    stay the variant's); such a model is meant for inputs of `compound_scaling(phi)[2]` pixels.
    """
    width, depth, _, default_dropout = VARIANTS[variant]
    if phi is not None:
        depth, width, _ = compound_scaling(phi)
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01) if variant in _TF_NORM_VARIANTS else nn.BatchNorm2d
    return EfficientNet(
        width * width_mult,
        depth * depth_mult,
        default_dropout if dropout is None else dropout,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=stem,
        stochastic_depth=stochastic_depth,
        norm=norm,
        zero_init_residual=zero_init_residual,
    )


MODELS = {
    name: ModelSpec("efficientnet", partial(build, name), OPTIONS, resolution=resolution)
    for name, (_, _, resolution, _) in VARIANTS.items()
}
