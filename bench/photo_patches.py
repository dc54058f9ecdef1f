"""Write a real-image class-folder dataset from the photographs that ship inside scikit-learn and matplotlib.

Nothing suitable downloads here, so the images are crops of three real photographs (scikit-learn's china.jpg and
flower.jpg, matplotlib's grace_hopper.jpg). Each photograph is cut into a 2x2 grid and each cell is one class (12
classes): a sample is a random square window of the cell (random size and place, a random horizontal flip, a small
brightness change), resized to the output size. Neighbouring cells share sky, petals or uniform, so the task is not
trivial, and unlike digits or shapes the pixels are real camera statistics.

    python bench/photo_patches.py data/photo-patches --per-class 840 --size 28
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

GRID = 2  # cells per side of each photograph
WINDOW = (0.25, 0.6)  # window side as a fraction of the cell's shorter side
BRIGHTNESS = (0.85, 1.15)


def photographs() -> dict[str, Image.Image]:
    import matplotlib.cbook
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    paths = {
        "china": images / "china.jpg",
        "flower": images / "flower.jpg",
        "hopper": Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)),
    }
    return {name: Image.open(path).convert("RGB") for name, path in paths.items()}


def cells(photo: Image.Image) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each grid cell, row by row."""
    w, h = photo.size
    return [
        (col * w // GRID, row * h // GRID, (col + 1) * w // GRID, (row + 1) * h // GRID)
        for row in range(GRID)
        for col in range(GRID)
    ]


def crop(photo: Image.Image, cell: tuple[int, int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    left, top, right, bottom = cell
    side = int(rng.uniform(*WINDOW) * min(right - left, bottom - top))
    x, y = int(rng.integers(left, right - side + 1)), int(rng.integers(top, bottom - side + 1))
    patch = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BOX)
    if rng.random() < 0.5:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageEnhance.Brightness(patch).enhance(rng.uniform(*BRIGHTNESS))


def write(out: Path, per_class: int, size: int, seed: int = 0) -> int:
    """Write the dataset into `out` (replaced whole, through a temporary folder); returns the number of images."""
    makers = {
        f"{name}-{i}": (lambda rng, photo=photo, cell=cell: crop(photo, cell, size, rng))
        for name, photo in photographs().items()
        for i, cell in enumerate(cells(photo))
    }
    return write_classes(out, makers, per_class, seed)


def write_classes(out: Path, makers: dict[str, Callable[[np.random.Generator], Image.Image]], per_class: int,
                  seed: int) -> int:  # fmt: skip
    """`per_class` images from each class's maker, one rng for all, into out/<class>/NNNNN.png; `out` is replaced
    whole through a temporary folder, so a crash never leaves half a dataset. Returns the number of images."""
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, make in makers.items():
        folder = tmp / name
        folder.mkdir(parents=True)
        for k in range(per_class):
            make(rng).save(folder / f"{k:05d}.png")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return per_class * len(makers)


def dataset_main(write: Callable[..., int], doc: str, per_class: int) -> None:
    """The command line of a dataset script: out folder, --per-class, --size, --seed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=per_class)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{write(args.out, args.per_class, args.size, args.seed)} images in {args.out}")


if __name__ == "__main__":
    dataset_main(write, __doc__, per_class=840)
