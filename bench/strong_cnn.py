"""The strong plain CNN a practitioner writes in a few lines (issue 20): three conv-BN-ReLU-maxpool blocks (32, 64, 128
channels), global pooling, a linear layer. bench/imagefolder_benchmark.py trains it with a plain loop (the baseline)
and hands the same factory to deploykit as a user's own model (`model: {factory: bench/strong_cnn.py:build}`)."""

from torch import nn


def build(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(in_channels, 32), block(32, 64), block(64, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes),
    )  # fmt: skip
