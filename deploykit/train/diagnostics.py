"""The advanced cheat sheet's debugging patterns, run during and after training.

- `GradientMonitor`: per-layer gradient L2 norms, flagging exploding (> explode_threshold) and vanishing
  (< vanish_threshold) layers, as in "Gradient Flow Issues".
- `TrainingDiverged`: a NaN/Inf loss stops training at once ("NaN loss" row).
- `classify_curves`: reads the epoch history against the "Loss and Accuracy Patterns" table.
- `val_loss_spike`: a validation loss that jumps 10x between two epochs early in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.train.config import DiagnosticsConfig

GRADIENT_SOLUTIONS = {
    "exploding": ["gradient clipping (train.grad_clip_norm)", "lower learning rate"],
    "vanishing": ["residual connections", "proper initialization"],
}

CURVE_SOLUTIONS: dict[str, list[str]] = {
    "overfitting": [
        "add regularization (dropout, weight decay)",
        "get more data or augment it",
        "reduce model complexity",
        "use early stopping on the validation loss",
    ],
    "underfitting": [
        "add model capacity (layers/parameters)",
        "try a 10x higher learning rate",
        "train for more epochs",
        "inspect the data quality",
        "check that the architecture suits the task",
    ],
    "oscillating": ["lower the learning rate", "add momentum"],
    "plateau": [
        "use warm restarts (schedule cosine_restarts)",
        "use learning-rate scheduling or a higher learning rate",
    ],
    "over-regularized": ["reduce regularization (dropout, weight decay, label smoothing, MixUp)"],
    "healthy": [],
}

SPIKE_FACTOR = 10.0  # a val loss this many times the epoch before's is a spike
SPIKE_EARLY = 0.5  # ... looked for in this first fraction of the epochs (warm-up and peak learning rate)
SPIKE_SOLUTIONS = [
    "lengthen the warm-up (train.schedule.warmup_epochs, e.g. 1-2 epochs)",
    "lower the peak learning rate",
    "clip gradients (train.grad_clip_norm, e.g. 2.0)",
]

# classify_curves thresholds: relative changes unless noted.
OVERFIT_RISE = 0.10  # val loss this far above its minimum, while train loss kept falling
OVERFIT_ACC_GAP = 0.10  # train accuracy above val accuracy by this much (absolute)
OSCILLATION_STEP = 0.10  # a move of the loss counted as large
OSCILLATION_REVERSALS = 3  # direction changes among large moves
OVERREG_FIT_GAP = 0.03  # clean train accuracy at most this far above val accuracy: no sign of fitting the train set
OVERREG_TRAIN_MODE_GAP = 0.10  # accuracy as trained (dropout, augmentation, MixUp) this far below clean train accuracy
UNDERFIT_ACC = 0.50  # final train accuracy below this
PLATEAU_GAIN = 0.01  # best improvement of the train loss over the last third of training
CONVERGED_ACC = 0.98  # a flat loss at this train accuracy is convergence, not a plateau


class TrainingDiverged(DeploykitError):
    """The loss became NaN or Inf; training stopped at once and wrote no final model."""

    def __init__(
        self, loss: float, epoch: int, batch: int, num_batches: int, step: int, lr: float, grad_clip_norm: float | None
    ) -> None:
        self.epoch, self.batch, self.step = epoch, batch, step
        clip = f"lower grad_clip_norm (now {grad_clip_norm:g})" if grad_clip_norm else "set grad_clip_norm"
        super().__init__(
            f"Loss became {loss} at epoch {epoch}, batch {batch} of {num_batches} (optimizer step {step}): "
            f"lower the learning rate (now {lr:.3g}), {clip}, or check the input data for NaN/Inf."
        )


class GradientMonitor:
    """Checks per-parameter gradient norms on the first optimizer step and every `grad_norm_every` steps after.

    For each flagged parameter it keeps the extreme norm, the first and last flagged step and a count, and
    logs one warning per parameter the first time it is flagged.
    """

    def __init__(self, cfg: DiagnosticsConfig, log: Callable[[str], None]) -> None:
        self.cfg, self._log = cfg, log
        self.flags: dict[str, dict[str, dict[str, float | int]]] = {"exploding": {}, "vanishing": {}}
        self.checks = 0

    def due(self, step: int) -> bool:
        """`step` counts optimizer steps from 1."""
        return step == 1 or step % self.cfg.grad_norm_every == 0

    @torch.no_grad()
    def check(self, model: nn.Module, step: int, skip_nonfinite: bool = False) -> None:
        """Flag layers by the norms of their current (unscaled) gradients; frozen or unused parameters are ignored.

        skip_nonfinite: under fp16 loss scaling an Inf gradient is an overflow the scaler handles, not a flag.
        """
        named = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
        if not named:
            return
        norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for _, g in named]).tolist()
        self.checks += 1
        for (name, grad), norm in zip(named, norms, strict=True):
            if skip_nonfinite and not math.isfinite(norm):
                continue
            if not norm <= self.cfg.explode_threshold:  # NaN counts as exploding
                self._flag("exploding", name, norm, step, max)
            # Only weights can vanish meaningfully: a bias feeding (through linear layers) into a BatchNorm has an
            # exactly zero gradient, since the norm subtracts any per-channel constant (EfficientNet's projections).
            elif norm < self.cfg.vanish_threshold and grad.dim() > 1:
                self._flag("vanishing", name, norm, step, min)

    def _flag(self, kind: str, name: str, norm: float, step: int, extreme: Callable[[float, float], float]) -> None:
        key = "max_norm" if kind == "exploding" else "min_norm"
        entry = self.flags[kind].get(name)
        if entry is None:
            self.flags[kind][name] = {key: norm, "first_step": step, "last_step": step, "count": 1}
            self._log(
                f"[yellow]warning:[/yellow] {kind} gradient in {name} (norm {norm:.3g} at step {step}): "
                f"try {' or '.join(GRADIENT_SOLUTIONS[kind])}."
            )
            return
        entry[key] = extreme(entry[key], norm)
        entry["last_step"] = step
        entry["count"] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "exploding": self.flags["exploding"],
            "vanishing": self.flags["vanishing"],
            "solutions": {kind: GRADIENT_SOLUTIONS[kind] for kind in self.flags if self.flags[kind]},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"flags": self.flags, "checks": self.checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flags, self.checks = state["flags"], state["checks"]


@dataclass(frozen=True)
class _Curves:
    """What the checks read: eval-mode loss curves, final eval-mode accuracies, and the final accuracy as trained."""

    train_loss: list[float]
    val_loss: list[float]
    train_acc: float
    val_acc: float
    trained_acc: float


def classify_curves(history: list[dict]) -> dict[str, Any]:
    """Name the pattern of a run's curves: overfitting, underfitting, oscillating, plateau, over-regularized or healthy.

    `history` holds one dict per epoch with train_loss/train_acc as trained, train_eval_loss/train_eval_acc (part
    of the train split evaluated exactly like val: eval mode, no augmentation, plain cross-entropy), val_loss and
    val_acc. Train and val are compared through the eval-mode numbers only: the training loss carries label
    smoothing, a distillation term, dropout and augmentation, so it sits above the val loss in a healthy run.
    Checks run in the order oscillating, overfitting, over-regularized, underfitting, plateau; the first that
    fires wins. Returns {"finding", "evidence" (one sentence with the numbers), "solutions" (cheat sheet)}.
    """
    if not history:
        return _finding("healthy", "No epochs were run, so there is nothing to judge.")
    curves = _Curves(
        train_loss=[h["train_eval_loss"] for h in history],
        val_loss=[h["val_loss"] for h in history],
        train_acc=history[-1]["train_eval_acc"],
        val_acc=history[-1]["val_acc"],
        trained_acc=history[-1]["train_acc"],
    )
    for check in (_oscillating, _overfitting, _over_regularized, _underfitting, _plateau):
        found = check(curves)
        if found is not None:
            return found
    tl, vl = curves.train_loss, curves.val_loss
    return _finding(
        "healthy",
        f"Train loss (evaluated like val) went from {tl[0]:.3g} to {tl[-1]:.3g} and val loss from {vl[0]:.3g} to "
        f"{vl[-1]:.3g} (train acc {curves.train_acc:.1%}, val acc {curves.val_acc:.1%}) without a warning sign.",
    )


def _finding(finding: str, evidence: str) -> dict[str, Any]:
    return {"finding": finding, "evidence": evidence, "solutions": CURVE_SOLUTIONS[finding]}


def _reversals(losses: list[float]) -> int:
    """Direction changes among large relative moves of a loss curve."""
    moves = [(b - a) / max(abs(a), 1e-12) for a, b in zip(losses, losses[1:])]
    signs = [m > 0 for m in moves if abs(m) > OSCILLATION_STEP]
    return sum(a != b for a, b in zip(signs, signs[1:]))


def _oscillating(c: _Curves) -> dict[str, Any] | None:
    for name, losses in (("train", c.train_loss), ("val", c.val_loss)):
        n = _reversals(losses)
        # Bumps on the way down that end at the curve's minimum are noise of a converging run, not instability.
        unsettled = losses[-1] > min(losses) * (1 + OSCILLATION_STEP)
        if n >= OSCILLATION_REVERSALS and unsettled:
            return _finding(
                "oscillating",
                f"The {name} loss changed direction {n} times by more than {OSCILLATION_STEP:.0%} "
                f"(between {min(losses):.3g} and {max(losses):.3g}) and ends at {losses[-1]:.3g}, above its minimum.",
            )
    return None


def _overfitting(c: _Curves) -> dict[str, Any] | None:
    tl, vl, ta, va = c.train_loss, c.val_loss, c.train_acc, c.val_acc
    best = min(range(len(vl)), key=vl.__getitem__)
    if vl[-1] > vl[best] * (1 + OVERFIT_RISE) and tl[-1] < tl[best]:
        return _finding(
            "overfitting",
            f"Val loss rose from its minimum {vl[best]:.3g} (epoch {best + 1}) to {vl[-1]:.3g} while train loss "
            f"kept falling from {tl[best]:.3g} to {tl[-1]:.3g}.",
        )
    if ta - va > OVERFIT_ACC_GAP:
        return _finding("overfitting", f"Train accuracy {ta:.1%} is {ta - va:.1%} above val accuracy {va:.1%}.")
    return None


def _over_regularized(c: _Curves) -> dict[str, Any] | None:
    # Regularization that holds a model back shows as a train split it cannot fit even when evaluated cleanly
    # (no better than val, short of convergence) while the regularized task it trains on scores far lower.
    ta, va, ra = c.train_acc, c.val_acc, c.trained_acc
    if ta - va <= OVERREG_FIT_GAP and ta < CONVERGED_ACC and ta - ra > OVERREG_TRAIN_MODE_GAP:
        return _finding(
            "over-regularized",
            f"Evaluated like val, the model scores only {ta:.1%} on its own training images (val {va:.1%}), and "
            f"{ra:.1%} under the training-time regularization (dropout, augmentation, MixUp): it is held back from "
            "fitting the data it trains on.",
        )
    return None


def _underfitting(c: _Curves) -> dict[str, Any] | None:
    tl, ta = c.train_loss, c.train_acc
    if ta >= UNDERFIT_ACC:
        return None
    half = tl[len(tl) // 2]
    gain = (half - tl[-1]) / max(abs(half), 1e-12)
    trend = "barely decreasing" if gain < 0.1 else "still falling, so more epochs may help"
    return _finding(
        "underfitting",
        f"Train accuracy is only {ta:.1%} with train loss {tl[-1]:.3g}, {trend} "
        f"({gain:.0%} lower over the second half).",
    )


def _plateau(c: _Curves) -> dict[str, Any] | None:
    tl, ta = c.train_loss, c.train_acc
    if len(tl) < 3 or ta >= CONVERGED_ACC:
        return None
    start = len(tl) - max(2, len(tl) // 3)
    gain = (tl[start] - min(tl[start:])) / max(abs(tl[start]), 1e-12)
    if gain < PLATEAU_GAIN:
        return _finding(
            "plateau",
            f"Train loss improved only {gain:.2%} over the last {len(tl) - start} epochs (from {tl[start]:.3g}), "
            f"at {ta:.1%} train accuracy.",
        )
    return None


def val_loss_spike(history: list[dict], epochs: int, chance_loss: float | None = None) -> dict[str, Any] | None:
    """The first epoch, in the first half of an `epochs`-long run, whose val loss is 10x the epoch before's (the
    first epoch's: 10x `chance_loss`, a classifier's ln(classes), when given); or None.

    Under a high learning rate the weights move faster than BatchNorm's running statistics follow: evaluation (eval
    mode, running statistics) breaks while training (batch statistics) goes on. When the training loss did not
    jump alike, the evidence says that is the likely cause.
    """
    start = [{"epoch": 0, "val_loss": chance_loss, "train_loss": chance_loss}] if chance_loss else []
    rows = start + [h for h in history if h["epoch"] <= max(2, math.ceil(SPIKE_EARLY * epochs))]
    for before, row in zip(rows, rows[1:]):
        if row["val_loss"] < SPIKE_FACTOR * before["val_loss"]:
            continue
        was = "chance level" if before["epoch"] == 0 else f"epoch {before['epoch']}"
        train_jumped = row["train_loss"] >= 2.0 * before["train_loss"]
        cause = (
            f"and the training loss jumped too ({before['train_loss']:.3g} -> {row['train_loss']:.3g}): the learning "
            "rate is too high for this model"
            if train_jumped
            else f"while the training loss stayed at {row['train_loss']:.3g}: BatchNorm's running statistics lag "
            "weights that a high learning rate moves fast"
        )
        return {
            "finding": "val loss spike",
            "epoch": row["epoch"],
            "evidence": f"Val loss at epoch {row['epoch']} was {row['val_loss'] / before['val_loss']:.0f}x {was}'s "
            f"({before['val_loss']:.3g} -> {row['val_loss']:.3g}) {cause}.",
            "solutions": SPIKE_SOLUTIONS,
        }
    return None
