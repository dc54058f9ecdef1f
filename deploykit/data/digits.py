"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped with scikit-learn so it works offline."""

from __future__ import annotations

import torch
from torch import Tensor

from deploykit.data.config import DataConfig
from deploykit.data.transforms import resize


def load(cfg: DataConfig) -> tuple[Tensor, Tensor, list[str]]:
    """All digits as float [N, channels, size, size] in [0, 1], int64 labels and class names '0'..'9'."""
    from sklearn.datasets import load_digits  # 1 s of imports that only this dataset needs

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16).unsqueeze(1)  # pixel values are 0..16
    images = resize(images, cfg.image_size).clamp_(0, 1)
    # expand is a view: three identical channels cost no extra memory.
    images = images.expand(-1, cfg.channels, -1, -1)
    return images, torch.from_numpy(digits.target).long(), [str(name) for name in digits.target_names]
