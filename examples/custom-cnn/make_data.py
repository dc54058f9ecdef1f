"""Write data.npz: your own image arrays, as deploykit's `dataset: arrays` reads them.

Here they are scikit-learn's handwritten digits (they ship offline), upscaled to 16x16, tinted with a random colour
per image and noised, stored as uint8 NHWC like most image arrays are: x_train, y_train, x_val, y_val.
Usage: python make_data.py [OUT.npz]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def make(out: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    digits = load_digits()
    grey = np.kron(digits.images / 16.0, np.ones((2, 2)))  # 8x8 -> 16x16
    tint = rng.uniform(0.4, 1.0, size=(len(grey), 1, 1, 3))
    images = grey[..., None] * tint + rng.normal(0, 0.08, size=(*grey.shape, 3))
    x = (np.clip(images, 0, 1) * 255).astype(np.uint8)  # [N, 16, 16, 3]
    y = digits.target.astype(np.int64)
    order = rng.permutation(len(x))
    val, train = order[:360], order[360:]
    np.savez_compressed(out, x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val])
    return out


if __name__ == "__main__":
    print(make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("data.npz")))
