"""deploykit.data user sources: `dataset: arrays` (.npz), `dataset: python` (a factory), normalize values, key()."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import TensorDataset

from deploykit.data import DataBundle, build_datasets, clean_subset, make_loader, plain_item, sample_batch
from deploykit.data.config import DataConfig
from deploykit.errors import DeploykitError
from deploykit.usercode import register_object

RNG = np.random.default_rng(0)


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _arrays(root: Path, **kwargs) -> DataBundle:
    return build_datasets(DataConfig(dataset="arrays", root=root, **kwargs))


def _stack(dataset) -> tuple[torch.Tensor, list]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), [y for _, y in items]


# --- key(): existing pipelines keep their cache keys ---------------------------------------------------------

# Written out from DataConfig().model_dump(mode="json") before arrays/python existed.
OLD_DEFAULT = {
    "dataset": "digits", "root": None, "image_size": 32, "channels": 3, "num_classes": 10, "num_samples": 2000,
    "val_fraction": 0.2, "seed": 0, "normalize": True,
    "augment": {"random_crop": False, "crop_padding": 4, "hflip": False, "cutout_size": 0, "mixup_alpha": 0.0},
}
OLD_IMAGEFOLDER = {
    "dataset": "imagefolder", "root": "/tmp/x", "image_size": 64, "channels": 1, "num_classes": 10,
    "num_samples": 2000, "val_fraction": 0.2, "seed": 0, "normalize": False,
    "augment": {"random_crop": False, "crop_padding": 4, "hflip": True, "cutout_size": 0, "mixup_alpha": 0.0},
}


def test_key_of_an_old_config_is_its_old_model_dump():
    old = DataConfig()
    assert old.key() == OLD_DEFAULT and list(old.key()) == list(OLD_DEFAULT)
    assert old.model_dump(mode="json") == OLD_DEFAULT  # run.json and settings that hash model_dump stay too
    folder = DataConfig(dataset="imagefolder", root="/tmp/x", image_size=64, channels=1, normalize=False,
                        augment={"hflip": True})
    assert folder.key() == OLD_IMAGEFOLDER
    assert DataConfig.model_validate(OLD_DEFAULT) == old


def test_key_of_arrays_names_the_file_and_follows_its_content(tmp_path):
    path = _npz(tmp_path / "data.npz", x=np.zeros((4, 1, 2, 2)), y=np.array([0, 1, 0, 1]))
    cfg = DataConfig.model_validate({"dataset": "arrays", "root": "data.npz"}, context={"base_dir": tmp_path})
    assert cfg.root == path  # resolved against the pipeline file's folder, stored absolute
    key = cfg.key()
    assert key["root"] == "data.npz" and len(key["sha256"]) == 64 and "layout" not in key
    assert DataConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # what a worker process rebuilds from
    _npz(path, x=np.ones((4, 1, 2, 2)), y=np.array([0, 1, 0, 1]))
    assert cfg.key()["sha256"] != key["sha256"]
    assert DataConfig(dataset="arrays", root=path, layout="NHWC").key()["layout"] == "NHWC"


def test_key_of_python_names_the_file_and_follows_its_source(tmp_path):
    source = tmp_path / "my_data.py"
    source.write_text("def build():\n    return [], []\n")
    cfg = DataConfig.model_validate(
        {"dataset": "python", "factory": "my_data.py:build", "kwargs": {"n": 3}}, context={"base_dir": tmp_path}
    )
    key = cfg.key()
    assert key["factory"] == "my_data.py:build" and key["kwargs"] == {"n": 3} and len(key["sha256"]) == 64
    source.write_text("def build():\n    return [], []  # edited\n")
    assert cfg.key()["sha256"] != key["sha256"]


# --- arrays --------------------------------------------------------------------------------------------------


def test_arrays_with_their_own_splits(tmp_path):
    x, xv = RNG.normal(size=(20, 2, 5)).astype(np.float32), RNG.normal(size=(6, 2, 5)).astype(np.float32)
    path = _npz(tmp_path / "d.npz", x_train=x, y_train=np.arange(20) % 3, x_val=xv, y_val=np.arange(6) % 3)
    bundle = _arrays(path, normalize=False)
    assert (len(bundle.train), len(bundle.val)) == (20, 6)
    assert bundle.input_shape == (2, 5) and bundle.in_channels == 2 and bundle.image_size is None
    assert bundle.targets == "classes" and bundle.num_classes == 3 and bundle.class_names == ["0", "1", "2"]
    xb, yb = _stack(bundle.val)
    assert torch.equal(xb, torch.from_numpy(xv)) and yb == [0, 1, 2, 0, 1, 2]
    assert isinstance(yb[0], int)


def test_arrays_x_y_split_stratified_for_classes_and_random_otherwise(tmp_path):
    y = np.repeat([0, 1], 10)
    bundle = _arrays(_npz(tmp_path / "c.npz", x=np.zeros((20, 1, 4)), y=y, class_names=np.array(["a", "b"])))
    assert torch.bincount(bundle.val.targets).tolist() == [2, 2] and bundle.class_names == ["a", "b"]
    regression = _arrays(_npz(tmp_path / "r.npz", x=np.zeros((20, 1, 4)), y=RNG.normal(size=(20, 2))), seed=3)
    assert regression.targets == "tensor" and regression.num_classes is None
    assert (len(regression.train), len(regression.val)) == (16, 4)
    again = _arrays(tmp_path / "r.npz", seed=3)
    assert torch.equal(regression.val.indices, again.val.indices)
    assert not set(regression.train.indices.tolist()) & set(regression.val.indices.tolist())
    _, yb = sample_batch(regression, 3)
    assert yb.shape == (3, 2) and yb.dtype == torch.float32


def test_uint8_nhwc_images_become_channels_first_in_zero_one(tmp_path):
    x = RNG.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8)
    bundle = _arrays(_npz(tmp_path / "img.npz", x=x, y=np.arange(12) % 2), layout="NHWC", normalize=False)
    assert bundle.input_shape == (3, 6, 6) and bundle.image_size == 6
    xi, _ = bundle.train[0]
    source = int(bundle.train.indices[0])
    assert xi.is_contiguous() and torch.allclose(xi, torch.from_numpy(x[source]).permute(2, 0, 1).float() / 255)
    assert bundle.normalization == "none (uint8 scaled to [0, 1])"
    # deploykit's own augmentation applies: these are [C, H, W] images with class targets
    flipped = _arrays(tmp_path / "img.npz", layout="NHWC", augment={"hflip": True})
    x0, _ = flipped.train[0]
    plain, _ = flipped.train.item(0, augment=False)
    assert torch.equal(x0, plain) or torch.equal(x0, plain.flip(-1))


def test_segmentation_masks_are_tensor_targets(tmp_path):
    masks = RNG.integers(0, 4, (10, 8, 8)).astype(np.int64)
    bundle = _arrays(_npz(tmp_path / "seg.npz", x=RNG.normal(size=(10, 1, 8, 8)), y=masks))
    assert bundle.targets == "tensor" and bundle.num_classes is None and bundle.class_names == []
    _, y = bundle.val[0]
    assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(masks[int(bundle.val.indices[0])]))
    xb, yb = next(iter(make_loader(bundle.train, 4, shuffle=False)))
    assert xb.shape == (4, 1, 8, 8) and yb.shape == (4, 8, 8)
    assert sample_batch(bundle, 2, "train")[1].shape == (2, 8, 8)
    assert plain_item(bundle.train, 0, augment=False)[1].shape == (8, 8)
    assert clean_subset(bundle.val, 1)[0][1].shape == (8, 8)
    with pytest.raises(DeploykitError, match="hflip.*tensor targets"):
        _arrays(tmp_path / "seg.npz", augment={"hflip": True})
    with pytest.raises(DeploykitError, match="mixup_alpha"):
        _arrays(tmp_path / "seg.npz", augment={"mixup_alpha": 0.2})


def test_non_image_arrays_refuse_crop_flip_and_cutout(tmp_path):
    path = _npz(tmp_path / "tab.npz", x=np.zeros((10, 7)), y=np.arange(10) % 2)
    with pytest.raises(DeploykitError, match=r"random_crop.*shape \(7,\).*turn it off"):
        _arrays(path, augment={"random_crop": True})
    assert _arrays(path, augment={"mixup_alpha": 0.2}).input_shape == (7,)  # MixUp needs classes only


def _object_npz(tmp: Path) -> Path:
    return _npz(tmp / "o.npz", x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda t: t / "gone.npz", ["gone.npz", "does not exist"]),
        (lambda t: (t / "text.npz").write_text("not a zip") and t / "text.npz", ["not an .npz archive"]),
        (lambda t: np.save(t / "one.npy", np.zeros(3)) or t / "one.npy", ["one .npy array", "not an .npz"]),
        (lambda t: _npz(t / "m.npz", x_train=np.zeros((2, 1)), labels=np.zeros(2)),
         ["labels, x_train", "needs x_train, y_train, x_val", "(or x and y)"]),
        (lambda t: _npz(t / "l.npz", x=np.zeros((5, 1)), y=np.zeros(4, int)), ["'x' (5 samples)", "'y' (4 samples)"]),
        (_object_npz, ["'x'", "Python objects", "never unpickles"]),
        (lambda t: _npz(t / "s.npz", x=np.array(["a", "b"]), y=np.array([0, 1])), ["'x'", "not numbers"]),
        (lambda t: _npz(t / "f.npz", x=np.zeros(4), y=np.zeros(4, int)), ["'x'", "shape (4,)"]),
        (lambda t: _npz(t / "n.npz", x=np.zeros((4, 1)), y=np.array([0, -1, 0, 1])), ["negative class indices"]),
        (lambda t: _npz(t / "v.npz", x_train=np.zeros((4, 2)), y_train=np.zeros(4, int), x_val=np.zeros((2, 3)),
                        y_val=np.zeros(2, int)), ["'x_train' and 'x_val'", "same sample shape"]),
        (lambda t: _npz(t / "k.npz", x_train=np.zeros((4, 2)), y_train=np.zeros(4, int), x_val=np.zeros((2, 2)),
                        y_val=np.zeros((2, 3))), ["'y_train'", "different kinds of targets"]),
        (lambda t: _npz(t / "one.npz", x=np.zeros((1, 2)), y=np.zeros((1, 2))), ["too few samples"]),
    ],
)
def test_bad_arrays_files_are_one_sentence(tmp_path, make, words):
    path = make(tmp_path)
    cfg = DataConfig.model_construct(**{**DataConfig().__dict__, "dataset": "arrays", "root": path})
    with pytest.raises(DeploykitError) as err:
        build_datasets(cfg)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert message.endswith(".") and message.count(": ") <= 2 and "\n" not in message


def test_nhwc_needs_four_dims_and_a_missing_file_fails_validation(tmp_path):
    path = _npz(tmp_path / "t.npz", x=np.zeros((4, 3)), y=np.zeros(4, int))
    with pytest.raises(DeploykitError, match="layout NHWC needs 4-D"):
        _arrays(path, layout="NHWC")
    with pytest.raises(ValidationError, match="the arrays file .*nope.npz does not exist"):
        DataConfig(dataset="arrays", root=tmp_path / "nope.npz")
    with pytest.raises(ValidationError, match="data.root is required"):
        DataConfig(dataset="arrays")
    with pytest.raises(ValidationError, match="data.layout applies to the arrays dataset only"):
        DataConfig(layout="NHWC")


# --- normalize -----------------------------------------------------------------------------------------------


@pytest.fixture()
def two_channels(tmp_path) -> Path:
    x = np.stack([RNG.normal(5, 2, (40, 3, 3)), RNG.normal(-1, 0.5, (40, 3, 3))], axis=1).astype(np.float32)
    return _npz(tmp_path / "two.npz", x_train=x[:30], y_train=np.zeros((30, 1), np.float32), x_val=x[30:],
                y_val=np.zeros((10, 1), np.float32))


def test_normalize_true_false_and_given(two_channels):
    raw = torch.from_numpy(np.load(two_channels)["x_train"])
    true = _arrays(two_channels)
    assert true.normalization == "train-split mean/std"
    assert np.allclose(true.mean, raw.mean(dim=(0, 2, 3)).double(), atol=1e-5)
    x, _ = _stack(true.train)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)

    off = _arrays(two_channels, normalize=False)
    assert off.mean == (0.0, 0.0) and off.std == (1.0, 1.0) and torch.equal(_stack(off.train)[0], raw)

    given = _arrays(two_channels, normalize={"mean": [5, -1], "std": [2, 0.5]})
    assert given.normalization == "given mean/std" and given.mean == (5.0, -1.0) and given.std == (2.0, 0.5)
    expected = (raw - torch.tensor([5.0, -1.0]).view(2, 1, 1)) / torch.tensor([2.0, 0.5]).view(2, 1, 1)
    assert torch.allclose(_stack(given.train)[0], expected)


def test_normalize_given_for_built_in_data_and_wrong_lengths(two_channels):
    digits = build_datasets(DataConfig(image_size=8, channels=1, normalize={"mean": [0.5], "std": [0.25]}))
    assert digits.mean == (0.5,) and digits.normalization == "given mean/std"
    with pytest.raises(DeploykitError, match=r"gives 3 mean/std values .* 2 channel\(s\)"):
        _arrays(two_channels, normalize={"mean": [0, 0, 0], "std": [1, 1, 1]})
    with pytest.raises(ValidationError, match="2 means but 1 stds"):
        DataConfig(normalize={"mean": [0, 0], "std": [1]})
    with pytest.raises(ValidationError, match="greater than 0"):
        DataConfig(normalize={"mean": [0], "std": [0]})


def test_built_in_bundles_keep_their_shape_and_defaults():
    bundle = build_datasets(DataConfig(dataset="synthetic", image_size=8, num_samples=20, num_classes=2))
    assert bundle.input_shape == (3, 8, 8) and bundle.targets == "classes" and bundle.task is None
    assert bundle.normalization == "train-split mean/std" and bundle.num_classes == 2


# --- python factories ----------------------------------------------------------------------------------------

FACTORY = '''
import numpy as np
import torch
from torch.utils.data import TensorDataset


def build(n_train, n_val, classes=True):
    g = torch.Generator().manual_seed(0)
    x, xv = torch.rand(n_train, 2, 6, generator=g) * 4 + 1, torch.rand(n_val, 2, 6, generator=g)
    if classes:
        return TensorDataset(x, torch.arange(n_train) % 3), TensorDataset(xv, torch.arange(n_val) % 3)
    return TensorDataset(x, x.sum(1)), [(np.ones((2, 6), np.float32), np.zeros(6))] * n_val


def boom():
    raise RuntimeError("no data today")


def not_a_pair():
    return [1, 2, 3]


def empty():
    return TensorDataset(torch.zeros(0, 1)), TensorDataset(torch.zeros(2, 1), torch.zeros(2))


def bad_item():
    return [torch.zeros(3)], [(torch.zeros(3), 0)]


def bad_input():
    return [("text", 0)], [(torch.zeros(3), 0)]


def shapes():
    return [(torch.zeros(3), 0)], [(torch.zeros(4), 0)]


def mixed():
    return [(torch.zeros(3), 0)], [(torch.zeros(3), torch.zeros(2))]
'''


@pytest.fixture()
def factory_dir(tmp_path) -> Path:
    (tmp_path / "my_data.py").write_text(textwrap.dedent(FACTORY))
    return tmp_path


def _python(base: Path, factory: str, **kwargs) -> DataBundle:
    cfg = DataConfig.model_validate(
        {"dataset": "python", "factory": f"my_data.py:{factory}", **kwargs}, context={"base_dir": base}
    )
    return build_datasets(cfg)


def test_python_factory_with_kwargs_and_class_targets(factory_dir):
    bundle = _python(factory_dir, "build", kwargs={"n_train": 30, "n_val": 9})
    assert (len(bundle.train), len(bundle.val)) == (30, 9)
    assert bundle.input_shape == (2, 6) and bundle.targets == "classes" and bundle.num_classes == 3
    x, _ = _stack(bundle.train)
    assert torch.allclose(x.mean(dim=(0, 2)), torch.zeros(2), atol=1e-5)  # train-split statistics
    x0, y0 = bundle.train.item(0, augment=True)
    assert x0.dtype == torch.float32 and isinstance(y0, int)
    xb, yb = sample_batch(bundle, 4, "train")
    assert xb.shape == (4, 2, 6) and yb.dtype == torch.int64
    assert next(iter(make_loader(bundle.val, 4, shuffle=False)))[1].tolist() == [0, 1, 2, 0]


def test_python_factory_with_tensor_targets_and_numpy_items(factory_dir):
    bundle = _python(factory_dir, "build", kwargs={"n_train": 8, "n_val": 3, "classes": False}, normalize=False)
    assert bundle.targets == "tensor" and bundle.num_classes is None
    x, y = bundle.val[0]
    assert torch.equal(x, torch.ones(2, 6)) and y.dtype == torch.float32 and y.shape == (6,)
    assert sample_batch(bundle, 2)[1].shape == (2, 6)


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        ("boom", ["my_data.py:boom", "raised RuntimeError", "no data today"]),
        ("not_a_pair", ["my_data.py:not_a_pair", "3-item list", "not a (train, val) pair"]),
        ("empty", ["my_data.py:empty", "empty train split"]),
        ("bad_item", ["Item 0 of the train split", "my_data.py:bad_item", "Tensor, not an (input, target) pair"]),
        ("bad_input", ["my_data.py:bad_input", "input of type str", "not a tensor"]),
        ("shapes", ["my_data.py:shapes", "(3,)", "(4,)", "same input shape"]),
        ("mixed", ["my_data.py:mixed", "class indices, or both tensors"]),
    ],
)
def test_bad_factories_are_one_sentence(factory_dir, factory, words):
    with pytest.raises(DeploykitError) as err:
        _python(factory_dir, factory)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "\n" not in message


def test_python_config_errors(factory_dir):
    with pytest.raises(ValidationError, match="data.factory is required"):
        DataConfig(dataset="python")
    with pytest.raises(ValidationError, match="data.factory applies to the python dataset only"):
        DataConfig(factory=str(factory_dir / "my_data.py:build"))
    with pytest.raises(ValidationError, match="hflip cannot apply to the python dataset"):
        DataConfig(dataset="python", factory=str(factory_dir / "my_data.py:build"), augment={"hflip": True})
    with pytest.raises(ValidationError, match="does not exist"):
        DataConfig.model_validate({"dataset": "python", "factory": "nope.py:build"}, context={"base_dir": factory_dir})


def test_python_factory_handed_over_as_an_object():
    pair = (
        TensorDataset(torch.rand(6, 1, 3), torch.arange(6) % 2),
        TensorDataset(torch.rand(2, 1, 3), torch.arange(2)),
    )
    cfg = DataConfig(dataset="python", factory=register_object(lambda: pair, "ab" * 32))
    assert cfg.key()["sha256"] == "ab" * 8 and build_datasets(cfg).num_classes == 2
