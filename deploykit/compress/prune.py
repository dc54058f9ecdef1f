"""Pruning: structured channel pruning with torch-pruning's DepGraph (to a channel ratio or a MAC/parameter
budget), global unstructured magnitude pruning, BatchNorm re-estimation and a CPU latency probe.

Structured pruning removes whole channels, so the model really gets smaller and faster. Unstructured pruning
only zeroes weights: a dense file still stores the zeros and dense CPU kernels still multiply by them, so it
saves nothing until a sparse format or kernel exploits it.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from deploykit.errors import DeploykitError

ImportanceName = Literal["l1", "l2", "bn_scale", "taylor"]
GradientFn = Callable[[nn.Module], None]  # fills the .grad of a model's parameters (Taylor importance reads them)

_IMPORTANCE: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn_scale": tp.importance.BNScaleImportance,
    "taylor": tp.importance.TaylorImportance,
}
_RATIO_STEP = 0.05  # budget search: the channel ratio grows by this until the budget is met...
_REFINE_STEPS = 3  # ...then this many bisections between the last miss and the first hit narrow it down
_MAX_RATIO = 0.95
_PRUNABLE = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Budget:
    """A structured-pruning goal: prune until measure(model) <= target; `what` names the measure in messages."""

    measure: Callable[[nn.Module], int]
    target: float
    what: str = "MACs"


def head_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Linear layers producing class scores: pruning their outputs would change the number of classes."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def taylor_gradients(batches: list[tuple[Tensor, Tensor]]) -> GradientFn:
    """A GradientFn accumulating the cross-entropy gradients of fixed batches, in eval mode (BN stats untouched)."""

    def fill(model: nn.Module) -> None:
        model.eval()
        model.zero_grad(set_to_none=True)
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()

    return fill


def prune_structured(
    model: nn.Module,
    example_inputs: Tensor,
    *,
    importance: ImportanceName,
    num_classes: int,
    round_to: int,
    steps: int = 1,
    ratio: float | None = None,
    budget: Budget | None = None,
    gradients: GradientFn | None = None,
) -> tuple[nn.Module, list[float]]:
    """Remove channels to a channel `ratio` or a `budget`, in `steps` steps; returns the model and the step ratios.

    The classifier keeps num_classes outputs and the input conv its input channels (DepGraph never prunes the
    model input). A pruned layer keeps a multiple of round_to channels, rounded down, so even a small ratio
    takes a narrow layer down a whole multiple; a layer that would round to 0 is left whole. With a ratio the
    step ratios are torch-pruning's cumulative schedule (fractions of the original channels) and the pruned
    model is `model` itself; with a budget each step's ratio is a fraction of the channels the previous step
    left, and the model is a pruned copy. `gradients` is required for Taylor importance and runs before every
    step, so each step scores the channels that are left.
    """
    if (ratio is None) == (budget is None):
        raise ValueError("pass exactly one of ratio and budget")
    if importance == "taylor" and gradients is None:
        raise ValueError("Taylor importance needs a gradients function")
    prepare = gradients if importance == "taylor" else None
    if ratio is not None:
        pruner = _pruner(model, example_inputs, importance, ratio, num_classes, round_to, steps)
        for _ in range(steps):
            if prepare:
                prepare(model)
            pruner.step()
        model.zero_grad(set_to_none=True)
        return model, [ratio * (k + 1) / steps for k in range(steps)]
    start, ratios = budget.measure(model), []
    for k in range(1, steps + 1):
        # Equal shares of the budget per step: each step's ratio is relative to the channels left by the last.
        goal = start - (start - budget.target) * k / steps
        if prepare:
            prepare(model)
        model, step_ratio = _smallest_ratio_meeting(
            model, example_inputs, importance, num_classes, round_to, budget, goal
        )
        ratios.append(step_ratio)
    return model, ratios


def _pruner(
    model: nn.Module, example_inputs: Tensor, importance: str, ratio: float, num_classes: int, round_to: int, steps: int
) -> tp.pruner.MetaPruner:
    return tp.pruner.MetaPruner(
        model,
        example_inputs,
        importance=_IMPORTANCE[importance](),
        pruning_ratio=ratio,
        iterative_steps=steps,
        round_to=round_to,
        ignored_layers=head_layers(model, num_classes),
    )


def _pruned_copy(
    model: nn.Module, example_inputs: Tensor, importance: str, num_classes: int, round_to: int, ratio: float
) -> nn.Module:
    trial = copy.deepcopy(model)
    for mine, theirs in zip(model.parameters(), trial.parameters()):  # deepcopy leaves .grad behind
        theirs.grad = None if mine.grad is None else mine.grad.clone()
    _pruner(trial, example_inputs, importance, ratio, num_classes, round_to, 1).step()
    trial.zero_grad(set_to_none=True)
    return trial


def _smallest_ratio_meeting(
    model: nn.Module,
    example_inputs: Tensor,
    importance: str,
    num_classes: int,
    round_to: int,
    budget: Budget,
    goal: float,
) -> tuple[nn.Module, float]:
    """The pruned copy of `model` at (about) the lowest channel ratio whose measure is at or under `goal`.

    The ratio rises step by step rather than by bisection over the whole range: with round_to, a layer whose
    rounded count would reach 0 is left whole, so very high ratios can prune *less* than moderate ones.
    """

    def trial(ratio: float) -> nn.Module:
        return _pruned_copy(model, example_inputs, importance, num_classes, round_to, ratio)

    miss, hit, best = 0.0, None, None
    for k in range(1, round(_MAX_RATIO / _RATIO_STEP) + 1):
        ratio = k * _RATIO_STEP
        candidate = trial(ratio)
        if budget.measure(candidate) <= goal:
            hit, best = ratio, candidate
            break
        miss = ratio
    if best is None:
        raise DeploykitError(
            f"Structured pruning cannot bring the model down to {goal:,.0f} {budget.what}: even removing up to "
            f"{_MAX_RATIO:.0%} of every prunable layer's channels leaves more, so raise the target ratio or lower "
            "round_to."
        )
    for _ in range(_REFINE_STEPS):
        middle = (miss + hit) / 2
        candidate = trial(middle)
        if budget.measure(candidate) <= goal:
            hit, best = middle, candidate
        else:
            miss = middle
    return best, hit


def prune_unstructured(model: nn.Module, sparsity: float) -> None:
    """Mask the `sparsity` fraction of smallest-|w| Conv2d/Linear weights, ranked across the whole model.

    The masks stay as forward pre-hooks (weight = weight_orig * weight_mask), so fine-tuning cannot regrow
    pruned weights; call remove_masks afterwards to make the zeros permanent and the state_dict plain again.
    """
    targets = [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE)]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)


def remove_masks(model: nn.Module) -> None:
    """Fold every pruning mask into its weight (weight_orig/weight_mask become a plain `weight`)."""
    for module in model.modules():
        if torch_prune.is_pruned(module) and hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero entries over all Conv2d/Linear weights."""
    weights = [m.weight for m in model.modules() if isinstance(m, _PRUNABLE)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, max_batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics from up to max_batches forward passes; returns the count.

    Pruning changes the activations each BatchNorm sees, so its stored mean/var go stale. momentum=None makes
    the estimate a plain cumulative average over the batches instead of an exponential one biased to the last.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or max_batches == 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for x, *_ in itertools.islice(batches, max_batches):
        model(x)
        seen += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return seen


@torch.inference_mode()
def cpu_latency_ms(
    models: dict[str, nn.Module], input_shape: tuple[int, ...], runs: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Median eager latency in ms per model on one CPU thread, the models timed in turns.

    Alternating the models spreads a noisy neighbour's load over all of them, so their ratio stays meaningful.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.zeros(input_shape)
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                model(x)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(runs):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}
