"""Training's precision: `auto` takes bf16 exactly where the machine record says the CPU has it, a bf16-trained model
exports and quantizes like an fp32 one, and the val-loss spike diagnostic fires on an unstable run only."""

from __future__ import annotations

import json
import math

import pytest

from deploykit.machine import bf16_unsupported, machine_info
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline
from deploykit.train.diagnostics import val_loss_spike
from deploykit.train.precision import training_precision

BF16_HERE = bf16_unsupported(machine_info()) is None


@pytest.mark.parametrize(
    "isa, expected",
    [
        (["AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16", "AMX-BF16", "AMX-INT8"], "bf16"),  # Sapphire Rapids
        (["AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16"], "bf16"),  # Zen 4 (AVX-512 BF16, no AMX)
        (["AVX2", "AVX-512", "AVX-512 VNNI"], "fp32"),  # Cascade Lake: VNNI is INT8 only
        (["AVX2"], "fp32"),  # Zen 3
        ([], "fp32"),
    ],
)
def test_auto_takes_bf16_exactly_where_the_machine_record_has_it(isa, expected):
    precision, why = training_precision("auto", "cpu", {"isa": isa})
    assert precision == expected and why.startswith("auto: ")
    assert ("neither AVX-512 BF16 nor AMX-BF16" in why) == (expected == "fp32")
    for asked in ("fp32", "bf16"):  # a precision the file names is kept, whatever the CPU
        assert training_precision(asked, "cpu", {"isa": isa}) == (asked, "set in the pipeline")


def _pipeline(tmp_path, name: str, train: dict, quantize: bool = False):
    stages = [{"stage": "train", "epochs": 2, "batch_size": 32, **train}]
    if quantize:
        stages += [{"stage": "export"}, {"stage": "quantize", "method": "ptq", "max_accuracy_drop": 2.0}]
    return parse_pipeline({
        "name": name, "runs_dir": str(tmp_path),
        "data": {"dataset": "digits", "image_size": 8, "channels": 1},
        "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
        "stages": stages,
    })  # fmt: skip


@pytest.mark.side  # the other pytest process has more room (Makefile)
def test_a_bf16_trained_model_exports_and_quantizes_like_an_fp32_one(tmp_path):
    """bf16 training's accuracy range against fp32 is measured in bench/train_speed.py (BENCHMARKS.md); here the
    model it leaves behaves as an fp32-trained one does downstream."""
    stages = {o.name: o.metrics for o in run_pipeline(_pipeline(tmp_path, "bf16", {"precision": "bf16"}, True))}
    train, export, quantize = stages["train"], stages["export"], stages["quantize"]
    assert train["precision"] == "bf16" and train["precision_why"] == "set in the pipeline"
    assert train["val_acc"] > 0.8, train["val_acc"]  # evaluated in fp32, as it is exported
    assert export["parity"]["max_abs_diff"] < 1e-3  # the checkpoint's weights are fp32, as after fp32 training
    assert quantize["int8_accuracy"] >= quantize["fp32_accuracy"] - 0.02


def _rows(val_losses, train_losses):
    return [
        {"epoch": i + 1, "val_loss": v, "train_loss": t} for i, (v, t) in enumerate(zip(val_losses, train_losses))
    ]


def test_the_spike_rule_reads_epochs_against_each_other_and_the_first_against_chance():
    chance = math.log(10)
    healthy = _rows([8.5, 0.44, 0.05, 0.04], [2.0, 0.5, 0.2, 0.1])  # a first epoch 3.7x chance: not a spike
    assert val_loss_spike(healthy, 8, chance) is None
    bn = val_loss_spike(_rows([0.4, 6.0, 0.3], [0.5, 0.45, 0.3]), 8, chance)
    assert bn["epoch"] == 2 and "BatchNorm's running statistics" in bn["evidence"] and "15x epoch 1" in bn["evidence"]
    lr = val_loss_spike(_rows([300.0, 1.6], [9.0, 1.0]), 8, chance)
    assert lr["epoch"] == 1 and "too high" in lr["evidence"] and "chance level" in lr["evidence"]
    late = _rows([0.4, 0.3, 0.2, 0.2, 0.1, 0.1, 4.0], [0.5] * 7)
    assert val_loss_spike(late, 8, chance) is None  # late in training it is not the warm-up's business


@pytest.mark.parametrize("lr, warmup, precision", [(0.02, 1.0, "auto"), (0.5, 0.0, "fp32")])
def test_the_spike_diagnostic_fires_on_an_unstable_run_and_not_on_a_healthy_one(tmp_path, lr, warmup, precision):
    """The healthy run also shows the default, auto, and what it chose here; the unstable one is fp32 on every CPU."""
    train = {"grad_clip_norm": 5.0, "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9},
             "schedule": {"name": "warmup_cosine", "warmup_epochs": warmup}}  # fmt: skip
    if precision != "auto":
        train["precision"] = precision
    outcome = run_pipeline(_pipeline(tmp_path, "spike", train))[0]
    meta = json.loads((outcome.directory / "meta.json").read_text())["metrics"]
    spike = meta["diagnostics"]["val_loss_spike"]
    if precision == "auto":
        assert spike is None
        assert meta["precision"] == ("bf16" if BF16_HERE else "fp32") and meta["precision_why"].startswith("auto: ")
    else:
        assert spike["epoch"] == 1 and any("warm-up" in s for s in spike["solutions"]), spike
