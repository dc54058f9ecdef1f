"""fit() and its parts: learning, accumulation, clipping, precision, early stopping, SWA, resume, transfer,
diagnostics and model files. Most tests use a tiny staged CNN on a separable 8x8 problem so they run in
about a second each; two use the real zoo and digits data."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

from deploykit.data import DataBundle, build_datasets, make_loader
from deploykit.data.config import DataConfig
from deploykit.errors import DeploykitError
from deploykit.progress import Reporter
from deploykit.train import FitResult, fit, load_model, save_model
from deploykit.train.config import TrainConfig, TransferConfig
from deploykit.train.diagnostics import TrainingDiverged, classify_curves
from deploykit.train.optim import build_optimizer
from deploykit.train.transfer import apply_transfer
from deploykit.zoo import build_model, get_model


class TinyNet(nn.Module):
    """A staged CNN following the zoo's conventions: stage_groups() and activation_checkpointing."""

    def __init__(self, num_classes: int = 2, norm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()

        def bn(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm else nn.Identity()

        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn(4), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), bn(8), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, num_classes))
        self.activation_checkpointing = False

    def stage_groups(self) -> list[list[str]]:
        return [["stem"], ["stage1"], ["head"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.activation_checkpointing and self.training:
            x = checkpoint(self.stage1, x, use_reentrant=False)
        else:
            x = self.stage1(x)
        return self.head(x)


def separable(n: int, seed: int, flip: bool = False) -> TensorDataset:
    """1x8x8 noise with a bright top half (class 0) or bottom half (class 1); flip swaps the labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    x[y == 0, :, :4] += 1.0
    x[y == 1, :, 4:] += 1.0
    return TensorDataset(x, 1 - y if flip else y)


def separable_bundle(n_train: int = 160, n_val: int = 64, flip_val: bool = False) -> DataBundle:
    return DataBundle(
        train=separable(n_train, seed=1),
        val=separable(n_val, seed=2, flip=flip_val),
        num_classes=2,
        in_channels=1,
        image_size=8,
        class_names=["top", "bottom"],
        mean=(0.0,),
        std=(1.0,),
    )


def config(**overrides) -> TrainConfig:
    """Fast settings on the CPU: plain momentum SGD at a constant lr, no weight decay, one thread.

    One thread, because two threads on a 2-core machine that is busy with anything else wait on each
    other: training steps then take 10-50x longer.
    """
    base = {
        "device": "cpu",
        "threads": 1,
        "epochs": 3,
        "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "precision": "fp32",  # exact comparisons, the same on every CPU (auto would train in bf16 on some)
    }
    return TrainConfig.model_validate(base | overrides)


def tiny(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


class Recorder(Reporter):
    """A silent reporter that keeps the logged lines."""

    def __init__(self) -> None:
        super().__init__(enabled=False)
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


# -- learning -------------------------------------------------------------------------------------------


def test_tiny_model_learns_a_separable_problem(tmp_path: Path) -> None:
    model, result = fit(tiny(), separable_bundle(), config(), tmp_path)
    assert isinstance(result, FitResult)
    assert result.metrics["val_acc"] > 0.9
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    row = result.history[0]
    assert set(row) == {
        "epoch", "train_loss", "train_acc", "train_eval_loss", "train_eval_acc", "val_loss", "val_acc", "lr",
        "epoch_time_s", "data_s", "compute_s", "optimizer_s", "eval_s",
    }  # fmt: skip
    parts = row["data_s"] + row["compute_s"] + row["optimizer_s"] + row["eval_s"]
    # each part is rounded to the millisecond, so four of them may sum a little above the whole
    assert 0 < parts <= row["epoch_time_s"] + 0.002 and min(row[k] for k in ("compute_s", "eval_s")) > 0
    # fractions of the epochs' time (the rest: saving); three 50-ms epochs' millisecond rounding can add ~1.5%
    slack = 3 * 5 * 0.0005 / result.metrics["train_time_s"] + 0.002
    assert 0.5 < sum(result.metrics["time_split"].values()) <= 1 + slack
    assert result.metrics["epochs_run"] == 3 and not result.metrics["stopped_early"] and not result.metrics["swa"]
    assert result.metrics["resumed_from_epoch"] is None
    assert not model.training and next(model.parameters()).device.type == "cpu"
    state = torch.load(tmp_path / "last.pt", weights_only=True)  # plain tensors and numbers only
    assert state["epoch"] == 2 and len(state["history"]) == 3


def test_resnet18_on_digits_reaches_a_sane_accuracy(tmp_path: Path) -> None:
    bundle = build_datasets(DataConfig(dataset="digits", image_size=16, channels=1))
    torch.manual_seed(0)
    model = get_model("resnet18", bundle.num_classes, bundle.in_channels, stem="cifar", width_mult=0.25)
    cfg = config(
        epochs=2,
        batch_size=64,
        optimizer={"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        schedule={"name": "cosine"},
    )
    model, result = fit(model, bundle, cfg, tmp_path)
    assert result.metrics["val_acc"] > 0.9, result.history  # 0.983-0.989 over seeds 0-3


# -- accumulation, clipping, precision, checkpointing ----------------------------------------------------


def _one_step_cfg(**overrides) -> TrainConfig:
    return config(epochs=1, optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}, **overrides)


def test_accumulation_matches_the_larger_batch(tmp_path: Path) -> None:
    bundle = separable_bundle(n_train=32)
    big, _ = fit(tiny(norm=False), bundle, _one_step_cfg(batch_size=32), tmp_path / "big")
    accumulated, _ = fit(tiny(norm=False), bundle, _one_step_cfg(batch_size=16, accumulate_steps=2), tmp_path / "acc")
    two_steps, _ = fit(tiny(norm=False), bundle, _one_step_cfg(batch_size=16), tmp_path / "two")
    assert max_diff(params(big), params(accumulated)) < 1e-5
    assert max_diff(params(big), params(two_steps)) > 1e-3  # the comparison can tell the difference


def test_gradient_clipping_bounds_the_update(tmp_path: Path) -> None:
    class Loud(TinyNet):  # huge logits, huge gradients
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 1e3

    bundle, clip = separable_bundle(n_train=32), 0.05
    start = params(tiny(norm=False))

    def update_norm(model: nn.Module) -> float:
        after = dict(model.named_parameters())
        return math.sqrt(sum(float((after[k].detach() - start[k]).square().sum()) for k in after))

    torch.manual_seed(0)
    clipped, result = fit(Loud(norm=False), bundle, _one_step_cfg(grad_clip_norm=clip), tmp_path / "clip")
    torch.manual_seed(0)
    free, _ = fit(Loud(norm=False), bundle, _one_step_cfg(), tmp_path / "free")
    lr = 0.5
    assert update_norm(clipped) <= lr * clip * (1 + 1e-4)
    assert update_norm(free) > 10 * lr * clip
    assert result.diagnostics["grad_clip"]["clipped_steps"] == 1
    assert result.diagnostics["grad_clip"]["max_pre_clip_norm"] > clip


def test_bf16_autocast_trains_on_cpu(tmp_path: Path) -> None:
    _, result = fit(tiny(), separable_bundle(), config(precision="bf16"), tmp_path)
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.metrics["val_acc"] > 0.85


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DeploykitError, match="bf16"):
        fit(tiny(), separable_bundle(), config(precision="fp16", device="cpu"), tmp_path)


def test_activation_checkpointing_keeps_the_result(tmp_path: Path) -> None:
    plain, _ = fit(tiny(norm=False), separable_bundle(), config(epochs=1), tmp_path / "plain")
    cfg = config(epochs=1, activation_checkpointing=True)
    ckpt, _ = fit(tiny(norm=False), separable_bundle(), cfg, tmp_path / "ckpt")
    assert max_diff(params(plain), params(ckpt)) < 1e-6
    assert ckpt.activation_checkpointing is False  # the returned model is a plain one
    with pytest.raises(DeploykitError, match="activation checkpointing"):
        fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), separable_bundle(), cfg, tmp_path / "plain_module")


# -- early stopping and SWA ------------------------------------------------------------------------------


def test_early_stopping_stops_and_returns_the_best_weights(tmp_path: Path) -> None:
    # Validation labels are flipped, so the better the model learns, the worse the val loss: epoch 1 is best.
    bundle = separable_bundle(flip_val=True)
    es = {"monitor": "val_loss", "patience": 2}
    model, result = fit(tiny(), bundle, config(epochs=10, early_stopping=es), tmp_path / "es")
    m = result.metrics
    assert m["stopped_early"] and m["epochs_run"] == 3 and m["best_epoch"] == 1
    assert m["val_loss"] == pytest.approx(result.history[0]["val_loss"], rel=1e-5)
    first_epoch_only, _ = fit(tiny(), bundle, config(epochs=1), tmp_path / "one")
    assert max_diff(params(model), params(first_epoch_only)) < 1e-6


def test_swa_averages_weights_and_recomputes_batchnorm(tmp_path: Path) -> None:
    bundle = separable_bundle()
    model, result = fit(tiny(), bundle, config(epochs=4, swa={"start_epoch": 2}), tmp_path)
    assert result.metrics["swa"] and result.metrics["swa_epochs_averaged"] == 2
    last = torch.load(tmp_path / "last.pt", weights_only=True)["model"]  # the raw weights of the last epoch
    averaged = params(model)
    assert max_diff({k: averaged[k] for k in last if "weight" in k}, {k: last[k] for k in last if "weight" in k}) > 1e-4
    # BatchNorm statistics belong to the averaged weights: recomputing them over the train split changes nothing.
    recomputed = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(make_loader(bundle.train, 32, shuffle=False), recomputed)
    for name in ("stem.1.running_mean", "stage1.1.running_var"):
        assert torch.allclose(averaged[name], recomputed.state_dict()[name], atol=1e-5)
        assert not torch.allclose(averaged[name], last[name], atol=1e-4)
    assert result.metrics["val_acc"] > 0.9


# -- resume ----------------------------------------------------------------------------------------------


def test_resuming_after_a_shorter_run_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    bundle = separable_bundle()
    straight, _ = fit(tiny(dropout=0.2), bundle, config(epochs=3), tmp_path / "straight")
    fit(tiny(dropout=0.2), bundle, config(epochs=2), tmp_path / "resumed")
    resumed, result = fit(tiny(seed=7, dropout=0.2), bundle, config(epochs=3), tmp_path / "resumed")
    assert result.metrics["resumed_from_epoch"] == 2 and len(result.history) == 3
    assert max_diff(params(straight), params(resumed)) < 1e-6


def test_resuming_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    class Crash(Exception):
        pass

    class CrashOnEpoch3(Reporter):
        def __init__(self) -> None:
            super().__init__(enabled=False)

        def task(self, description: str, total: float | None):
            if description.startswith("epoch 3/"):
                raise Crash
            return super().task(description, total)

    bundle = separable_bundle()
    cfg = config(epochs=4, schedule={"name": "cosine"}, optimizer={"name": "adamw", "lr": 0.01})
    straight, expected = fit(tiny(dropout=0.2), bundle, cfg, tmp_path / "straight", mixup_alpha=0.4)
    with pytest.raises(Crash):
        fit(tiny(dropout=0.2), bundle, cfg, tmp_path / "crashed", mixup_alpha=0.4, reporter=CrashOnEpoch3())
    resumed, result = fit(tiny(seed=3, dropout=0.2), bundle, cfg, tmp_path / "crashed", mixup_alpha=0.4)
    assert result.metrics["resumed_from_epoch"] == 2
    assert max_diff(params(straight), params(resumed)) < 1e-6
    expected_losses = [h["train_loss"] for h in expected.history]
    assert [h["train_loss"] for h in result.history] == pytest.approx(expected_losses, rel=1e-6)


def test_resuming_a_finished_run_only_returns_its_model(tmp_path: Path) -> None:
    bundle = separable_bundle()
    done, _ = fit(tiny(), bundle, config(epochs=2), tmp_path)
    again, result = fit(tiny(seed=5), bundle, config(epochs=2), tmp_path)
    assert result.metrics["resumed_from_epoch"] == 2 and result.metrics["epochs_run"] == 2
    assert max_diff(params(done), params(again)) == 0.0


# -- transfer learning -----------------------------------------------------------------------------------


@pytest.fixture
def pretrained(tmp_path: Path) -> Path:
    """A state_dict of a TinyNet trained on the task, saved as a deploykit checkpoint would be."""
    model, _ = fit(tiny(seed=11), separable_bundle(), config(epochs=1), tmp_path / "pre")
    path = tmp_path / "pretrained.pt"
    torch.save(model.state_dict(), path)
    return path


def _groups_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_feature_extraction_trains_only_the_head(tmp_path: Path, pretrained: Path) -> None:
    before = torch.load(pretrained, weights_only=True)
    transfer = TransferConfig(checkpoint=pretrained, strategy="feature_extraction")
    model, result = fit(tiny(), separable_bundle(), config(epochs=2, transfer=transfer), tmp_path / "fe")
    after = params(model)
    for frozen in ("stem.", "stage1."):  # weights and BatchNorm statistics alike
        assert max_diff(_groups_state(after, frozen), _groups_state(before, frozen)) == 0.0
    assert max_diff(_groups_state(after, "head."), _groups_state(before, "head.")) > 1e-4
    assert result.metrics["transfer"]["loaded"] == len(before) and result.metrics["transfer"]["skipped"] == 0


def test_partial_fine_tuning_leaves_frozen_groups_and_their_batchnorm_alone(tmp_path: Path, pretrained: Path) -> None:
    before = torch.load(pretrained, weights_only=True)
    transfer = TransferConfig(checkpoint=pretrained, strategy="partial", freeze_stages=1)
    model, _ = fit(tiny(), separable_bundle(), config(epochs=2, transfer=transfer), tmp_path / "partial")
    after = params(model)
    assert max_diff(_groups_state(after, "stem."), _groups_state(before, "stem.")) == 0.0
    assert torch.equal(after["stem.1.running_mean"], before["stem.1.running_mean"])
    assert after["stem.1.num_batches_tracked"] == before["stem.1.num_batches_tracked"]
    assert max_diff(_groups_state(after, "stage1."), _groups_state(before, "stage1.")) > 1e-4
    assert not torch.equal(after["stage1.1.running_mean"], before["stage1.1.running_mean"])


def test_a_head_of_another_shape_is_skipped_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "five_classes.pt"
    torch.save({"state_dict": tiny(num_classes=5).state_dict()}, path)
    transfer = TransferConfig(checkpoint=path, strategy="full")
    _, result = fit(tiny(), separable_bundle(), config(epochs=1, transfer=transfer), tmp_path / "run")
    report = result.metrics["transfer"]
    assert report["skipped"] == 2 and report["skipped_keys"] == ["head.3.bias", "head.3.weight"]
    assert report["loaded"] == len(tiny().state_dict()) - 2 and report["missing_keys"] == report["skipped_keys"]


def test_strict_transfer_refuses_a_head_of_another_shape(tmp_path: Path) -> None:
    path = tmp_path / "five_classes.pt"
    torch.save(tiny(num_classes=5).state_dict(), path)
    transfer = TransferConfig(checkpoint=path, strict=True)
    with pytest.raises(DeploykitError, match="five_classes.pt.*strict"):
        fit(tiny(), separable_bundle(), config(transfer=transfer), tmp_path / "run")


@pytest.mark.parametrize("content", [None, [1, 2, 3]], ids=["missing", "not-a-state-dict"])
def test_a_bad_transfer_checkpoint_is_named(tmp_path: Path, content: object) -> None:
    path = tmp_path / "weights.pt"
    if content is not None:
        torch.save(content, path)
    transfer = TransferConfig(checkpoint=path)
    with pytest.raises(DeploykitError, match="weights.pt"):
        fit(tiny(), separable_bundle(), config(transfer=transfer), tmp_path / "run")


def test_full_fine_tuning_uses_discriminative_learning_rates(tmp_path: Path) -> None:
    model = get_model("resnet18", 10, 1, stem="cifar", width_mult=0.25)
    path = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), path)
    plan = apply_transfer(model, TransferConfig(checkpoint=path, strategy="full", head_lr_mult=10, early_lr_mult=0.1))
    assert plan.lr_mults == {"conv1": 0.1, "bn1": 0.1, "layer1": 0.1, "layer2": 0.1, "fc": 10}
    assert plan.frozen == []
    optimizer = build_optimizer(model, config().optimizer, plan.lr_mults)  # base lr 0.1
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {"fc.weight": 1.0, "layer4.0.conv1.weight": 0.1, "layer1.0.conv1.weight": 0.01, "conv1.weight": 0.01}
    for name, lr in expected.items():
        assert lr_of[id(model.get_parameter(name))] == pytest.approx(lr), name


# -- diagnostics -----------------------------------------------------------------------------------------


def test_a_nan_loss_stops_training_naming_epoch_and_step(tmp_path: Path) -> None:
    class NaNOnSeventhBatch(TinyNet):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            if self.training:
                NaNOnSeventhBatch.calls += 1
                if NaNOnSeventhBatch.calls == 7:
                    out = out * float("nan")
            return out

    torch.manual_seed(0)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, batch 2 of 5 \(optimizer step 7\).*learning rate") as info:
        fit(NaNOnSeventhBatch(), separable_bundle(), config(), tmp_path)  # 160 samples: 5 batches of 32 per epoch
    assert isinstance(info.value, DeploykitError) and (info.value.epoch, info.value.batch) == (2, 2)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0  # the diverged epoch was not saved


def test_gradient_monitor_flags_exploding_and_vanishing_layers(tmp_path: Path) -> None:
    class Skewed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.Linear(64, 2)
            self.loud = nn.Linear(64, 2)
            self.quiet = nn.Linear(64, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.flatten(1)
            return self.main(x) + self.loud(x) * 1e6 + self.quiet(x) * 1e-9

    torch.manual_seed(0)
    recorder = Recorder()
    cfg = config(epochs=1, optimizer={"name": "sgd", "lr": 1e-12, "momentum": 0.0}, diagnostics={"grad_norm_every": 1})
    _, result = fit(Skewed(), separable_bundle(n_train=64), cfg, tmp_path, reporter=recorder)
    grads = result.diagnostics["gradients"]
    assert set(grads["exploding"]) == {"loud.weight", "loud.bias"}
    assert set(grads["vanishing"]) == {"quiet.weight"}  # biases are not judged for vanishing (see below)
    loud = grads["exploding"]["loud.weight"]
    assert loud["max_norm"] > 100 and loud["first_step"] == 1 and loud["count"] == 2
    assert grads["vanishing"]["quiet.weight"]["min_norm"] < 1e-6
    assert "gradient clipping" in " ".join(grads["solutions"]["exploding"])
    warnings = [line for line in recorder.lines if "loud.weight" in line]
    assert len(warnings) == 1  # two checks, one warning


def _history(train_loss, val_loss, train_acc, val_acc, trained_acc=None) -> list[dict]:
    """Rows with eval-mode train metrics; as trained, the loss is the same and the accuracy `trained_acc` (or the
    eval-mode one)."""
    rows = zip(train_loss, val_loss, train_acc, val_acc, trained_acc or train_acc, strict=True)
    return [
        {"epoch": i + 1, "train_eval_loss": tl, "train_loss": tl, "val_loss": vl, "train_eval_acc": ta,
         "val_acc": va, "train_acc": ra}
        for i, (tl, vl, ta, va, ra) in enumerate(rows)
    ]  # fmt: skip


# Hand-made histories: (train loss, val loss, train acc, val acc; train numbers evaluated like val) per epoch.
CURVES = {
    "healthy": _history(
        [1.2, 0.6, 0.4, 0.3, 0.25],
        [0.8, 0.5, 0.38, 0.3, 0.27],
        [0.6, 0.8, 0.88, 0.9, 0.92],
        [0.75, 0.84, 0.88, 0.9, 0.91],
    ),
    "overfitting": _history(
        [1.0, 0.5, 0.3, 0.15, 0.05],
        [0.7, 0.5, 0.55, 0.7, 0.9],
        [0.7, 0.85, 0.92, 0.96, 0.99],
        [0.8, 0.84, 0.84, 0.83, 0.82],
    ),
    "underfitting": _history(
        [2.3, 2.2, 2.18, 2.17, 2.16],
        [2.25, 2.2, 2.19, 2.18, 2.17],
        [0.12, 0.18, 0.2, 0.21, 0.22],
        [0.15, 0.19, 0.2, 0.21, 0.21],
    ),
    "oscillating": _history(
        [1.0, 0.6, 1.1, 0.5, 1.2, 0.6],
        [0.9, 0.7, 1.0, 0.6, 1.1, 0.6],
        [0.6, 0.75, 0.6, 0.8, 0.6, 0.78],
        [0.65, 0.75, 0.62, 0.8, 0.6, 0.8],
    ),
    "plateau": _history(
        [0.9, 0.7, 0.7, 0.699, 0.698, 0.698],
        [0.75, 0.72, 0.72, 0.72, 0.72, 0.72],
        [0.7, 0.75, 0.75, 0.75, 0.75, 0.75],
        [0.74, 0.74, 0.74, 0.74, 0.74, 0.74],
    ),
    "over-regularized": _history(  # eval-mode train acc = val acc, far from fit; dropout/MixUp keep the trained acc low
        [1.5, 1.0, 0.9, 0.85],
        [1.4, 0.95, 0.88, 0.84],
        [0.55, 0.7, 0.72, 0.73],
        [0.56, 0.71, 0.72, 0.735],
        [0.3, 0.45, 0.5, 0.52],
    ),
}


@pytest.mark.parametrize("finding", list(CURVES))
def test_classify_curves(finding: str) -> None:
    result = classify_curves(CURVES[finding])
    assert result["finding"] == finding, result["evidence"]
    assert result["evidence"].endswith(".") and any(ch.isdigit() for ch in result["evidence"])
    assert bool(result["solutions"]) == (finding != "healthy")


def test_overfitting_by_accuracy_gap() -> None:
    history = _history([0.5, 0.3, 0.2], [0.55, 0.5, 0.48], [0.85, 0.95, 0.99], [0.8, 0.82, 0.83])
    result = classify_curves(history)
    assert result["finding"] == "overfitting" and "99.0%" in result["evidence"]


def test_fit_reports_the_curve_finding(tmp_path: Path) -> None:
    _, result = fit(tiny(), separable_bundle(), config(epochs=2), tmp_path)
    curves = result.diagnostics["curves"]
    assert curves == classify_curves(result.history)


# -- model files -----------------------------------------------------------------------------------------


def test_save_and_load_model_round_trip(tmp_path: Path) -> None:
    arch = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "options": {"stem": "cifar", "width_mult": 0.25}}
    torch.manual_seed(0)
    model = build_model(arch).eval()
    paths = save_model(model, arch, tmp_path / "out")
    assert paths == {"checkpoint": tmp_path / "out" / "model.pt", "arch": tmp_path / "out" / "model.json"}
    state = torch.load(paths["checkpoint"], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    loaded, loaded_arch = load_model(tmp_path / "out")
    assert loaded_arch == arch and not loaded.training
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_load_model_names_a_missing_or_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(DeploykitError, match="model.json"):
        load_model(tmp_path)
    arch = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "options": {"stem": "cifar", "width_mult": 0.25}}
    save_model(get_model("resnet18", 10, 1, stem="cifar", width_mult=0.25), arch, tmp_path)
    (tmp_path / "model.pt").write_bytes(b"not a zip file")
    with pytest.raises(DeploykitError, match="model.pt"):
        load_model(tmp_path)


def test_label_smoothing_is_not_mistaken_for_over_regularization() -> None:
    # The quickstart's shape: smoothed train loss ~0.55 against a plain val loss ~0.12, both accuracies ~99.7%.
    history = _history([1.5, 0.35, 0.15, 0.1, 0.08], [2.0, 0.3, 0.18, 0.14, 0.12], [0.4, 0.9, 0.98, 0.99, 0.997], [0.2, 0.9, 0.98, 0.99, 0.997])
    for row, smoothed in zip(history, [1.9, 0.8, 0.6, 0.57, 0.55]):
        row["train_loss"] = smoothed
    assert classify_curves(history)["finding"] == "healthy"


def _digits_cnn(width: int = 16, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width, 10),
    )  # fmt: skip


# Real runs on digits (8x8), a second or three each. healthy: label smoothing and random crops keep the trained
# loss far above val (the old diagnosis called that over-regularized); over-regularized: dropout 0.6, CutOut,
# MixUp, heavy weight decay and smoothing 0.2; overfitting: 5% of the data for training, 40 epochs, no augmentation.
DIAGNOSED_RUNS = {
    "healthy": ({"augment": {"random_crop": True, "crop_padding": 2}}, {}, 0.0,
                {"epochs": 12, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                 "loss": {"label_smoothing": 0.1}}),
    "over-regularized": ({"augment": {"cutout_size": 5}}, {"dropout": 0.6}, 0.5,
                         {"epochs": 12, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3},
                          "loss": {"label_smoothing": 0.2}}),
    "overfitting": ({"val_fraction": 0.95}, {"width": 32}, 0.0, {"epochs": 40, "batch_size": 16}),
}  # fmt: skip


@pytest.mark.parametrize("finding", list(DIAGNOSED_RUNS))
def test_real_runs_get_their_diagnosis(tmp_path: Path, finding: str) -> None:
    data, model_options, mixup, train = DIAGNOSED_RUNS[finding]
    bundle = build_datasets(DataConfig(dataset="digits", image_size=8, channels=1, **data))
    cfg = config(**({"schedule": {"name": "cosine"}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}} | train))
    _, result = fit(_digits_cnn(**model_options), bundle, cfg, tmp_path, mixup_alpha=mixup)
    assert result.diagnostics["curves"]["finding"] == finding, result.diagnostics["curves"]["evidence"]
    last = result.history[-1]
    if finding == "healthy":
        assert last["val_acc"] > 0.9 and last["train_loss"] > 2 * last["val_loss"]  # smoothing lifts the trained loss


def test_bias_before_batchnorm_is_not_flagged_as_vanishing(tmp_path: Path) -> None:
    """BatchNorm removes any per-channel constant, so the bias of a layer feeding it gets no gradient by design."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    torch.manual_seed(0)
    cfg = config(epochs=1, diagnostics={"grad_norm_every": 1})
    _, result = fit(model, separable_bundle(n_train=64), cfg, tmp_path)
    assert "2.bias" not in result.diagnostics["gradients"]["vanishing"]


def test_resuming_with_augmentation_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Augmentations are a function of (seed, epoch, sample), so a new process resumes bit-exactly."""

    def digits() -> DataBundle:  # rebuilt for each run, as a new process would
        return build_datasets(DataConfig(dataset="digits", image_size=8, channels=1, augment={"random_crop": True, "hflip": True, "crop_padding": 1}))

    def model() -> nn.Module:
        torch.manual_seed(0)
        return get_model("resnet18", 10, 1, stem="cifar", width_mult=0.25)

    cfg3, cfg2 = config(epochs=3, batch_size=128), config(epochs=2, batch_size=128)
    straight, _ = fit(model(), digits(), cfg3, tmp_path / "straight")
    fit(model(), digits(), cfg2, tmp_path / "resumed")
    resumed, result = fit(model(), digits(), cfg3, tmp_path / "resumed")
    assert result.metrics["resumed_from_epoch"] == 2
    assert max_diff(params(straight), params(resumed)) < 1e-6


@pytest.mark.parametrize("budget_s, expected", [(1e-4, 1), (1e4, 3)])
def test_a_time_budget_picks_the_epochs_before_the_schedule_is_built(tmp_path: Path, budget_s, expected) -> None:
    """A budget too small for one epoch still trains one; a huge one is capped by epochs. The schedule is built for
    what runs: its cosine reaches the end, and a resume keeps the choice instead of timing again."""
    cfg = config(epochs=3, time_budget_s=budget_s, schedule={"name": "cosine"})
    _, result = fit(tiny(), separable_bundle(), cfg, tmp_path)
    assert result.metrics["epochs_run"] == expected
    assert result.history[-1]["lr"] < 1e-6  # the cosine schedule ran to its end in the epochs chosen
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epochs"] == expected
