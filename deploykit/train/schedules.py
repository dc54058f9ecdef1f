"""Learning-rate schedules: torch's schedulers behind one interface the training loop steps per batch and per epoch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim import lr_scheduler as sched

from deploykit.errors import DeploykitError
from deploykit.train.config import ScheduleConfig

Unit = Literal["batch", "epoch", "plateau"]

# Schedules defined per epoch in the cheat sheet; everything else moves every optimizer step.
_EPOCH_SCHEDULES = {"step", "multistep", "exponential"}
_WARMUP_SCHEDULES = {"constant", "cosine", "warmup_cosine", "inverse_sqrt"}


class LRSchedule:
    """A torch scheduler plus when it moves: after every optimizer step ("batch"), every epoch, or on val_loss."""

    def __init__(self, name: str, optimizer: Optimizer, scheduler: sched.LRScheduler, unit: Unit) -> None:
        self.name, self._optimizer, self._scheduler, self._unit = name, optimizer, scheduler, unit

    def step_batch(self) -> None:
        """Call after every optimizer step."""
        if self._unit == "batch":
            self._scheduler.step()

    def step_epoch(self, val_loss: float | None = None) -> None:
        """Call at the end of every epoch; the plateau schedule needs the epoch's validation loss."""
        if self._unit == "epoch":
            self._scheduler.step()
        elif self._unit == "plateau":
            if val_loss is None:
                raise DeploykitError(
                    "The plateau schedule needs a validation loss every epoch; provide a validation split "
                    "or choose another schedule.name."
                )
            self._scheduler.step(val_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scheduler": self._scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise DeploykitError(
                f"The checkpoint's learning-rate schedule is {state.get('name')!r} but this run uses {self.name!r}; "
                "resume with the same schedule.name or start a fresh run."
            )
        self._scheduler.load_state_dict(state["scheduler"])
        # torch schedulers do not touch the optimizer on load; write the lr back so resuming does not depend on
        # whether (or in which order) the optimizer state is loaded too.
        for group, lr in zip(self._optimizer.param_groups, self._scheduler.get_last_lr(), strict=True):
            group["lr"] = lr

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        return float(self._optimizer.param_groups[0]["lr"])


def build_schedule(optimizer: Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int) -> LRSchedule:
    """Build `cfg.name` for a run of `epochs` x `steps_per_epoch` optimizer steps.

    warmup_cosine with warmup_epochs = 0 warms up for one epoch (a warm-up is the point of choosing it).
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise DeploykitError(
            f"A learning-rate schedule needs at least one epoch and one step per epoch (got {epochs} epochs of "
            f"{steps_per_epoch} steps); check train.epochs and that the training split is not empty."
        )
    if cfg.warmup_epochs > 0 and cfg.name not in _WARMUP_SCHEDULES:
        raise DeploykitError(
            f"schedule.warmup_epochs has no effect on the {cfg.name!r} schedule; set it to 0 or use one of "
            f"{', '.join(sorted(_WARMUP_SCHEDULES))}."
        )
    total = epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.name == "warmup_cosine" and cfg.warmup_epochs == 0:
        warmup = steps_per_epoch

    def batch(scheduler: sched.LRScheduler) -> LRSchedule:
        return LRSchedule(cfg.name, optimizer, scheduler, "batch")

    def epoch(scheduler: sched.LRScheduler) -> LRSchedule:
        return LRSchedule(cfg.name, optimizer, scheduler, "epoch")

    match cfg.name:
        case "constant":
            return batch(_with_warmup(optimizer, sched.ConstantLR(optimizer, factor=1.0), warmup))
        case "step":
            return epoch(sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma))
        case "multistep":
            return epoch(sched.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma))
        case "exponential":
            return epoch(sched.ExponentialLR(optimizer, gamma=cfg.gamma))
        case "cosine" | "warmup_cosine":
            if warmup >= total:
                raise DeploykitError(
                    f"The {warmup}-step warm-up leaves no steps for the cosine decay in a {total}-step run; "
                    "lower schedule.warmup_epochs or raise train.epochs."
                )
            cosine = sched.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=cfg.min_lr)
            return batch(_with_warmup(optimizer, cosine, warmup))
        case "cosine_restarts":
            # T_0 in steps, stepped per batch: the same curve as T_0 in epochs stepped with fractional epochs.
            return batch(
                sched.CosineAnnealingWarmRestarts(
                    optimizer, T_0=cfg.restart_epochs * steps_per_epoch, T_mult=cfg.restart_mult, eta_min=cfg.min_lr
                )
            )
        case "onecycle":
            return batch(_one_cycle(optimizer, cfg, total))
        case "inverse_sqrt":
            return batch(_per_group_lambda(optimizer, _inverse_sqrt(max(1, warmup))))
        case "plateau":
            return LRSchedule(
                cfg.name,
                optimizer,
                sched.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.factor, patience=cfg.patience),
                "plateau",
            )
        case "polynomial":
            return batch(_per_group_lambda(optimizer, _polynomial(total, cfg.power, cfg.min_lr)))
    raise AssertionError(f"unhandled schedule {cfg.name}")  # ScheduleName and this match must stay in sync


def _with_warmup(optimizer: Optimizer, main: sched.LRScheduler, warmup: int) -> sched.LRScheduler:
    """Prefix `main` with a linear warm-up: step t (from 0) uses lr0 (t + 1) / (warmup + 1), so lr0 at t = warmup."""
    if warmup == 0:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=1.0 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def _one_cycle(optimizer: Optimizer, cfg: ScheduleConfig, total: int) -> sched.OneCycleLR:
    """OneCycleLR peaking at cfg.max_lr (default 10x the lr); discriminative lr multipliers scale each group's peak."""
    max_lrs = []
    for group in optimizer.param_groups:
        mult = group.get("lr_mult", 1.0)
        max_lrs.append((cfg.max_lr or 10 * group["lr"] / mult) * mult)
    # Momentum cycling is part of the policy, but must not switch momentum on for plain SGD/RMSprop or Adagrad.
    defaults = optimizer.defaults
    cycle_momentum = "betas" in defaults or defaults.get("momentum", 0.0) > 0
    return sched.OneCycleLR(
        optimizer, max_lr=max_lrs, total_steps=total, pct_start=cfg.pct_start, cycle_momentum=cycle_momentum
    )


LrFormula = Callable[[int, float], float]  # (optimizer step from 0, group's base lr) -> lr


def _per_group_lambda(optimizer: Optimizer, formula: LrFormula) -> sched.LambdaLR:
    """LambdaLR from an absolute-lr formula, one lambda per group since LambdaLR wants a multiplier of each base lr."""
    lambdas = [
        lambda step, base=group.get("initial_lr", group["lr"]): formula(step, base) / base
        for group in optimizer.param_groups
    ]
    return sched.LambdaLR(optimizer, lambdas)


def _inverse_sqrt(warmup: int) -> LrFormula:
    """Transformer warm-up, lr(t) = lr0 x min(t^-0.5, t x w^-1.5) x sqrt(w), t = step + 1.

    The extra sqrt(w) makes the peak (at t = w) equal the configured lr, followed by lr0 x sqrt(w / t); the cheat
    sheet's unnormalised formula would peak at lr0 / sqrt(w).
    """

    def formula(step: int, base: float) -> float:
        t = step + 1
        return base * min(t**-0.5, t * warmup**-1.5) * math.sqrt(warmup)

    return formula


def _polynomial(total: int, power: float, min_lr: float) -> LrFormula:
    """(lr0 - min_lr)(1 - t/T)^power + min_lr; torch's PolynomialLR has no floor, hence a lambda."""

    def formula(step: int, base: float) -> float:
        return (base - min_lr) * (1 - min(step, total) / total) ** power + min_lr

    return formula
