"""Your own images: one sub-folder per class under data.root, PNG or JPEG files, read lazily with PIL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from deploykit.data.config import DataConfig
from deploykit.errors import DeploykitError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_FIX = "set data.root to a directory with one sub-folder of images per class"


CACHE_BYTES = 512 * 2**20  # a split whose decoded pixels fit in this is decoded once and kept in memory


class FileImages:
    """Image files decoded on access to uint8 [C, size, size] (mode 'L' or 'RGB', bilinear resize); kept after
    their first decode when the whole set fits in CACHE_BYTES (10,000 RGB images of 28x28 take 24 MB), so later
    epochs index memory instead of decoding files again."""

    def __init__(self, paths: list[Path], mode: str, size: int) -> None:
        self.paths, self.mode, self.size = paths, mode, size
        fits = len(paths) * len(mode) * size * size <= CACHE_BYTES
        self._decoded: list[Tensor | None] | None = [None] * len(paths) if fits else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        if self._decoded is None:
            return self._decode(index)
        if self._decoded[index] is None:
            self._decoded[index] = self._decode(index)
        return self._decoded[index]

    def _decode(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img.draft(self.mode, (self.size, self.size))  # JPEG: decode big photos at a reduced scale, much faster
                img = img.convert(self.mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
        except (OSError, ValueError, Image.DecompressionBombError):
            raise DeploykitError(f"Image '{path}' is unreadable or corrupt: replace or delete the file.") from None
        pixels = torch.from_numpy(np.array(img))
        return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(root: Path) -> list[Path]:
    if not root.exists():
        raise DeploykitError(f"Dataset folder '{root}' does not exist: {_FIX}.")
    if not root.is_dir():
        raise DeploykitError(f"Dataset folder '{root}' is a file, not a directory: {_FIX}.")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if len(folders) < 2:
        raise DeploykitError(
            f"Dataset folder '{root}' has {len(folders)} class sub-folder(s) but needs at least 2: {_FIX}."
        )
    return folders


def _images_in(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DeploykitError(
            f"Class folder '{folder}' has no .png, .jpg or .jpeg images: add images to it or remove the folder."
        )
    return files


def load(cfg: DataConfig) -> tuple[FileImages, Tensor, list[str]]:
    """Lazy images, int64 labels and class names (the sorted sub-folder names) of cfg.root."""
    if cfg.root is None:
        raise DeploykitError(f"The imagefolder dataset needs a folder: {_FIX}.")
    folders = _class_folders(cfg.root.expanduser())
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = _images_in(folder)
        paths += files
        labels += [label] * len(files)
    images = FileImages(paths, "L" if cfg.channels == 1 else "RGB", cfg.image_size)
    return images, torch.tensor(labels, dtype=torch.long), [folder.name for folder in folders]
