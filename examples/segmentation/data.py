"""Generated images with per-pixel masks: discs and squares on a noisy, shaded background (3 classes).

deploykit reads them through `build` (data: {dataset: python, factory: data.py:build}): it returns the
(train, val) datasets of (image [3, H, W] float, mask [H, W] int64) pairs, as a user's own data factory would.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

BACKGROUND, DISC, SQUARE = 0, 1, 2


def _scene(size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    gradient = torch.rand(3, 1, 1, generator=g) * (xx + yy).float() / (2 * size)
    image = 0.3 * gradient + 0.15 * torch.rand(3, 1, 1, generator=g)
    mask = torch.zeros(size, size, dtype=torch.int64)
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        kind = DISC if torch.rand(1, generator=g) < 0.5 else SQUARE
        r = int(torch.randint(size // 10, size // 4, (1,), generator=g))
        cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=g))
        if kind == DISC:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            inside = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        colour = 0.4 + 0.6 * torch.rand(3, 1, 1, generator=g)
        image = torch.where(inside, colour, image)
        mask[inside] = kind
    image = image + 0.08 * torch.randn(image.shape, generator=g)
    return image.clamp(0, 1), mask


def build(samples: int = 600, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    images, masks = zip(*(_scene(size, g) for _ in range(samples)))
    x, y = torch.stack(images), torch.stack(masks)
    n_val = int(samples * val_fraction)
    return TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val])
