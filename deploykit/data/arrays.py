"""Your own arrays: an .npz file with x_train, y_train, x_val, y_val (or x and y, split by deploykit).

x holds one sample per row in any shape, channels first (or NHWC images with `layout: NHWC`); uint8 x is scaled
to [0, 1] on access. y holds 1-D integer class indices, or one tensor per sample (a mask, a box, a vector).
The file is read with allow_pickle=False: an .npz is data, never code.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from deploykit.data.config import DataConfig
from deploykit.errors import DeploykitError

SPLIT_NAMES = ("x_train", "y_train", "x_val", "y_val")
WHOLE_NAMES = ("x", "y")
# torch.from_numpy has no unsigned types above uint8: inputs become float32, integer targets int64.
_WIDE_UNSIGNED = (np.uint16, np.uint32, np.uint64)


@dataclass
class Arrays:
    """The file's samples: `val` is None when the file has x and y only (build_datasets splits them)."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor] | None
    classes: bool  # y holds class indices (1-D integers), else a tensor per sample
    class_names: list[str]


def _open(path: Path) -> np.lib.npyio.NpzFile:
    fix = "save the arrays with numpy.savez or numpy.savez_compressed and set data.root to that file"
    if not path.is_file():
        raise DeploykitError(f"The arrays file {path} does not exist: {fix}.")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise DeploykitError(f"The arrays file {path} is not an .npz archive: {fix}.") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # a bare .npy array
        raise DeploykitError(
            f"The arrays file {path} holds one .npy array, not an .npz archive of named arrays: {fix}."
        )
    return npz


def _read(npz: np.lib.npyio.NpzFile, name: str, path: Path) -> np.ndarray:
    try:
        array = npz[name]
    except ValueError:  # numpy refuses object arrays without allow_pickle
        raise DeploykitError(
            f"Array '{name}' in {path.name} holds Python objects, which deploykit never unpickles: save it as numbers."
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise DeploykitError(f"Array '{name}' in {path} is unreadable ({exc}): write the .npz file again.") from None
    if array.dtype.kind not in "biuf":
        raise DeploykitError(f"Array '{name}' in {path.name} has dtype {array.dtype}, not numbers: save it as numbers.")
    if array.ndim == 0 or len(array) == 0:
        raise DeploykitError(f"Array '{name}' in {path.name} has no samples (shape {array.shape}): save at least one.")
    return array


def _inputs(x: np.ndarray, name: str, cfg: DataConfig, path: Path) -> Tensor:
    """x as a [N, C, ...] tensor (uint8 kept, for the [0, 1] scaling on access)."""
    if x.ndim < 2:
        raise DeploykitError(
            f"Array '{name}' in {path.name} has shape {x.shape}: "
            "give every sample at least one axis, e.g. [N, C, H, W]."
        )
    if cfg.layout == "NHWC" and x.ndim != 4:
        raise DeploykitError(
            f"Array '{name}' in {path.name} has shape {x.shape}, but layout NHWC needs 4-D images [N, H, W, C]: "
            "set data.layout to NCHW for channels-first data."
        )
    if x.dtype.type in _WIDE_UNSIGNED:
        x = x.astype(np.float32)
    images = torch.from_numpy(x)
    return images.permute(0, 3, 1, 2) if cfg.layout == "NHWC" else images  # a view: item() makes it contiguous


def _targets(y: np.ndarray) -> tuple[Tensor, bool]:
    """y as int64 class indices (1-D integers) or a per-sample tensor (floats as float32, bool as float32)."""
    if y.dtype.kind in "iu" and y.ndim == 1:
        return torch.from_numpy(y.astype(np.int64)), True
    if y.dtype.kind == "f" or y.dtype.kind == "b":
        return torch.from_numpy(y.astype(np.float32)), False
    return torch.from_numpy(y.astype(np.int64) if y.dtype.type in _WIDE_UNSIGNED else y), False


def _pair(
    npz: np.lib.npyio.NpzFile, xname: str, yname: str, cfg: DataConfig, path: Path
) -> tuple[Tensor, Tensor, bool]:
    x, y = _read(npz, xname, path), _read(npz, yname, path)
    if len(x) != len(y):
        raise DeploykitError(
            f"Arrays '{xname}' ({len(x)} samples) and '{yname}' ({len(y)} samples) in {path.name} differ in length: "
            "give one target per input."
        )
    targets, classes = _targets(y)
    if classes and int(targets.min()) < 0:
        raise DeploykitError(
            f"Array '{yname}' in {path.name} holds negative class indices: number the classes from 0."
        )
    return _inputs(x, xname, cfg, path), targets, classes


def _class_names(npz: np.lib.npyio.NpzFile, count: int, path: Path) -> list[str]:
    if "class_names" not in npz.files:
        return [str(k) for k in range(count)]
    try:
        names = npz["class_names"]
    except ValueError:
        names = None
    if names is None or names.dtype.kind != "U" or names.ndim != 1 or len(names) < count:
        raise DeploykitError(
            f"Array 'class_names' in {path.name} must be a 1-D array of at least {count} strings (one per class "
            "index in y): save it as numpy.array(['cat', 'dog', ...]) or leave it out."
        )
    return [str(name) for name in names]


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def load(cfg: DataConfig) -> Arrays:
    """The arrays of cfg.root, checked: names, lengths, dtypes, and the same sample shape in train and val."""
    assert cfg.root is not None  # DataConfig requires it for this dataset
    path = cfg.root
    with _open(path) as npz:
        present = set(npz.files)
        if set(SPLIT_NAMES) <= present:
            x, y, classes = _pair(npz, "x_train", "y_train", cfg, path)
            xv, yv, classes_v = _pair(npz, "x_val", "y_val", cfg, path)
            if x.shape[1:] != xv.shape[1:]:
                raise DeploykitError(
                    f"Arrays 'x_train' and 'x_val' in {path.name} have samples of shape {tuple(x.shape[1:])} and "
                    f"{tuple(xv.shape[1:])}: give both splits the same sample shape."
                )
            if classes != classes_v or y.shape[1:] != yv.shape[1:]:
                raise DeploykitError(
                    f"Arrays 'y_train' (shape {tuple(y.shape)}, {_dtype(y)}) and 'y_val' (shape {tuple(yv.shape)}, "
                    f"{_dtype(yv)}) in {path.name} hold different kinds of targets: give both splits class indices, "
                    "or both tensors of one shape."
                )
            val: tuple[Tensor, Tensor] | None = (xv, yv)
        elif set(WHOLE_NAMES) <= present:
            x, y, classes = _pair(npz, "x", "y", cfg, path)
            val = None
        else:
            raise DeploykitError(
                f"The arrays file {path.name} has the arrays {', '.join(sorted(present)) or '(none)'} but needs "
                "x_train, y_train, x_val and y_val (or x and y): save the arrays under those names."
            )
        count = int(max(y.max(), val[1].max() if val else 0)) + 1 if classes else 0
        names = _class_names(npz, count, path) if classes else []
    return Arrays(train=(x, y), val=val, classes=classes, class_names=names)
