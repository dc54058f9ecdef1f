"""Optimizers, learning-rate schedules and losses of the training stage, checked against closed-form values."""

from __future__ import annotations

import copy
import io
import math
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.train.config import LossConfig, LossName, OptimizerConfig, OptimizerName, ScheduleConfig, ScheduleName
from deploykit.train.losses import build_loss
from deploykit.train.optim import Lion, build_optimizer, param_groups
from deploykit.train.schedules import build_schedule

LR0 = 0.1


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm([4, 2])  # a 2-d norm weight: must still skip decay
        self.layer1 = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.layer10 = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def _group_of(groups: list[dict], param: nn.Parameter) -> dict:
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group


# --- parameter groups -------------------------------------------------------------------------------------------


def test_param_groups_decay_weights_only() -> None:
    net = _Net()
    groups = param_groups(net, OptimizerConfig(lr=LR0, weight_decay=1e-3))
    for p in (net.conv.weight, net.fc.weight, net.layer1[0].weight):
        assert _group_of(groups, p)["weight_decay"] == 1e-3
    for p in (net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias, net.conv.bias, net.fc.bias):
        assert _group_of(groups, p)["weight_decay"] == 0.0
    assert [g["name"] for g in groups] == ["base/decay", "base/no_decay"]
    assert all(g["lr"] == LR0 for g in groups)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(net.frozen.weight) not in grouped and len(grouped) == sum(p.requires_grad for p in net.parameters())


def test_param_groups_decay_norm_and_bias() -> None:
    net = _Net()
    groups = param_groups(net, OptimizerConfig(weight_decay=1e-3, decay_norm_and_bias=True))
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("base/decay", 1e-3)]


def test_lr_mults_longest_prefix_wins() -> None:
    net = _Net()
    groups = param_groups(net, OptimizerConfig(lr=LR0), {"layer1": 0.1, "layer1.1": 0.5, "fc": 10.0})
    assert _group_of(groups, net.layer1[0].weight)["lr"] == pytest.approx(LR0 * 0.1)
    assert _group_of(groups, net.layer1[1].weight)["lr"] == pytest.approx(LR0 * 0.5)
    assert _group_of(groups, net.fc.weight)["name"] == "lr_x10/decay"
    assert _group_of(groups, net.fc.bias)["lr"] == pytest.approx(LR0 * 10)
    # "layer1" is a whole-component prefix: layer10 keeps the base lr.
    assert _group_of(groups, net.layer10.weight)["lr"] == LR0
    assert [g["name"] for g in groups] == [
        f"{m}/{d}" for m in ("base", "lr_x0.1", "lr_x0.5", "lr_x10") for d in ("decay", "no_decay")
    ]
    same_mult = param_groups(net, OptimizerConfig(), {"conv": 0.1, "bn": 0.1})
    assert _group_of(same_mult, net.conv.bias) is _group_of(same_mult, net.bn.weight)  # one group per multiplier


def test_lr_mults_unknown_prefix_is_an_error() -> None:
    with pytest.raises(DeploykitError, match="'head'"):
        param_groups(_Net(), OptimizerConfig(), {"head": 10.0})


# --- optimizers -------------------------------------------------------------------------------------------------

_GOOD_LR = {"sgd": 0.05, "adagrad": 0.1, "rmsprop": 0.01, "adam": 0.05, "adamw": 0.05, "lion": 0.05}


@pytest.mark.parametrize("name", typing.get_args(OptimizerName))
def test_each_optimizer_reduces_regression_loss(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) + 0.5
    model = nn.Linear(8, 1)
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=_GOOD_LR[name], weight_decay=0.0))
    first = F.mse_loss(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert F.mse_loss(model(x), y).item() < 0.2 * first


def test_nesterov_without_momentum_is_an_error() -> None:
    with pytest.raises(DeploykitError, match="momentum"):
        build_optimizer(nn.Linear(2, 2), OptimizerConfig(name="sgd", nesterov=True, momentum=0.0))
    opt = build_optimizer(nn.Linear(2, 2), OptimizerConfig(name="sgd", nesterov=True, momentum=0.9))
    assert opt.param_groups[0]["nesterov"]


def test_lion_betas_default_and_override() -> None:
    opt = build_optimizer(nn.Linear(2, 2), OptimizerConfig(name="lion"))
    assert isinstance(opt, Lion) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    opt = build_optimizer(nn.Linear(2, 2), OptimizerConfig(name="lion", betas=(0.95, 0.98)))
    assert opt.param_groups[0]["betas"] == (0.95, 0.98)


def test_lion_matches_hand_computed_steps_and_resumes() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -0.1])
    opt.step()
    # m = 0: update = sign(g) = [1, -1]; p - 0.1 (update + 0.5 p); m = 0.01 g.
    assert torch.allclose(p, torch.tensor([1 - 0.1 * (1 + 0.5), -2 - 0.1 * (-1 - 1.0)]))
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.005, -0.001]))

    twin = nn.Parameter(p.detach().clone())
    resumed = Lion([twin], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if through a checkpoint file
    for param, optimizer in ((p, opt), (twin, resumed)):
        param.grad = torch.tensor([-0.2, 0.3])
        optimizer.step()
    # 0.9 m + 0.1 g = [-0.0155, 0.0291]: the sign flips against the momentum's.
    expected = torch.tensor([0.85 * 0.95 + 0.1, -1.8 * 0.95 - 0.1])
    assert torch.allclose(p, expected) and torch.equal(p, twin)
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor([0.00295, 0.00201]))


# --- schedules --------------------------------------------------------------------------------------------------


def _lrs(cfg: ScheduleConfig, epochs: int, spe: int, optim: OptimizerConfig | None = None) -> list[float]:
    """The lr each optimizer step of the run uses."""
    opt = build_optimizer(nn.Linear(2, 2), optim or OptimizerConfig(lr=LR0))
    schedule = build_schedule(opt, cfg, epochs, spe)
    lrs = []
    for _ in range(epochs):
        for _ in range(spe):
            lrs.append(schedule.lr)
            opt.step()
            schedule.step_batch()
        schedule.step_epoch(1.0)
    return lrs


def _cosine(t: int, period: int, lr_min: float) -> float:
    return lr_min + (LR0 - lr_min) * (1 + math.cos(math.pi * t / period)) / 2


def test_constant_with_warmup() -> None:
    lrs = _lrs(ScheduleConfig(name="constant", warmup_epochs=2), epochs=4, spe=5)
    assert lrs[:10] == pytest.approx([LR0 * (t + 1) / 11 for t in range(10)])
    assert lrs[10:] == pytest.approx([LR0] * 10)
    assert _lrs(ScheduleConfig(name="constant"), epochs=2, spe=3) == pytest.approx([LR0] * 6)


@pytest.mark.parametrize(
    ("cfg", "factor"),
    [
        (ScheduleConfig(name="step", step_size=2, gamma=0.5), lambda e: 0.5 ** (e // 2)),
        (ScheduleConfig(name="multistep", milestones=[1, 4], gamma=0.1), lambda e: 0.1 ** sum(e >= m for m in (1, 4))),
        (ScheduleConfig(name="exponential", gamma=0.8), lambda e: 0.8**e),
    ],
)
def test_epoch_schedules(cfg: ScheduleConfig, factor: typing.Callable[[int], float]) -> None:
    spe = 3
    lrs = _lrs(cfg, epochs=6, spe=spe)
    assert lrs == pytest.approx([LR0 * factor(s // spe) for s in range(len(lrs))])


def test_cosine_closed_form() -> None:
    lrs = _lrs(ScheduleConfig(name="cosine", min_lr=0.01), epochs=5, spe=4)
    assert lrs == pytest.approx([_cosine(t, 20, 0.01) for t in range(20)])
    assert lrs[10] == pytest.approx((LR0 + 0.01) / 2)


def test_cosine_with_warmup() -> None:
    lrs = _lrs(ScheduleConfig(name="cosine", warmup_epochs=1.5, min_lr=0.01), epochs=5, spe=4)
    w = 6
    assert lrs[0] == pytest.approx(LR0 / (w + 1))
    assert lrs[w] == pytest.approx(LR0)
    assert lrs == pytest.approx([LR0 * (t + 1) / (w + 1) for t in range(w)] + [_cosine(t, 14, 0.01) for t in range(14)])


def test_warmup_cosine_defaults_to_one_epoch_of_warmup() -> None:
    default = _lrs(ScheduleConfig(name="warmup_cosine", min_lr=0.01), epochs=5, spe=4)
    assert default == pytest.approx(_lrs(ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=0.01), epochs=5, spe=4))
    assert default[4] == pytest.approx(LR0) and default[0] == pytest.approx(LR0 / 5)


def test_warmup_longer_than_run_or_on_a_schedule_without_warmup_is_an_error() -> None:
    opt = build_optimizer(nn.Linear(2, 2), OptimizerConfig())
    with pytest.raises(DeploykitError, match="warm-up"):
        build_schedule(opt, ScheduleConfig(name="warmup_cosine"), 1, 4)
    with pytest.raises(DeploykitError, match="warmup_epochs"):
        build_schedule(opt, ScheduleConfig(name="step", warmup_epochs=1), 3, 4)


def test_cosine_restarts_jump_back_at_t0() -> None:
    spe, t0 = 2, 4  # restart_epochs=2 -> T_0 = 4 steps, then 8 with restart_mult=2
    lrs = _lrs(ScheduleConfig(name="cosine_restarts", restart_epochs=2, restart_mult=2, min_lr=0.01), epochs=7, spe=spe)
    expected = [_cosine(t, t0, 0.01) for t in range(t0)] + [_cosine(t, 2 * t0, 0.01) for t in range(2 * t0)]
    assert lrs[: 3 * t0] == pytest.approx(expected)
    assert lrs[t0] == pytest.approx(LR0) and lrs[3 * t0] == pytest.approx(LR0) and lrs[t0 - 1] < LR0 / 2


@pytest.mark.parametrize("max_lr", [None, 0.5])
def test_onecycle_peaks_at_pct_start(max_lr: float | None) -> None:
    cfg = ScheduleConfig(name="onecycle", pct_start=0.25, max_lr=max_lr)
    lrs = _lrs(cfg, epochs=5, spe=8)
    peak = max_lr or 10 * LR0
    assert lrs[0] == pytest.approx(peak / 25)
    assert max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == round(0.25 * 40) - 1
    assert lrs[-1] < peak / 1000


def test_onecycle_scales_discriminative_groups_and_skips_momentum_without_it() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = build_optimizer(net, OptimizerConfig(lr=LR0, weight_decay=0.0), {"1": 10.0})
    build_schedule(opt, ScheduleConfig(name="onecycle", max_lr=0.5), 2, 5)
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.5, 5.0, 5.0])  # (no_)decay x mult
    assert opt.param_groups[0]["momentum"] == pytest.approx(0.95)  # cycled from max_momentum
    plain = build_optimizer(nn.Linear(2, 2), OptimizerConfig(name="sgd", momentum=0.0))
    build_schedule(plain, ScheduleConfig(name="onecycle"), 2, 5)
    assert plain.param_groups[0]["momentum"] == 0.0
    _lrs(ScheduleConfig(name="onecycle"), 2, 5, OptimizerConfig(name="adagrad"))  # no momentum to cycle: still fine


def test_inverse_sqrt_peaks_at_lr0() -> None:
    w = 8
    lrs = _lrs(ScheduleConfig(name="inverse_sqrt", warmup_epochs=2), epochs=6, spe=4)
    assert lrs[w - 1] == pytest.approx(LR0) and max(lrs) == pytest.approx(LR0)
    assert lrs == pytest.approx([LR0 * (t / w if t <= w else math.sqrt(w / t)) for t in range(1, 25)])


def test_polynomial_ends_at_min_lr() -> None:
    opt = build_optimizer(nn.Linear(2, 2), OptimizerConfig(lr=LR0))
    schedule = build_schedule(opt, ScheduleConfig(name="polynomial", power=2.0, min_lr=0.01), 3, 4)
    lrs = []
    for _ in range(12):
        lrs.append(schedule.lr)
        opt.step()
        schedule.step_batch()
    assert lrs == pytest.approx([(LR0 - 0.01) * (1 - t / 12) ** 2 + 0.01 for t in range(12)])
    assert schedule.lr == pytest.approx(0.01)


def test_plateau_reduces_after_patience_bad_epochs() -> None:
    opt = build_optimizer(nn.Linear(2, 2), OptimizerConfig(lr=LR0))
    schedule = build_schedule(opt, ScheduleConfig(name="plateau", patience=2, factor=0.5), 10, 4)
    schedule.step_batch()  # per-epoch schedule: batches do not move it
    for val_loss in (1.0, 1.0, 1.0):  # best, then `patience` bad epochs are tolerated
        schedule.step_epoch(val_loss)
        assert schedule.lr == LR0
    schedule.step_epoch(1.0)
    assert schedule.lr == pytest.approx(LR0 * 0.5)
    with pytest.raises(DeploykitError, match="validation loss"):
        schedule.step_epoch(None)


# Options that make every schedule move within a 6-epoch x 4-step run, so resuming has something to get wrong.
_RESUME_CFG = {
    "constant": {"warmup_epochs": 1},
    "step": {"step_size": 2, "gamma": 0.5},
    "multistep": {"milestones": [1, 4]},
    "cosine": {"warmup_epochs": 1, "min_lr": 0.01},
    "cosine_restarts": {"restart_epochs": 1, "restart_mult": 2, "min_lr": 0.01},
    "inverse_sqrt": {"warmup_epochs": 1},
    "plateau": {"patience": 0, "factor": 0.5},
    "polynomial": {"power": 2.0, "min_lr": 0.01},
}
_VAL_LOSSES = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85]


@pytest.mark.parametrize("name", typing.get_args(ScheduleName))
@pytest.mark.parametrize("resume_at", [3, 8])  # mid-warm-up, mid-epoch / an epoch boundary
def test_resume_continues_the_same_lr_sequence(name: str, resume_at: int) -> None:
    cfg = ScheduleConfig(name=name, **_RESUME_CFG.get(name, {}))
    optim_cfg = OptimizerConfig(name="adamw", lr=LR0)
    epochs, spe = 6, 4

    def fresh() -> tuple[torch.optim.Optimizer, typing.Any]:
        opt = build_optimizer(nn.Linear(2, 2), optim_cfg, None)
        return opt, build_schedule(opt, cfg, epochs, spe)

    def run(opt: torch.optim.Optimizer, schedule: typing.Any, steps: range) -> list[float]:
        lrs = []
        for step in steps:
            lrs.append(schedule.lr)
            opt.step()
            schedule.step_batch()
            if (step + 1) % spe == 0:
                schedule.step_epoch(_VAL_LOSSES[step // spe])
        return lrs

    opt, schedule = fresh()
    before = run(opt, schedule, range(resume_at))
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "schedule": schedule.state_dict()}, buffer)
    expected = run(opt, schedule, range(resume_at, epochs * spe))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    opt2, schedule2 = fresh()
    schedule2.load_state_dict(saved["schedule"])
    assert schedule2.lr == expected[0]  # right without the optimizer state too
    opt2.load_state_dict(saved["optimizer"])
    assert run(opt2, schedule2, range(resume_at, epochs * spe)) == expected
    assert len(set(before + expected)) > 1  # the schedule did move during the run


def test_resume_into_another_schedule_is_an_error() -> None:
    opt = build_optimizer(nn.Linear(2, 2), OptimizerConfig())
    state = build_schedule(opt, ScheduleConfig(name="cosine"), 2, 2).state_dict()
    with pytest.raises(DeploykitError, match="'cosine'"):
        build_schedule(opt, ScheduleConfig(name="polynomial"), 2, 2).load_state_dict(state)


# --- losses -----------------------------------------------------------------------------------------------------


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(6, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 1, 0])


@pytest.mark.parametrize("name", typing.get_args(LossName))
def test_loss_accepts_int_and_soft_targets(name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = batch
    loss = build_loss(LossConfig(name=name), num_classes=4)
    hard = loss(logits, target)
    # A one-hot float target is the same distribution as the class index.
    assert hard.ndim == 0 and hard.item() == pytest.approx(loss(logits, F.one_hot(target, 4).float()).item(), rel=1e-6)
    mixed = 0.7 * F.one_hot(target, 4).float() + 0.3 * F.one_hot(target.roll(1), 4).float()
    soft = loss(logits, mixed)
    soft.backward()
    assert torch.isfinite(soft) and logits.grad is not None and torch.isfinite(logits.grad).all()


def test_soft_target_values(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, _ = batch
    soft = torch.softmax(torch.randn(6, 4), dim=1)
    log_probs = F.log_softmax(logits, dim=1)
    nll = build_loss(LossConfig(name="nll"), 4)(logits, soft)
    assert nll.item() == pytest.approx(-(soft * log_probs).sum(1).mean().item())
    assert build_loss(LossConfig(), 4)(logits, soft).item() == pytest.approx(nll.item())
    assert build_loss(LossConfig(name="mse"), 4)(logits, soft).item() == pytest.approx(F.mse_loss(logits, soft).item())
    kl = build_loss(LossConfig(name="kl_div"), 4)(logits, soft)
    assert kl.item() == pytest.approx(((soft * (soft.log() - log_probs)).sum() / 6).item())


def test_label_smoothing(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    logits, target = batch
    smoothed = build_loss(LossConfig(label_smoothing=0.1), 4)(logits, target)
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits, target, label_smoothing=0.1).item())
    log_probs = F.log_softmax(logits, dim=1)
    by_hand = 0.9 * F.nll_loss(log_probs, target) - 0.1 * log_probs.mean(dim=1).mean()
    assert smoothed.item() == pytest.approx(by_hand.item())
    assert smoothed.item() != pytest.approx(build_loss(LossConfig(), 4)(logits, target).item())
    with pytest.raises(DeploykitError, match="label_smoothing"):
        build_loss(LossConfig(name="mse", label_smoothing=0.1), 4)


def test_perfect_predictions() -> None:
    target = torch.tensor([2, 0, 1])
    one_hot = F.one_hot(target, 3).float()
    for name in ("mse", "l1", "smooth_l1", "huber"):
        assert build_loss(LossConfig(name=name), 3)(one_hot, target).item() == 0.0
    confident = 50 * one_hot
    for name in ("cross_entropy", "nll", "kl_div"):
        assert build_loss(LossConfig(name=name), 3)(confident, target).item() == pytest.approx(0.0, abs=1e-6)
    bce = build_loss(LossConfig(name="bce_with_logits"), 3)(confident * 2 - 50, target)
    assert bce.item() == pytest.approx(0.0, abs=1e-6)
