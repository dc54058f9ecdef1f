"""Your own datasets: `factory: my_data.py:build` returns (train, val), two Datasets of (input, target) pairs.

Inputs are tensors (or numpy arrays) of any shape, channels first; targets are class indices (ints) or tensors.
deploykit normalises the inputs (see data.normalize) but never augments them: a user's Dataset augments itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from deploykit.data.config import DataConfig
from deploykit.data.transforms import Normalize, to_float
from deploykit.errors import DeploykitError
from deploykit.usercode import describe_ref, load_callable


@dataclass
class UserData:
    """The factory's two splits and what their first items say about every item."""

    train: Sequence[Any]
    val: Sequence[Any]
    input_shape: tuple[int, ...]
    classes: bool  # targets are class indices, else tensors
    num_classes: int | None
    class_names: list[str]


def as_input(x: Any) -> Tensor | None:
    """A tensor for a sample's input (numpy converted, uint8 kept for scaling), or None if it is neither."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            return None
        x = torch.from_numpy(x if x.flags.writeable else x.copy())  # from_numpy warns on read-only arrays
    return x if isinstance(x, Tensor) and x.ndim >= 1 else None


def is_class_index(y: Any) -> bool:
    """An int, a numpy integer, or a 0-d integer tensor/array; bool is not a class index."""
    if isinstance(y, Tensor):
        return y.ndim == 0 and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    if isinstance(y, np.ndarray):
        return y.ndim == 0 and y.dtype.kind in "iu"
    return isinstance(y, (int, np.integer)) and not isinstance(y, bool)


def as_target(y: Any, classes: bool) -> int | Tensor:
    """A class index as int, anything else as a tensor (float64 narrowed to float32, the model's precision)."""
    if classes:
        return int(y)
    t = torch.from_numpy(y if y.flags.writeable else y.copy()) if isinstance(y, np.ndarray) else torch.as_tensor(y)
    return t.float() if t.is_floating_point() or t.dtype == torch.bool else t


class UserSplit(Dataset):
    """A split from the factory, as deploykit's own splits look: normalised float32 inputs, `.item(i, augment)`."""

    def __init__(self, dataset: Sequence[Any], normalize: Normalize, classes: bool, name: str) -> None:
        self.dataset, self.normalize, self.classes, self.name = dataset, normalize, classes, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor]:
        return self.item(index, augment=True)

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the user's dataset if it draws per-epoch augmentations itself."""
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)

    def raw_input(self, index: int) -> Tensor:
        """Sample `index`'s input before normalisation (for the training split's statistics)."""
        return self._pair(index)[0]

    def item(self, index: int, augment: bool) -> tuple[Tensor, int | Tensor]:
        """Sample `index` normalised; `augment` is ignored, as deploykit never augments a user's dataset."""
        x, y = self._pair(index)
        return self.normalize(to_float(x)).contiguous(), as_target(y, self.classes)

    def _pair(self, index: int) -> tuple[Tensor, Any]:
        item = self.dataset[index]
        x = as_input(item[0]) if isinstance(item, (tuple, list)) and len(item) == 2 else None
        if x is None:
            raise DeploykitError(f"Item {index} of the {self.name} {_describe_item(item)}.")
        return x, item[1]


class Inputs(Sequence[Tensor]):
    """A split's raw inputs as a sequence, for `channel_stats`."""

    def __init__(self, split: UserSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        return self.split.raw_input(index)


def _kind(value: Any) -> str:
    """'a 3-item list', 'a Tensor': what came back, for messages."""
    if isinstance(value, (tuple, list)):
        return f"a {len(value)}-item {type(value).__name__}"
    return f"a {type(value).__name__}"


def _describe_item(item: Any) -> str:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        return f"is {_kind(item)}, not an (input, target) pair: make __getitem__ return (input, target)"
    return (f"has an input of type {type(item[0]).__name__}, not a tensor or numeric numpy array with at least one "
            "dimension: return inputs as tensors, channels first")


def _first(split: Sequence[Any], name: str, label: str) -> tuple[Tensor, Any]:
    if not hasattr(split, "__len__") or not hasattr(split, "__getitem__"):
        raise DeploykitError(
            f"The data factory {label} returned a {type(split).__name__} as its {name} split, not a Dataset or "
            "sequence: return (train, val), two Datasets with __len__ and __getitem__."
        )
    if len(split) == 0:
        raise DeploykitError(f"The data factory {label} returned an empty {name} split: give each split samples.")
    item = split[0]
    x = as_input(item[0]) if isinstance(item, (tuple, list)) and len(item) == 2 else None
    if x is None:
        raise DeploykitError(f"Item 0 of the {name} split of the data factory {label} {_describe_item(item)}.")
    return x, item[1]


def _class_count(split: Sequence[Any], label: str, name: str) -> int:
    """1 + the largest class index of a split: from its tensors where it shows them, else by reading every item."""
    if isinstance(split, TensorDataset):
        targets = split.tensors[-1]
    elif isinstance(getattr(split, "targets", None), (Tensor, np.ndarray, list)):  # torchvision's convention
        targets = torch.as_tensor(np.asarray(split.targets))
    else:
        targets = torch.tensor([int(split[k][1]) for k in range(len(split))])
    if targets.numel() == 0 or targets.ndim != 1 or targets.is_floating_point():
        raise DeploykitError(f"The {name} split of the data factory {label} has no 1-D integer class indices as "
                             "targets: return int targets, or tensors for other tasks.")
    if int(targets.min()) < 0:
        raise DeploykitError(f"The {name} split of the data factory {label} has negative class indices: "
                             "number the classes from 0.")
    return int(targets.max()) + 1


def load(cfg: DataConfig) -> UserData:
    """Call the factory with cfg.kwargs and check its answer through the first item of each split."""
    assert cfg.factory is not None  # DataConfig requires it for this dataset
    label = describe_ref(cfg.factory)
    factory = load_callable(cfg.factory, "data.factory")
    try:
        result = factory(**cfg.kwargs)
    except Exception as exc:  # the user's code: name it, not a traceback into deploykit
        raise DeploykitError(
            f"The data factory {label} raised {type(exc).__name__}: {exc}; fix it (or data.kwargs), then run again."
        ) from exc
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise DeploykitError(
            f"The data factory {label} returned {_kind(result)}, not a (train, val) pair: return two Datasets."
        )
    train, val = result
    (x, y), (xv, yv) = _first(train, "train", label), _first(val, "val", label)
    if x.shape != xv.shape:
        raise DeploykitError(
            f"The data factory {label} gives train inputs of shape {tuple(x.shape)} but val inputs of shape "
            f"{tuple(xv.shape)}: give both splits the same input shape."
        )
    classes = is_class_index(y)
    if classes != is_class_index(yv):
        raise DeploykitError(
            f"The data factory {label} gives train targets of type {type(y).__name__} but val targets of type "
            f"{type(yv).__name__}: give both splits class indices, or both tensors."
        )
    num_classes, names = None, []
    if classes:
        given = getattr(train, "classes", None)
        counted = max(_class_count(train, label, "train"), _class_count(val, label, "val"))
        names = [str(c) for c in given] if isinstance(given, (list, tuple)) and len(given) >= counted else []
        num_classes = len(names) or counted
        names = names or [str(k) for k in range(num_classes)]
    return UserData(train, val, tuple(x.shape), classes, num_classes, names)
