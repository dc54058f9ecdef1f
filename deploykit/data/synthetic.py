"""Random-noise images with random labels, for latency and throughput measurements only.

There is nothing to learn here: accuracy on this dataset is meaningless (chance level at best).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deploykit.data.config import DataConfig


class NoiseImages:
    """N(0, 1) images generated on access, item i from its own seed, so memory does not grow with image_size."""

    def __init__(self, count: int, channels: int, size: int, base_seed: int) -> None:
        self.count, self.shape, self.base_seed = count, (channels, size, size), base_seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(self.base_seed + index))


def load(cfg: DataConfig) -> tuple[NoiseImages, Tensor, list[str]]:
    """cfg.num_samples noise images with uniformly random labels in range(cfg.num_classes), seeded by cfg.seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    labels = torch.randint(0, cfg.num_classes, (cfg.num_samples,), generator=g)
    base_seed = int(torch.randint(0, 2**62, (1,), generator=g))
    images = NoiseImages(cfg.num_samples, cfg.channels, cfg.image_size, base_seed)
    return images, labels, [f"class_{k}" for k in range(cfg.num_classes)]
