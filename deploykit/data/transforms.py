"""Image transforms: resize, normalisation, training augmentations (crop, flip, CutOut) and batch-level MixUp.

Per-item images are [C, H, W] tensors: uint8 sources hold [0, 255], float sources are used as they are.
Normalisation and its statistics take any per-sample shape whose dim 0 is the channel ([C], [C, L], [C, D, H, W]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deploykit.data.config import AugmentConfig


def to_float(image: Tensor) -> Tensor:
    """An image as float32; uint8 images are scaled to [0, 1]."""
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    return image.float()


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of a [N, C, H, W] float batch to size x size (antialiased when shrinking)."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def channel_stats(
    images: Sequence[Tensor], indices: Sequence[int], max_samples: int | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (dim 0) mean and std over images[indices]; with max_samples, over an evenly spaced subset."""
    if max_samples is not None and len(indices) > max_samples:
        indices = [indices[k] for k in np.linspace(0, len(indices) - 1, max_samples).round().astype(int)]
    total = squares = None
    pixels = 0
    for i in indices:
        # float64 sums: float32 loses digits over millions of pixels.
        x = to_float(images[i]).double()
        x = x.unsqueeze(-1) if x.ndim == 1 else x  # [C] samples: one value per channel (sum(dim=()) sums all)
        dims = tuple(range(1, x.ndim))
        s, q = x.sum(dim=dims), x.square().sum(dim=dims)
        total, squares = (s, q) if total is None else (total + s, squares + q)
        pixels += x[0].numel()
    mean = total / pixels
    std = (squares / pixels - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # a constant channel must not divide by zero
    return tuple(mean.tolist()), tuple(std.tolist())


class Normalize:
    """(x - mean) / std per channel (dim 0 of a sample of any rank); always returns a new tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __call__(self, image: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (image.ndim - 1)
        return (image - self.mean.view(shape)) / self.std.view(shape)


def random_crop(image: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by `padding` on every side, then crop back to the original size at a random offset (after
    normalisation, so the padding is the mean colour)."""
    if padding == 0:
        return image
    _, h, w = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    return padded[:, top : top + h, left : left + w]


def random_hflip(image: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror left-right with probability 0.5."""
    return image.flip(-1) if torch.rand(1, generator=generator).item() < 0.5 else image


def cutout(image: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Zero a size x size square centred anywhere in the image, clipped at the borders (returns a copy)."""
    _, h, w = image.shape
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    top, left = cy - size // 2, cx - size // 2
    out = image.clone()
    out[:, max(top, 0) : max(top + size, 0), max(left, 0) : max(left + size, 0)] = 0
    return out


class Augment:
    """Training augmentation in a fixed order: normalise, random crop, horizontal flip, CutOut.

    The crop's padding and CutOut's square are 0 in the model's input space: the mean colour, not black. Black
    borders are a sight validation images never show: on glyphs (bench/glyphs.py, coloured paper) padding with black
    cost 2-3 points of val top-1 against padding with the mean colour.
    The randomness of a sample is a function of (seed, epoch, sample index) alone, so DataLoader workers, DDP
    ranks and a run resumed from a checkpoint all draw the same augmentation for the same sample and epoch.
    """

    def __init__(self, cfg: AugmentConfig, seed: int) -> None:
        self.cfg, self.seed, self.epoch = cfg, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: Tensor, normalize: Normalize, index: int) -> Tensor:
        key = ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % (1 << 63)
        g = torch.Generator().manual_seed(key)
        image = normalize(image)
        if self.cfg.random_crop:
            image = random_crop(image, self.cfg.crop_padding, g)
        if self.cfg.hflip:
            image = random_hflip(image, g)
        if self.cfg.cutout_size > 0:
            image = cutout(image, self.cfg.cutout_size, g)
        return image


def mixup_batch(
    x: Tensor, y: Tensor, alpha: float, num_classes: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """MixUp: lam ~ Beta(alpha, alpha); returns lam*x + (1-lam)*x[perm] and the matching mixed one-hot targets.

    Targets are float32 [B, num_classes] and each row sums to 1. The generator (CPU) drives both lam and the
    permutation; without one the global torch RNG is used, so torch.manual_seed makes it reproducible.
    """
    if alpha <= 0:
        raise ValueError(f"mixup_batch needs alpha > 0 (got {alpha}); skip MixUp when augment.mixup_alpha is 0.")
    # torch's Beta sampler takes no generator, so lam comes from numpy seeded by the torch generator.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    targets = F.one_hot(y.long(), num_classes).float()
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]
