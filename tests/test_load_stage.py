"""The `load` stage: a checkpoint without training, from seeded random weights or a user's state_dict."""

import pytest
import torch

from deploykit.errors import DeploykitError
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline
from deploykit.train import load_model
from deploykit.zoo import get_model

OPTIONS = {"stem": "cifar", "width_mult": 0.25}


def pipeline(**load):
    return parse_pipeline(
        {
            "name": "load",
            "data": {"dataset": "synthetic", "image_size": 16, "channels": 3, "num_classes": 4, "num_samples": 20},
            "model": {"name": "resnet18", "options": OPTIONS},
            "stages": [{"stage": "load", **load}],
        }
    )


def test_random_init_is_seeded(in_tmp):
    run_pipeline(pipeline(seed=3))
    model, arch = load_model(in_tmp / "runs/load/load")
    torch.manual_seed(3)
    expected = get_model("resnet18", 4, 3, **OPTIONS)
    assert arch["num_classes"] == 4
    assert torch.equal(model.conv1.weight, expected.conv1.weight)


def test_user_weights_are_loaded(in_tmp):
    mine = get_model("resnet18", 4, 3, **OPTIONS)
    torch.nn.init.constant_(mine.fc.weight, 0.5)
    torch.save({"module." + k: v for k, v in mine.state_dict().items()}, in_tmp / "mine.pt")  # as DDP saves
    outcomes = run_pipeline(pipeline(weights="mine.pt"))
    model, _ = load_model(in_tmp / "runs/load/load")
    assert torch.equal(model.fc.weight, mine.fc.weight)
    assert outcomes[0].metrics["skipped_keys"] == 0


def test_mismatched_or_missing_weights_are_one_sentence(in_tmp):
    torch.save(get_model("resnet18", 7, 3, **OPTIONS).state_dict(), in_tmp / "other.pt")  # 7 classes, not 4
    with pytest.raises(DeploykitError, match="does not fit resnet18.*strict: false"):
        run_pipeline(pipeline(weights="other.pt"))
    assert not (in_tmp / "runs/load/load").exists()
    with pytest.raises(DeploykitError, match="weights file 'absent.pt' does not exist"):
        pipeline(weights="absent.pt")
