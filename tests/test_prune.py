"""Pruning: DepGraph channel pruning to a ratio or budget, pruned-model files, unstructured sparsity, BatchNorm
re-estimation, and the prune stage in a pipeline. Tiny models at 16x16 on digits, one thread."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from deploykit.compress.prune import (
    Budget,
    head_layers,
    prune_structured,
    prune_unstructured,
    recalibrate_batchnorm,
    remove_masks,
    taylor_gradients,
    weight_sparsity,
)
from deploykit.data import build_datasets, make_loader
from deploykit.data.config import DataConfig
from deploykit.errors import DeploykitError
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline
from deploykit.train import fit, load_model, save_model
from deploykit.train.config import TrainConfig
from deploykit.train.loop import evaluate
from deploykit.zoo import build_model, count_macs, count_params

SHAPE = (1, 1, 16, 16)
RESNET = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "options": {"stem": "cifar", "width_mult": 0.25}}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch: dict, seed: int = 0) -> nn.Module:
    return build_model(arch, seed=seed).eval()


def batches(n: int, size: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 16, 16, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def macs(model: nn.Module) -> int:
    return count_macs(model, SHAPE)


def prune(model: nn.Module, importance: str = "l2", **goal) -> tuple[nn.Module, list[float]]:
    """prune_structured at the test input, 10 classes, round_to 8."""
    return prune_structured(model, torch.zeros(SHAPE), importance=importance, num_classes=10, round_to=8, **goal)


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig(dataset="digits", image_size=16, channels=1))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> nn.Module:
    cfg = TrainConfig(device="cpu", threads=1, epochs=2, batch_size=64, optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.01})
    model, _ = fit(build(RESNET), digits, cfg, tmp_path_factory.mktemp("fit"))
    return model


# -- structured ------------------------------------------------------------------------------------------


def test_half_the_macs_really_shrinks_the_model_and_round_trips(tmp_path: Path) -> None:
    model = build(RESNET)
    macs0, params0 = macs(model), count_params(model)
    pruned, ratios = prune(model, budget=Budget(macs, 0.5 * macs0))
    assert macs(pruned) <= 0.5 * macs0 and count_params(pruned) < 0.7 * params0  # measured 0.492x and 0.625x
    assert len(ratios) == 1 and 0 < ratios[0] < 0.5
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1  # the input is never pruned
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert [m.out_features for m in head_layers(pruned, 10)] == [10]
    assert sum(c.out_channels for c in convs) < sum(c.out_channels for c in build(RESNET).modules() if isinstance(c, nn.Conv2d))

    save_model(pruned, RESNET, tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["layers"]  # reshaped layers recorded
    torch.load(tmp_path / "model.pt", weights_only=True)
    loaded, arch = load_model(tmp_path)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), loaded(x))
    assert {k: v for k, v in arch.items() if k != "layers"} == RESNET


@pytest.mark.parametrize(
    "arch",
    [
        {"name": "mobilenet_v2", "num_classes": 10, "in_channels": 1, "options": {"width_mult": 0.5, "stem": "cifar"}},
        {"name": "efficientnet_b0", "num_classes": 10, "in_channels": 1, "options": {"stem": "cifar"}},
    ],
    ids=["mobilenet_v2-depthwise", "efficientnet_b0-squeeze_excitation"],
)
def test_depthwise_and_squeeze_excitation_layers_survive_a_round_trip(arch: dict, tmp_path: Path) -> None:
    model = build(arch)
    pruned, _ = prune(model, "l1", ratio=0.3)

    def depthwise(m: nn.Module) -> list[nn.Conv2d]:
        return [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1]

    assert depthwise(pruned) and all(c.groups == c.in_channels == c.out_channels for c in depthwise(pruned))
    assert any(c.groups != fresh.groups for c, fresh in zip(depthwise(pruned), depthwise(build(arch))))
    save_model(pruned, arch, tmp_path)
    loaded, _ = load_model(tmp_path)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(pruned.eval()(x), loaded(x))


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor"])
def test_each_importance_prunes(importance: str) -> None:
    model = build(RESNET)
    before = macs(model)
    pruned, _ = prune(model, importance, ratio=0.3, gradients=taylor_gradients(batches(2)))
    assert macs(pruned) < 0.7 * before and pruned(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert all(p.grad is None for p in pruned.parameters())  # Taylor's gradients are not left behind


def test_iterative_steps_reach_the_ratio_and_the_budget() -> None:
    model = build(RESNET)
    by_ratio, ratios = prune(copy.deepcopy(model), steps=2, ratio=0.5)
    assert ratios == [0.25, 0.5]
    one_shot, _ = prune(copy.deepcopy(model), ratio=0.5)
    assert count_params(by_ratio) == count_params(one_shot)  # the same widths, reached in two steps

    target = 0.4 * macs(model)
    by_budget, ratios = prune(model, "taylor", steps=3, budget=Budget(macs, target), gradients=taylor_gradients(batches(1)))
    assert len(ratios) == 3 and macs(by_budget) <= target


def test_an_unreachable_budget_is_explained() -> None:
    model = build(RESNET)
    with pytest.raises(DeploykitError, match="cannot bring the model down.*MACs.*round_to"):
        prune(model, budget=Budget(macs, 10))


def test_batchnorm_re_estimation_recovers_accuracy_after_pruning(trained: nn.Module, digits) -> None:
    val = make_loader(digits.val, 256, shuffle=False)
    train = make_loader(digits.train, 64, shuffle=True, seed=0)
    model = copy.deepcopy(trained)
    acc_trained = evaluate(model, val, torch.device("cpu"))[1]
    model, _ = prune(model, budget=Budget(macs, 0.5 * macs(model)))
    acc_pruned = evaluate(model, val, torch.device("cpu"))[1]
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert recalibrate_batchnorm(model, train, 20) == 20
    acc_recalibrated = evaluate(model, val, torch.device("cpu"))[1]
    print(f"val acc trained {acc_trained:.3f}, pruned {acc_pruned:.3f}, BN re-estimated {acc_recalibrated:.3f}")
    assert acc_recalibrated > acc_pruned + 0.2  # measured 0.989 -> 0.100 -> 0.479
    assert not model.training and [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta


# -- unstructured ----------------------------------------------------------------------------------------


def test_unstructured_reaches_the_sparsity_and_leaves_a_plain_dense_model(digits, tmp_path: Path) -> None:
    model = build(RESNET)
    save_model(model, RESNET, tmp_path / "dense")
    prune_unstructured(model, 0.6)
    assert any(name.endswith("weight_orig") for name, _ in model.named_parameters())
    # Fine-tuning with the masks in place cannot regrow the pruned weights.
    few = dataclasses.replace(digits, train=Subset(digits.train, range(128)), val=Subset(digits.val, range(64)))
    model, _ = fit(model, few, TrainConfig(device="cpu", threads=1, epochs=1, batch_size=64), tmp_path / "fit")
    remove_masks(model)
    assert abs(weight_sparsity(model) - 0.6) < 0.01
    assert not any("weight_orig" in k or "weight_mask" in k for k in model.state_dict())
    save_model(model, RESNET, tmp_path / "sparse")
    dense, sparse = (tmp_path / d / "model.pt" for d in ("dense", "sparse"))
    assert abs(sparse.stat().st_size - dense.stat().st_size) < 1024  # the zeros are stored all the same
    assert "layers" not in json.loads((tmp_path / "sparse/model.json").read_text())


# -- the stage -------------------------------------------------------------------------------------------


def test_each_method_has_its_own_settings_and_one_goal() -> None:
    from pydantic import TypeAdapter, ValidationError

    from deploykit.pipeline.registry import method_variants
    from deploykit.stages.prune import _PRUNERS, PruneStage, StructuredSettings, UnstructuredSettings

    config = TypeAdapter(PruneStage.Config)
    assert set(_PRUNERS) == set(method_variants(PruneStage.Config).values())  # every method has a pruner
    assert type(config.validate_python({})) is StructuredSettings  # no method: structured
    assert type(config.validate_python({"method": "unstructured"})) is UnstructuredSettings
    assert StructuredSettings().target_macs_ratio == 0.5
    assert StructuredSettings(pruning_ratio=0.3).target_macs_ratio is None
    with pytest.raises(ValidationError, match="structured.sparsity"):
        config.validate_python({"sparsity": 0.7})
    with pytest.raises(ValidationError, match="unstructured.round_to"):
        config.validate_python({"method": "unstructured", "round_to": 4})
    with pytest.raises(ValueError, match="not pruning_ratio and target_params_ratio"):
        StructuredSettings(pruning_ratio=0.3, target_params_ratio=0.5)


def test_prune_stage_in_a_pipeline(in_tmp: Path) -> None:
    fast = {"device": "cpu", "threads": 1, "batch_size": 64}
    cfg = parse_pipeline(
        {
            "name": "prune",
            "data": {"dataset": "digits", "image_size": 16, "channels": 1},
            "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
            "stages": [
                {"stage": "train", "epochs": 2, **fast, "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01}},
                {"stage": "prune", "latency_runs": 20, "finetune": {"epochs": 1, **fast, "optimizer": {"name": "adamw", "lr": 1e-3}}},
                {"stage": "prune", "name": "sparse", "method": "unstructured", "sparsity": 0.5, "latency_runs": 20, "finetune": {"epochs": 0}},
            ],
        }
    )
    run_pipeline(cfg)
    meta = json.loads((in_tmp / "runs/prune/prune/meta.json").read_text())
    m = meta["metrics"]
    print({k: v for k, v in m.items() if k not in ("history", "diagnostics", "finetune")})
    assert set(meta["artifacts"]) == {"checkpoint", "arch", "history"}
    assert m["macs_ratio"] <= 0.5 and m["params_ratio"] < 0.7 and m["file_bytes_ratio"] < 0.75
    assert m["val_acc_before"] > 0.95 and m["val_acc_bn_recalibrated"] >= m["val_acc_pruned"]
    assert m["val_acc_finetuned"] > 0.93 and m["val_acc"] == m["val_acc_finetuned"]  # measured 0.964
    assert m["latency_ms_before"] > 0 and m["latency_ms_after"] > 0 and len(m["history"]) == 1
    loaded, _ = load_model(in_tmp / "runs/prune/prune")
    assert macs(loaded) == m["macs_after"]

    sparse = json.loads((in_tmp / "runs/prune/sparse/meta.json").read_text())["metrics"]
    assert abs(sparse["weight_sparsity"] - 0.5) < 0.01 and sparse["macs_ratio"] == 1.0
    assert 0.99 < sparse["file_bytes_ratio"] < 1.01 and "do not shrink" in sparse["note"]
    assert "val_acc_finetuned" not in sparse and "history" not in sparse
