"""deploykit.data: the four datasets, splits, normalisation, augmentations, MixUp and loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from deploykit.data import DataBundle, build_datasets, make_loader, mixup_batch, sample_batch
from deploykit.data.config import AugmentConfig, DataConfig
from deploykit.data.transforms import cutout, random_hflip
from deploykit.errors import DeploykitError


def _build(**kwargs) -> DataBundle:
    return build_datasets(DataConfig(**kwargs))


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return _build(dataset="digits", image_size=16)


# --- per-dataset shapes, dtypes and labels -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dataset="digits", image_size=16, channels=1),
        dict(dataset="digits", image_size=12, channels=3),
        dict(dataset="shapes", image_size=24, num_samples=60, num_classes=4),
        dict(dataset="shapes", image_size=20, num_samples=50, channels=1),
        dict(dataset="synthetic", image_size=10, num_samples=40, num_classes=3),
    ],
)
def test_items_have_the_promised_shape_dtype_and_labels(kwargs):
    cfg = DataConfig(**kwargs)
    bundle = build_datasets(cfg)
    assert (bundle.in_channels, bundle.image_size) == (cfg.channels, cfg.image_size)
    assert len(bundle.class_names) == bundle.num_classes
    assert len(bundle.mean) == len(bundle.std) == cfg.channels
    for split in (bundle.train, bundle.val):
        x, y = split[0]
        assert x.shape == (cfg.channels, cfg.image_size, cfg.image_size)
        assert x.dtype == torch.float32 and x.is_contiguous()
        assert isinstance(y, int)
        _, labels = _stack(split)
        assert 0 <= labels.min() and labels.max() < bundle.num_classes
    xb, yb = next(iter(make_loader(bundle.train, 8, shuffle=False)))
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_digits_split_is_complete_and_stratified(digits):
    assert digits.num_classes == 10 and digits.class_names == [str(d) for d in range(10)]
    assert len(digits.train) + len(digits.val) == 1797
    assert len(digits.val) == pytest.approx(0.2 * 1797, abs=10)
    train_counts = torch.bincount(digits.train.targets, minlength=10).float()
    val_counts = torch.bincount(digits.val.targets, minlength=10).float()
    assert torch.allclose(val_counts / (train_counts + val_counts), torch.full((10,), 0.2), atol=0.02)
    # the two splits are disjoint views of one dataset
    assert not set(digits.train.indices.tolist()) & set(digits.val.indices.tolist())


def test_digits_split_depends_on_the_seed():
    a, b = _build(dataset="digits", image_size=8), _build(dataset="digits", image_size=8, seed=1)
    assert not torch.equal(a.val.indices, b.val.indices)


def test_digits_pixels_span_zero_to_one_without_normalisation():
    bundle = _build(dataset="digits", image_size=8, normalize=False, channels=3)
    x, _ = _stack(bundle.val)
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(x[:, 0], x[:, 2])  # grey repeated to 3 channels
    assert bundle.mean == (0.0, 0.0, 0.0) and bundle.std == (1.0, 1.0, 1.0)


# --- shapes and synthetic ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["shapes", "synthetic"])
def test_generated_datasets_are_deterministic_per_seed(dataset):
    def images(seed: int) -> torch.Tensor:
        return sample_batch(_build(dataset=dataset, image_size=16, num_samples=40, seed=seed), 40, "train")[0]

    assert torch.equal(images(3), images(3))
    assert not torch.allclose(images(3), images(4))


def test_negative_seeds_work():
    for dataset in ("shapes", "synthetic", "digits"):
        assert len(_build(dataset=dataset, image_size=8, num_samples=20, seed=-7).train) > 0


def test_shapes_are_balanced_varied_and_named():
    bundle = _build(dataset="shapes", image_size=16, num_samples=500, num_classes=5, normalize=False)
    assert bundle.class_names == ["circle", "square", "triangle", "pentagon", "hexagon"]
    counts = torch.bincount(torch.cat([bundle.train.targets, bundle.val.targets]), minlength=5)
    assert counts.tolist() == [100] * 5
    assert torch.bincount(bundle.val.targets).tolist() == [20] * 5
    x, _ = _stack(bundle.train)
    assert (x.std(dim=(1, 2, 3)) > 0.05).all()  # no blank images
    # colour carries no class information: mean colour per class is about the same
    per_class = torch.stack([x[bundle.train.targets == k].mean(dim=(0, 2, 3)) for k in range(5)])
    assert (per_class.max(0).values - per_class.min(0).values < 0.1).all()


def test_shapes_support_every_class_count_up_to_ten_and_reject_more():
    names = _build(dataset="shapes", image_size=16, num_samples=40, num_classes=10).class_names
    assert len(set(names)) == 10
    with pytest.raises(DeploykitError, match="num_classes"):
        _build(dataset="shapes", num_classes=11)


def test_synthetic_is_standard_normal_noise():
    bundle = _build(dataset="synthetic", image_size=16, num_samples=100, normalize=False, num_classes=7)
    x, y = _stack(bundle.train)
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    assert bundle.class_names == [f"class_{k}" for k in range(7)]
    assert torch.equal(bundle.train[5][0], bundle.train[5][0])  # generated on access, but stable


# --- imagefolder ---------------------------------------------------------------------------------------------


def _write_images(folder: Path, count: int, suffix: str, size: tuple[int, int] = (40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}{suffix}", format="PNG" if suffix.lower() == ".png" else "JPEG")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "pets"
    _write_images(root / "dog", 6, ".png")
    _write_images(root / "cat", 4, ".JPG")
    _write_images(root / "bird", 2, ".jpeg")
    (root / "cat" / "notes.txt").write_text("not an image")
    Image.new("RGB", (4, 4)).save(root / "cat" / ".hidden.png")
    (root / ".cache").mkdir()
    return root


def test_imagefolder_reads_sorted_classes_and_splits_each(folder):
    bundle = _build(dataset="imagefolder", root=folder, image_size=16, val_fraction=0.25)
    assert bundle.class_names == ["bird", "cat", "dog"]
    assert len(bundle.train) + len(bundle.val) == 2 + 4 + 6  # .txt and hidden files ignored
    assert torch.bincount(bundle.val.targets, minlength=3).tolist() == [1, 1, 2]  # every class has a val image
    x, _ = bundle.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_imagefolder_grayscale_and_normalisation(folder):
    bundle = _build(dataset="imagefolder", root=folder, image_size=8, channels=1)
    x, _ = _stack(bundle.train)
    assert x.shape[1:] == (1, 8, 8)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-3


def _missing(tmp: Path) -> tuple[Path, Path]:
    return tmp / "missing", tmp / "missing"


def _a_file(tmp: Path) -> tuple[Path, Path]:
    (tmp / "file.png").write_bytes(b"x")
    return tmp / "file.png", tmp / "file.png"


def _one_class(tmp: Path) -> tuple[Path, Path]:
    _write_images(tmp / "root" / "only", 2, ".png")
    return tmp / "root", tmp / "root"


def _empty_class(tmp: Path) -> tuple[Path, Path]:
    _write_images(tmp / "root" / "full", 2, ".png")
    (tmp / "root" / "empty").mkdir()
    (tmp / "root" / "empty" / "readme.md").write_text("no images here")
    return tmp / "root", tmp / "root" / "empty"


@pytest.mark.parametrize("layout", [_missing, _a_file, _one_class, _empty_class])
def test_imagefolder_errors_name_the_path(tmp_path, layout):
    root, named = layout(tmp_path)
    with pytest.raises(DeploykitError) as err:
        _build(dataset="imagefolder", root=root)
    assert f"'{named}'" in str(err.value)


def test_imagefolder_missing_root_message_says_what_to_do(tmp_path):
    with pytest.raises(DeploykitError) as err:
        _build(dataset="imagefolder", root=tmp_path / "x" / "y")
    assert str(err.value) == (
        f"Dataset folder '{tmp_path / 'x' / 'y'}' does not exist: "
        "set data.root to a directory with one sub-folder of images per class."
    )


def test_imagefolder_without_root_is_an_error():
    with pytest.raises(DeploykitError, match="data.root"):
        _build(dataset="imagefolder")


def test_imagefolder_corrupt_image_is_named_when_read(folder):
    broken = folder / "dog" / "img3.png"
    broken.write_bytes(b"not a png")
    bundle = _build(dataset="imagefolder", root=folder, image_size=8, normalize=False)  # lazy: no read yet
    with pytest.raises(DeploykitError) as err:
        for split in (bundle.train, bundle.val):
            _stack(split)
    assert f"'{broken}'" in str(err.value)


def test_imagefolder_decodes_each_file_once_when_the_set_fits_in_memory(folder, monkeypatch):
    from deploykit.data import imagefolder

    bundle = _build(dataset="imagefolder", root=folder, image_size=8, normalize=False)
    first = _stack(bundle.train)
    for path in folder.rglob("img*"):
        path.write_bytes(b"overwritten")  # a second epoch reads memory, not the files
    assert all(torch.equal(a, b) for a, b in zip(_stack(bundle.train), first))
    monkeypatch.setattr(imagefolder, "CACHE_BYTES", 0)  # a set too big to keep is decoded on every access
    uncached = _build(dataset="imagefolder", root=folder, image_size=8, normalize=False)
    with pytest.raises(DeploykitError, match="unreadable or corrupt"):
        _stack(uncached.train)


# --- normalisation -------------------------------------------------------------------------------------------


def test_normalisation_gives_zero_mean_unit_std_on_train(digits):
    x, _ = _stack(digits.train)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)
    assert all(isinstance(v, float) for v in digits.mean + digits.std)
    xv, _ = _stack(digits.val)
    assert abs(xv.mean().item()) < 0.1  # same statistics applied to val


# --- augmentations -------------------------------------------------------------------------------------------


def _augmented(**augment) -> DataBundle:
    return _build(dataset="digits", image_size=12, augment=AugmentConfig(**augment))


def test_hflip_really_mirrors():
    image = torch.arange(12.0).view(1, 3, 4)
    g = torch.Generator().manual_seed(0)
    results = [random_hflip(image, g) for _ in range(40)]
    assert all(torch.equal(r, image) or torch.equal(r, image.flip(-1)) for r in results)
    assert sum(torch.equal(r, image.flip(-1)) for r in results) in range(10, 31)
    assert torch.equal(image.flip(-1)[0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))

    bundle = _augmented(hflip=True)
    flipped = 0
    for i in range(20):
        x, _ = bundle.train[i]
        plain, _ = bundle.train.item(i, augment=False)
        assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
        flipped += torch.equal(x, plain.flip(-1)) and not torch.equal(x, plain)
    assert flipped > 0


def test_random_crop_keeps_shape_and_shifts_content():
    crop = AugmentConfig(random_crop=True, crop_padding=3)
    bundle = _build(dataset="digits", image_size=16, normalize=False, augment=crop)
    shifted = 0
    for i in range(20):
        x, _ = bundle.train[i]
        plain, _ = bundle.train.item(i, augment=False)
        assert x.shape == plain.shape
        padded = torch.nn.functional.pad(plain, (3, 3, 3, 3))
        windows = [padded[:, t : t + 16, l : l + 16] for t in range(7) for l in range(7)]
        assert any(torch.equal(x, w) for w in windows)
        shifted += not torch.equal(x, plain)
    assert shifted > 0


def test_random_crop_pads_with_the_mean_colour_not_black():
    """After normalisation the border is 0, the mean colour: the shift is the plain normalised image, moved."""
    crop = AugmentConfig(random_crop=True, crop_padding=3)
    bundle = _build(dataset="digits", image_size=16, normalize=True, augment=crop)
    assert abs(bundle.mean[0] / bundle.std[0]) > 0.1  # black, normalised, is far from 0
    shifted = 0
    for i in range(20):
        x, _ = bundle.train[i]
        plain, _ = bundle.train.item(i, augment=False)  # normalised, not augmented
        padded = torch.nn.functional.pad(plain, (3, 3, 3, 3))  # zeros in the model's input space
        assert any(torch.equal(x, padded[:, t : t + 16, s : s + 16]) for t in range(7) for s in range(7))
        shifted += not torch.equal(x, plain)
    assert shifted > 0


def test_cutout_zeroes_a_square_of_the_right_size():
    g = torch.Generator().manual_seed(0)
    full_squares = 0
    for _ in range(50):
        out = cutout(torch.ones(2, 20, 20), 6, g)
        zero = out[0] == 0
        assert torch.equal(zero, out[1] == 0)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 6 and 1 <= len(cols) <= 6
        assert zero.sum() == len(rows) * len(cols)  # a filled (possibly clipped) rectangle
        full_squares += zero.sum().item() == 36
    assert full_squares > 20

    bundle = _augmented(cutout_size=5)
    x, _ = bundle.train[0]
    plain, _ = bundle.train.item(0, augment=False)
    changed = x != plain
    assert (x[changed] == 0).all() and changed.any()


def test_val_is_never_augmented_and_train_augmentation_is_reproducible():
    augment = dict(random_crop=True, hflip=True, cutout_size=4)
    a, b = _augmented(**augment), _augmented(**augment)
    x_val, _ = _stack(a.val)
    assert torch.equal(x_val, _stack(a.val)[0])
    assert torch.equal(x_val, sample_batch(a, len(a.val))[0])
    first_epoch = _stack(a.train)[0]
    assert torch.equal(first_epoch, _stack(b.train)[0])  # same seed, same augmented epoch
    assert torch.equal(first_epoch, _stack(a.train)[0])  # a function of (seed, epoch, sample): replayable
    a.train.set_epoch(1)
    assert not torch.equal(first_epoch, _stack(a.train)[0])  # the next epoch draws new augmentations


def test_loader_workers_draw_different_but_reproducible_augmentations():
    bundle = _augmented(hflip=True)
    subset = torch.utils.data.Subset(bundle.train, range(40))
    plain = torch.stack([bundle.train.item(i, augment=False)[0] for i in range(40)])

    def flips() -> list[bool]:
        loader = make_loader(subset, 1, shuffle=False, seed=5, num_workers=2)
        images = torch.cat([x for x, _ in loader])
        return [not torch.equal(x, p) for x, p in zip(images, plain)]

    first = flips()
    assert first == flips()
    assert first[0::2] != first[1::2]  # batches alternate between the two workers; their draws differ


# --- MixUp ---------------------------------------------------------------------------------------------------


def test_mixup_gives_soft_targets_that_sum_to_one():
    y = torch.arange(16) % 5
    x = torch.nn.functional.one_hot(y, 5).float().view(16, 5, 1, 1)  # each image is its own one-hot label
    mixed, targets = mixup_batch(x, y, 0.4, 5, torch.Generator().manual_seed(0))
    assert mixed.shape == x.shape and targets.shape == (16, 5) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(16))
    assert torch.allclose(mixed.view(16, 5), targets)  # images and targets mixed with the same lam and partner
    assert not torch.equal(targets, torch.nn.functional.one_hot(y, 5).float())
    again = mixup_batch(x, y, 0.4, 5, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again[0]) and torch.equal(targets, again[1])


def test_mixup_refuses_alpha_zero_because_the_caller_skips_it():
    with pytest.raises(ValueError, match="alpha"):
        mixup_batch(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 0.0, 2)


# --- loaders and sample_batch --------------------------------------------------------------------------------


def _order(loader) -> list[int]:
    return torch.cat([batch[0] for batch in loader]).tolist()


def test_make_loader_order_is_reproducible_per_seed():
    data = TensorDataset(torch.arange(50))
    first = _order(make_loader(data, 8, shuffle=True, seed=1))
    assert first == _order(make_loader(data, 8, shuffle=True, seed=1))
    assert first != _order(make_loader(data, 8, shuffle=True, seed=2))
    assert sorted(first) == list(range(50))
    assert _order(make_loader(data, 8, shuffle=False)) == list(range(50))
    assert len(make_loader(data, 8, shuffle=False, drop_last=True)) == 6


def test_make_loader_distributed_partitions_indices():
    data = TensorDataset(torch.arange(40))

    def shard(rank: int):
        return make_loader(data, 4, shuffle=True, seed=3, distributed=True, num_replicas=2, rank=rank)

    shards = [_order(shard(0)), _order(shard(1))]
    assert len(shards[0]) == len(shards[1]) == 20
    assert sorted(shards[0] + shards[1]) == list(range(40))
    assert shards[0] != list(range(0, 40, 2))  # shuffled, not strided
    again = shard(0)
    assert _order(again) == shards[0]
    again.sampler.set_epoch(1)
    assert _order(again) != shards[0]  # set_epoch reshuffles


def test_sample_batch_returns_the_first_real_samples(digits):
    x, y = sample_batch(digits, 5)
    assert x.shape == (5, 3, 16, 16) and y.dtype == torch.int64
    for i in range(5):
        assert torch.equal(x[i], digits.val[i][0]) and y[i].item() == digits.val[i][1]
    assert len(sample_batch(digits, 10_000, "train")[0]) == len(digits.train)
    with pytest.raises(ValueError):
        sample_batch(digits, 5, "test")
