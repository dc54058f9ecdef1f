"""Datasets (digits, shapes, imagefolder, synthetic, your arrays or your Python factory), loaders and augmentations
behind one `build_datasets` call.

Built-in datasets give [C, S, S] images with class indices. Arrays and factories give any per-sample input shape
(channels first) and either class indices or a tensor per sample as targets; a DataBundle says which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deploykit.data import arrays, digits, factory, imagefolder, shapes, synthetic
from deploykit.data.config import DataConfig, NormalizeStats
from deploykit.data.transforms import Augment, Normalize, channel_stats, mixup_batch, to_float
from deploykit.errors import DeploykitError
from deploykit.usercode import describe_ref

__all__ = ["DataBundle", "build_datasets", "clean_subset", "make_loader", "mixup_batch", "plain_item", "sample_batch"]

# Each loader returns (images, labels, class_names); images[i] is a [C, H, W] uint8 or float tensor, either
# precomputed (a Tensor) or decoded/generated on access.
_LOADERS: dict[str, Callable[[DataConfig], tuple[Sequence[Tensor], Tensor, list[str]]]] = {
    "digits": digits.load,
    "shapes": shapes.load,
    "imagefolder": imagefolder.load,
    "synthetic": synthetic.load,
}
_MAX_STATS_SAMPLES = 512  # lazily decoded datasets estimate mean/std from at most this many training images


@dataclass
class DataBundle:
    """Train and validation datasets plus what a model and an exporter need to know about them.

    Items are (input, target): input a float32 tensor of `input_shape`; target an int class index when
    targets == "classes", else a tensor ("tensor": masks, boxes, regression values).
    """

    train: Dataset
    val: Dataset
    num_classes: int | None  # None when the targets are not class indices
    in_channels: int  # dim 0 of a sample
    image_size: int | None  # the side of square [C, S, S] inputs, else None
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, ...] = ()  # one sample's shape, channels first; () means (in_channels, S, S)
    targets: Literal["classes", "tensor"] = "classes"
    normalization: str = "given mean/std"  # what mean/std are, in words, for the report
    task: Any = None  # filled in by whoever knows the task (classification, segmentation, ...)

    def __post_init__(self) -> None:
        if not self.input_shape:
            if self.image_size is None:
                raise ValueError("DataBundle needs input_shape when image_size is None")
            self.input_shape = (self.in_channels, self.image_size, self.image_size)
        self.input_shape = tuple(int(d) for d in self.input_shape)

    def preprocessing(self) -> dict[str, Any]:
        """What a client must do to a raw input before the model sees it: recorded beside every model, written into
        the served model's README and shown in the report, since a model trained elsewhere expects its own."""
        return {
            "input": f"float32 [N, {', '.join(str(d) for d in self.input_shape)}] (channels first)",
            "uint8": "divided by 255 first",
            "normalization": self.normalization,
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            "formula": "x = (x - mean[c]) / std[c] per channel c",
        }


class _Split(Dataset):
    """One split of an in-memory or lazily read dataset: normalised float32 inputs, optionally augmented, with
    int class indices (classes=True) or per-sample target tensors."""

    def __init__(
        self,
        images: Sequence[Tensor],
        labels: Tensor,
        indices: Tensor,
        normalize: Normalize,
        augment: Augment | None,
        classes: bool = True,
    ) -> None:
        self.images, self.indices, self.normalize, self.augment = images, indices, normalize, augment
        self.labels, self.classes = labels, classes
        # Class indices are small: keep this split's own copy (tests and samplers read it). Tensor targets
        # (masks) are indexed on access instead, not copied.
        self.targets = labels[indices] if classes else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor]:
        return self.item(index, augment=True)

    def set_epoch(self, epoch: int) -> None:
        """Training augmentations are drawn per (seed, epoch, sample): call this at the start of each epoch."""
        if self.augment is not None:
            self.augment.set_epoch(epoch)

    def item(self, index: int, augment: bool) -> tuple[Tensor, int | Tensor]:
        """Sample `index`; augment=False gives the plain normalised image even on the training split."""
        source = int(self.indices[index])
        image = to_float(self.images[source])
        if augment and self.augment is not None:
            image = self.augment(image, self.normalize, source)
        else:
            image = self.normalize(image)
        target = int(self.targets[index]) if self.classes else self.labels[source]
        return image.contiguous(), target


def _stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded per-class split; a class with at least 2 samples keeps at least one in each split."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_val = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    # Shuffle across classes so that "the first n" of a split is a mix of classes (see sample_batch).
    train_idx, val_idx = torch.cat(train), torch.cat(val)
    return train_idx[torch.randperm(len(train_idx), generator=g)], val_idx[torch.randperm(len(val_idx), generator=g)]


def _random_split(count: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split for targets that are not classes; both splits keep at least one sample."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(round(count * val_fraction), 1), count - 1)
    return order[n_val:], order[:n_val]


def _normalization(
    cfg: DataConfig, images: Sequence[Tensor], train_idx: Sequence[int], shape: tuple[int, ...], lazy: bool
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, what they are) per channel (dim 0 of a sample) as data.normalize asks."""
    channels = shape[0]
    if isinstance(cfg.normalize, NormalizeStats):
        if len(cfg.normalize.mean) != channels:
            raise DeploykitError(
                f"data.normalize gives {len(cfg.normalize.mean)} mean/std values but the {cfg.dataset} inputs have "
                f"{channels} channel(s) (dim 0 of shape {shape}): give one value per channel."
            )
        return tuple(cfg.normalize.mean), tuple(cfg.normalize.std), "given mean/std"
    if cfg.normalize:
        mean, std = channel_stats(images, train_idx, _MAX_STATS_SAMPLES if lazy else None)
        return mean, std, "train-split mean/std"
    return (0.0,) * channels, (1.0,) * channels, "none (uint8 scaled to [0, 1])"


def _check_augment(cfg: DataConfig, shape: tuple[int, ...], classes: bool) -> None:
    """Crop, flip and CutOut need [C, H, W] images whose targets do not move with them; MixUp needs classes."""
    spatial = cfg.augment.spatial()
    if spatial and (len(shape) != 3 or not classes):
        what = f"inputs of shape {shape}" if len(shape) != 3 else "tensor targets (they would not move with the image)"
        raise DeploykitError(
            f"data.augment sets {', '.join(spatial)}, which {'needs' if len(spatial) == 1 else 'need'} [C, H, W] "
            f"images with class-index targets, but the {cfg.dataset} data has {what}: "
            f"turn {'it' if len(spatial) == 1 else 'them'} off."
        )
    if cfg.augment.mixup_alpha > 0 and not classes:
        raise DeploykitError(
            f"data.augment.mixup_alpha needs class-index targets, but the {cfg.dataset} data has tensor targets: "
            "set mixup_alpha to 0."
        )


def _image_size(shape: tuple[int, ...]) -> int | None:
    return shape[1] if len(shape) == 3 and shape[1] == shape[2] else None


def build_datasets(cfg: DataConfig) -> DataBundle:
    """Load, split, normalise and (train split only) augment the dataset that `cfg` names."""
    if cfg.dataset == "arrays":
        return _build_arrays(cfg)
    if cfg.dataset == "python":
        return _build_python(cfg)
    images, labels, class_names = _LOADERS[cfg.dataset](cfg)
    train_idx, val_idx = _stratified_split(labels, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        raise DeploykitError(
            f"The {cfg.dataset} dataset has too few samples per class for a validation split: "
            "add samples (at least 2 per class) or use fewer classes."
        )
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    lazy = not isinstance(images, Tensor)
    mean, std, normalization = _normalization(cfg, images, train_idx.tolist(), shape, lazy)
    normalize = Normalize(mean, std)
    return DataBundle(
        train=_Split(images, labels, train_idx, normalize, Augment(cfg.augment, cfg.seed)),
        val=_Split(images, labels, val_idx, normalize, augment=None),
        num_classes=len(class_names),
        in_channels=cfg.channels,
        image_size=cfg.image_size,
        class_names=class_names,
        mean=mean,
        std=std,
        input_shape=shape,
        normalization=normalization,
    )


def _build_arrays(cfg: DataConfig) -> DataBundle:
    """The .npz file's splits, or its x and y split here (stratified for class indices, else at random)."""
    data = arrays.load(cfg)
    x, y = data.train
    if data.val is None:
        if data.classes:
            train_idx, val_idx = _stratified_split(y, cfg.val_fraction, cfg.seed)
        else:
            train_idx, val_idx = _random_split(len(x), cfg.val_fraction, cfg.seed)
        if len(val_idx) == 0:
            raise DeploykitError(
                f"The arrays file {cfg.root} has too few samples for a validation split: add samples (at least 2, "
                "and 2 per class for class indices) or save x_train, y_train, x_val and y_val."
            )
        xv, yv = x, y
    else:
        xv, yv = data.val
        train_idx, val_idx = torch.arange(len(x)), torch.arange(len(xv))
    shape = tuple(x.shape[1:])
    _check_augment(cfg, shape, data.classes)
    mean, std, normalization = _normalization(cfg, x, train_idx.tolist(), shape, lazy=False)
    normalize = Normalize(mean, std)
    augment = Augment(cfg.augment, cfg.seed) if cfg.augment.spatial() else None
    return DataBundle(
        train=_Split(x, y, train_idx, normalize, augment, classes=data.classes),
        val=_Split(xv, yv, val_idx, normalize, augment=None, classes=data.classes),
        num_classes=len(data.class_names) if data.classes else None,
        in_channels=shape[0],
        image_size=_image_size(shape),
        class_names=data.class_names,
        mean=mean,
        std=std,
        input_shape=shape,
        targets="classes" if data.classes else "tensor",
        normalization=normalization,
    )


def _build_python(cfg: DataConfig) -> DataBundle:
    """The factory's (train, val), wrapped to normalise their inputs; never augmented here."""
    data = factory.load(cfg)
    _check_augment(cfg, data.input_shape, data.classes)
    label = f"data factory {describe_ref(cfg.factory or '')}"
    # The statistics read the raw inputs, so the training split gets its Normalize once they are known.
    train = factory.UserSplit(data.train, Normalize([0.0], [1.0]), data.classes, f"train split of the {label}")
    mean, std, normalization = _normalization(
        cfg, factory.Inputs(train), list(range(len(train))), data.input_shape, lazy=True
    )
    normalize = Normalize(mean, std)
    train.normalize = normalize
    return DataBundle(
        train=train,
        val=factory.UserSplit(data.val, normalize, data.classes, f"val split of the {label}"),
        num_classes=data.num_classes,
        in_channels=data.input_shape[0],
        image_size=_image_size(data.input_shape),
        class_names=data.class_names,
        mean=mean,
        std=std,
        input_shape=data.input_shape,
        targets="classes" if data.classes else "tensor",
        normalization=normalization,
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = False,
    num_workers: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DataLoader:
    """A DataLoader whose order is fixed by `seed`.

    With distributed=True each process reads its own shard through a DistributedSampler (num_replicas and rank
    default to the process group's); call `loader.sampler.set_epoch(epoch)` every epoch to reshuffle.
    Memory is pinned when CUDA is available, for faster host-to-device copies.
    """
    generator = torch.Generator().manual_seed(seed)  # drives shuffling and the workers' seeds
    sampler = (
        DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        if distributed
        else None
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


def plain_item(dataset: Dataset, index: int, augment: bool) -> tuple[Tensor, Any]:
    """Sample `index` of `dataset` as (x, y) without extra items; augment=False skips the augmentation of
    deploykit's splits (any other dataset is read as it is)."""
    item = getattr(dataset, "item", None)
    x, y, *_ = item(index, augment) if item else dataset[index]
    return x, y


class _Clean(Dataset):
    """The first `n` samples of a dataset as (x, y), never augmented and without extra items."""

    def __init__(self, dataset: Dataset, n: int) -> None:
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        return plain_item(self.dataset, index, augment=False)


def clean_subset(dataset: Dataset, n: int) -> Dataset:
    """The first n samples of `dataset` as evaluation sees them: no augmentation, (x, y) only."""
    return _Clean(dataset, n)


def sample_batch(bundle: DataBundle, n: int, split: str = "val") -> tuple[Tensor, Tensor]:
    """The first n (or all, if fewer) samples of a split, normalised but never augmented, stacked as (x, y):
    y is int64 [n] for class indices, the targets stacked for tensor targets."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    dataset = bundle.train if split == "train" else bundle.val
    items = [dataset.item(k, augment=False) for k in range(min(n, len(dataset)))]
    xs, ys = [x for x, _ in items], [y for _, y in items]
    if isinstance(ys[0], Tensor) and (ys[0].ndim > 0 or ys[0].is_floating_point()):
        return torch.stack(xs), torch.stack(ys)
    return torch.stack(xs), torch.tensor([int(y) for y in ys], dtype=torch.long)
