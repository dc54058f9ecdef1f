"""Building blocks shared by the zoo families: the staged model base, conv-norm-act, rounding and init."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

Norm = Callable[[int], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one named model: its family, builder, accepted options and published input size."""

    family: str
    build: Callable[..., ZooModel]  # build(num_classes=, in_channels=, **options)
    options: tuple[str, ...]
    resolution: int = 224


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of `divisor` (at least `min_value`), never losing >10%."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def scale_depth(repeats: int, depth_mult: float) -> int:
    """Blocks in a stage after depth scaling: ceil, and at least one."""
    return max(1, math.ceil(repeats * depth_mult))


class ConvNormAct(nn.Sequential):
    """conv (no bias) -> norm -> optional activation, as a Sequential so keys read `.0.weight`, `.1.weight`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[[], nn.Module] | None = None,
        norm: Norm = nn.BatchNorm2d,
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            norm(out_channels),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """A block that adds its input back to its output; `zero_init_residual` zeroes its closing norm."""

    def residual_norm(self) -> nn.BatchNorm2d | None:
        """The norm layer ending the residual branch, or None when this block has no identity path."""
        raise NotImplementedError


class ZooModel(nn.Module):
    """A classifier run as named stage groups: stem, body stages, head.

    `stage_groups()` lists submodule names (resolvable with `get_submodule`, so dotted paths such as
    "features.3" are allowed) in forward order; forward is exactly "run every group in order". When
    `activation_checkpointing` is set and the model is training, each body stage is recomputed in
    backward instead of storing its activations. Outputs and gradients are unchanged; BatchNorm running
    statistics get one extra update per stage from the recomputation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.activation_checkpointing = False
        self._stage_groups: list[list[str]] = []

    def stage_groups(self) -> list[list[str]]:
        """Submodule names grouped as [stem, *body stages, head]."""
        return [list(group) for group in self._stage_groups]

    def _run(self, names: list[str], x: Tensor) -> Tensor:
        for name in names:
            x = self.get_submodule(name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        stem, *body, head = self._stage_groups
        x = self._run(stem, x)
        for names in body:
            if self.activation_checkpointing and self.training:
                x = checkpoint(self._run, names, x, use_reentrant=False)
            else:
                x = self._run(names, x)
        return self._run(head, x)


def init_weights(
    model: nn.Module,
    init_linear: Callable[[nn.Linear], None] | None = None,
    zero_init_residual: bool = False,
) -> None:
    """He init for convs, BN to identity, linears by the family's rule (None keeps PyTorch's default)."""
    if any(p.is_meta for p in model.parameters()):
        # Shapes only (config checks, MAC counts): meta tensors hold no values, and torch routes their normal_
        # through its Python references, whose first use imports dynamo (1.5 s on every CLI start).
        return
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and init_linear is not None:
            init_linear(module)
    if zero_init_residual:
        # A second pass, after the norms' init: each residual block then starts as the identity (Goyal et al., 2017).
        for module in model.modules():
            norm = module.residual_norm() if isinstance(module, ResidualBlock) else None
            if norm is not None:
                nn.init.zeros_(norm.weight)


def stem_geometry(stem: str, imagenet_kernel: int) -> tuple[int, int]:
    """(kernel, stride) of the first conv: the family's strided conv for ImageNet, 3x3 stride 1 for 32x32 CIFAR."""
    return (3, 1) if stem == "cifar" else (imagenet_kernel, 2)
