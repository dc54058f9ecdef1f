"""Datasets (digits, shapes, imagefolder, synthetic), loaders and augmentations behind one `build_datasets` call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deploykit.data import digits, imagefolder, shapes, synthetic
from deploykit.data.config import DataConfig
from deploykit.data.transforms import Augment, Normalize, channel_stats, mixup_batch, to_float
from deploykit.errors import DeploykitError

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
    """Train and validation datasets plus what a model and an exporter need to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One sample's shape, channels first."""
        return (self.in_channels, self.image_size, self.image_size)


class _Split(Dataset):
    """One split of a dataset: normalised float32 images with int labels, optionally augmented."""

    def __init__(
        self, images: Sequence[Tensor], labels: Tensor, indices: Tensor, normalize: Normalize, augment: Augment | None
    ) -> None:
        self.images, self.indices, self.normalize, self.augment = images, indices, normalize, augment
        self.targets = labels[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.item(index, augment=True)

    def set_epoch(self, epoch: int) -> None:
        """Training augmentations are drawn per (seed, epoch, sample): call this at the start of each epoch."""
        if self.augment is not None:
            self.augment.set_epoch(epoch)

    def item(self, index: int, augment: bool) -> tuple[Tensor, int]:
        """Sample `index`; augment=False gives the plain normalised image even on the training split."""
        image = to_float(self.images[int(self.indices[index])])
        if augment and self.augment is not None:
            image = self.augment(image, self.normalize, int(self.indices[index]))
        else:
            image = self.normalize(image)
        return image.contiguous(), int(self.targets[index])


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


def build_datasets(cfg: DataConfig) -> DataBundle:
    """Load, split, normalise and (train split only) augment the dataset that `cfg` names."""
    images, labels, class_names = _LOADERS[cfg.dataset](cfg)
    train_idx, val_idx = _stratified_split(labels, cfg.val_fraction, cfg.seed)
    if len(val_idx) == 0:
        raise DeploykitError(
            f"The {cfg.dataset} dataset has too few samples per class for a validation split: "
            "add samples (at least 2 per class) or use fewer classes."
        )
    if cfg.normalize:
        lazy = not isinstance(images, Tensor)
        mean, std = channel_stats(images, train_idx.tolist(), _MAX_STATS_SAMPLES if lazy else None)
    else:
        mean, std = (0.0,) * cfg.channels, (1.0,) * cfg.channels
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


def plain_item(dataset: Dataset, index: int, augment: bool) -> tuple[Tensor, int]:
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

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return plain_item(self.dataset, index, augment=False)


def clean_subset(dataset: Dataset, n: int) -> Dataset:
    """The first n samples of `dataset` as evaluation sees them: no augmentation, (x, y) only."""
    return _Clean(dataset, n)


def sample_batch(bundle: DataBundle, n: int, split: str = "val") -> tuple[Tensor, Tensor]:
    """The first n (or all, if fewer) samples of a split, normalised but never augmented, stacked as (x, y)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    dataset = bundle.train if split == "train" else bundle.val
    items = [dataset.item(k, augment=False) for k in range(min(n, len(dataset)))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)
