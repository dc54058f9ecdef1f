"""Every zoo family learns a small image task with its auto recipe (issue 10).

EfficientNet-B0 once stayed at chance on `shapes`: its classifier and squeeze-excitation inits made the first
updates explode. Each family here trains on 4-class 16x16 grey shapes for a bounded number of steps with
`auto_recipe` and must end well above chance (25%). A chance-level model scores 24-26% on the 400 validation
images (one standard deviation: 2.2 points), so every bound below is more than 6 deviations above it.

Measured on this project's 2-core CPU (seed 0): ResNet-18 55.5% (150 steps), MobileNetV2 48.7% (150),
EfficientNet-B0 51.2% (100; the zoo before the fix: 26.0%), GoogLeNet 56.0% (100). The file took 47 s.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deploykit.data import DataBundle, build_datasets
from deploykit.data.config import DataConfig
from deploykit.errors import DeploykitError
from deploykit.train import fit
from deploykit.train.config import TrainConfig
from deploykit.train.recipes import GENERIC, auto_recipe, families
from deploykit.zoo import get_model

# GoogLeNet trains for ~16 s and the others for 7-11 s: more than unmarked tests should take.
pytestmark = [pytest.mark.slow, pytest.mark.side, pytest.mark.usefixtures("one_thread")]

NUM_CLASSES = 4
BATCH = 32
# (model, family, epochs of 50 steps, lowest acceptable val accuracy). Epochs differ by cost per step, so that
# the file stays under 50 s; each bound sits 8-11 points under the measured accuracy.
CASES = [
    ("resnet18", "resnet", 3, 0.45),
    ("mobilenet_v2", "mobilenet", 3, 0.40),
    ("efficientnet_b0", "efficientnet", 2, 0.40),
    ("googlenet", "inception", 2, 0.45),
]


@pytest.fixture(scope="module")
def shapes() -> DataBundle:
    # Grey: colours are random by construction, and without them ResNet-18 learned faster (55% vs 49%).
    return build_datasets(
        DataConfig(dataset="shapes", image_size=16, channels=1, num_samples=2000, num_classes=NUM_CLASSES, seed=0)
    )


def _model(name: str, family: str, in_channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    options = auto_recipe(family, BATCH)["model"]["options"]
    return get_model(name, num_classes=NUM_CLASSES, in_channels=in_channels, **options)


@pytest.mark.parametrize(("name", "family"), [case[:2] for case in CASES], ids=[case[0] for case in CASES])
def test_initial_loss_is_near_chance(name: str, family: str, shapes: DataBundle) -> None:
    # A freshly built classifier should be unsure: loss ~ ln(classes). EfficientNet's old classifier init gave 2.35.
    model = _model(name, family, shapes.in_channels).train()
    x = torch.stack([shapes.train[i][0] for i in range(64)])
    y = torch.tensor([int(shapes.train[i][1]) for i in range(64)])
    loss = F.cross_entropy(model(x), y).item()
    assert abs(loss - math.log(NUM_CLASSES)) < 0.25, loss


@pytest.mark.parametrize(("name", "family", "epochs", "min_acc"), CASES, ids=[case[0] for case in CASES])
def test_family_learns_small_shapes_with_its_auto_recipe(
    name: str, family: str, epochs: int, min_acc: float, shapes: DataBundle, tmp_path: Path
) -> None:
    recipe = auto_recipe(family, BATCH)
    # fp32 and NCHW, as the recipes were measured, and the same on every CPU (auto would train in bf16 on some; in
    # bf16 and channels_last GoogLeNet's short run reached 43.5% against the 45% bound here: re-tuning is open).
    train = recipe["train"] | {"epochs": epochs, "device": "cpu", "threads": 1, "seed": 0, "deterministic": True,
                               "precision": "fp32", "memory_format": "contiguous"}
    _, result = fit(_model(name, family, shapes.in_channels), shapes, TrainConfig.model_validate(train), tmp_path)

    assert result.metrics["optimizer_steps"] == 50 * epochs  # 1,600 training images in batches of 32
    # The init bug showed first as a blown-up first epoch (2.6 against ln 4 = 1.39); recipes measured 1.41-1.55.
    assert result.history[0]["train_loss"] < 1.75, result.history[0]
    assert result.metrics["val_acc"] >= min_acc, result.metrics


def test_auto_recipe_scales_the_learning_rate_and_validates() -> None:
    assert families() == ["resnet", "mobilenet", "efficientnet", "inception"]
    for family in [*families(), GENERIC]:
        at_64, at_256 = auto_recipe(family, 64), auto_recipe(family, 256)
        assert at_256["train"]["optimizer"]["lr"] == pytest.approx(4 * at_64["train"]["optimizer"]["lr"])
        assert at_256["train"]["batch_size"] == 256
        TrainConfig.model_validate(at_256["train"])  # the train part is TrainConfig fields as they are
    recipe = auto_recipe("resnet", 64)
    recipe["train"]["optimizer"]["lr"] = 1.0
    assert auto_recipe("resnet", 64)["train"]["optimizer"]["lr"] == 0.1  # callers get copies
    with pytest.raises(DeploykitError, match="family 'vgg'.*resnet.*or 'generic' for a model of your own"):
        auto_recipe("vgg", 64)
    with pytest.raises(DeploykitError, match="batch_size=0"):
        auto_recipe("resnet", 0)
