"""Pruning: structured channel pruning with torch-pruning's DepGraph (to a channel ratio or a MAC/parameter
budget), global unstructured magnitude pruning, BatchNorm re-estimation and a CPU latency probe.

Structured pruning removes whole channels, so the model really gets smaller and faster. Unstructured pruning
only zeroes weights: a dense file still stores the zeros and dense CPU kernels still multiply by them, so it
saves nothing until a sparse format or kernel exploits it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from deploykit.errors import DeploykitError

ImportanceName = Literal["l1", "l2", "bn_scale", "taylor"]
T = TypeVar("T")
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
_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)  # the layers whose output channels torch-pruning removes
_MAX_CULPRITS = 5  # a failed pruning names at most this many layers to ignore


@dataclass(frozen=True)
class Budget:
    """A structured-pruning goal: prune until measure(model) <= target; `what` names the measure in messages."""

    measure: Callable[[nn.Module], int]
    target: float
    what: str = "MACs"


@dataclass(frozen=True)
class _Setup:
    """What every pruning of one model shares: how to prune, what to keep, and what the output must look like."""

    example_inputs: Tensor
    importance: str
    round_to: int
    keep: tuple[str, ...]  # module names torch-pruning must not take output channels from
    num_classes: int | None
    roots: tuple[str, ...]  # the Conv/Linear layers in the order the forward runs them
    output_shapes: tuple[torch.Size, ...]


class _OutputChanged(Exception):
    """The pruned model runs but its output no longer has the unpruned model's shape."""


def head_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Linear layers producing class scores: pruning their outputs would change the number of classes."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def _tensors(out: object) -> list[Tensor]:
    """The tensors in a model output (a tensor, or lists, tuples and dicts of them)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def _trace(model: nn.Module, example_inputs: Tensor) -> tuple[list[str], list[str], tuple[torch.Size, ...]]:
    """One eval-mode forward: (the output layers, every Conv/Linear in execution order, the output shapes).

    The output layers are the Conv/Linear layers whose output channels become the model's output: a hook
    records the autograd node each layer's output hangs from, then a walk back from the output through the
    autograd graph stops every branch at the first such node. Those are exactly the layers with no other
    Conv/Linear between them and the output (whatever lies between: activations, norms, pooling, upsampling,
    flatten, branch sums and concatenations), whether the model is a classifier ending in a Linear, a U-Net
    ending in a 1x1 conv to the classes, or a conv followed by global pooling; several heads all count. "The
    last layer run" would miss a head that is not last, and "as many channels as the output" would also catch
    inner layers that happen to be as wide. Keeping one layer too many only keeps channels, never breaks.
    """
    names = {id(m): name for name, m in model.named_modules() if isinstance(m, _ROOTS)}
    order: list[str] = []
    made: dict[object, str] = {}  # autograd node -> the layer whose output it is

    def record(module: nn.Module, _args: object, out: object) -> None:
        name = names[id(module)]
        if name not in order:
            order.append(name)
        if isinstance(out, Tensor) and out.grad_fn is not None:
            made[out.grad_fn] = name

    hooks = [m.register_forward_hook(record) for m in model.modules() if id(m) in names]
    was_training = model.training
    x = example_inputs.detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)  # a graph from the input even where every parameter is frozen
    try:
        model.eval()
        with torch.enable_grad():
            outputs = _tensors(model(x))
    except Exception as exc:
        raise DeploykitError(
            f"The model fails on an example input of shape {list(example_inputs.shape)} before pruning "
            f"({_what(exc)}): make its forward accept that shape."
        ) from exc
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    found, seen = [], set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in made:
            found.append(made[node])
        else:
            stack.extend(parent for parent, _ in node.next_functions if parent is not None)
    if not found and order:
        found = [order[-1]]  # no autograd graph (a forward under no_grad): the last layer run is the best guess
    return sorted(set(found), key=order.index), order, tuple(t.shape for t in outputs)


def _check_ignored(model: nn.Module, ignored_layers: Sequence[str]) -> None:
    """Every name in ignored_layers is a module of the model; else one sentence with the closest names."""
    modules = [name for name, _ in model.named_modules() if name]
    known = set(modules)
    for name in ignored_layers:
        if name in known:
            continue
        close = difflib.get_close_matches(name, modules, n=3, cutoff=0.6)
        hint = (
            f"did you mean {' or '.join(repr(c) for c in close)}?"
            if close
            else f"name one of its modules, such as {', '.join(repr(n) for n in modules[:5])}."
        )
        raise DeploykitError(f"ignored_layers names {name!r}, which is not a module of the model: {hint}")


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
    round_to: int,
    num_classes: int | None = None,
    steps: int = 1,
    ratio: float | None = None,
    budget: Budget | None = None,
    gradients: GradientFn | None = None,
    ignored_layers: Sequence[str] = (),
) -> tuple[nn.Module, list[float]]:
    """Remove channels to a channel `ratio` or a `budget`, in `steps` steps; returns the model and the step ratios.

    The layers that produce the model's output keep their output channels (see _trace), so the output keeps
    its shape, and the input conv keeps its input channels (DepGraph never prunes the model input); with
    num_classes, every Linear with that many outputs is kept as well. `ignored_layers` names more modules
    to keep whole the same way: their output channels and those of everything inside them, and with them every
    channel DepGraph couples to those (a residual sum, a multiply), while their input channels may still
    shrink with the layer feeding them. A pruned layer keeps a multiple of round_to channels, rounded down,
    so even a small ratio takes a narrow layer down a whole multiple; a layer that would round to 0 is left
    whole. With a ratio the step ratios are torch-pruning's cumulative schedule (fractions of the original
    channels) and the pruned model is `model` itself; with a budget each step's ratio is a fraction of the
    channels the previous step left, and the model is a pruned copy. `gradients` is required for Taylor
    importance and runs before every step, so each step scores the channels that are left. A pruning that
    fails inside torch-pruning, or leaves a model that no longer runs or changes its output's shape, is a
    DeploykitError naming the layers to add to ignored_layers.
    """
    if (ratio is None) == (budget is None):
        raise ValueError("pass exactly one of ratio and budget")
    if importance == "taylor" and gradients is None:
        raise ValueError("Taylor importance needs a gradients function")
    _check_ignored(model, ignored_layers)
    outputs, roots, shapes = _trace(model, example_inputs)
    keep = tuple(dict.fromkeys([*outputs, *ignored_layers]))
    setup = _Setup(example_inputs, importance, round_to, keep, num_classes, tuple(roots), shapes)
    prepare = gradients if importance == "taylor" else None
    if ratio is not None:
        pristine = copy.deepcopy(model)  # what a failed pruning is diagnosed on: the pruner edits `model` in place
        pruner = _attempt(lambda: _pruner(model, setup, ratio, steps), pristine, model, setup, ratio)
        for _ in range(steps):
            if prepare:
                prepare(model)
            _attempt(pruner.step, pristine, model, setup, ratio)
        _attempt(lambda: _check_output(model, setup), pristine, model, setup, ratio)
        model.zero_grad(set_to_none=True)
        return model, [ratio * (k + 1) / steps for k in range(steps)]
    start, ratios = budget.measure(model), []
    for k in range(1, steps + 1):
        # Equal shares of the budget per step: each step's ratio is relative to the channels left by the last.
        goal = start - (start - budget.target) * k / steps
        if prepare:
            prepare(model)
        model, step_ratio = _smallest_ratio_meeting(model, setup, budget, goal)
        ratios.append(step_ratio)
    return model, ratios


def _pruner(model: nn.Module, setup: _Setup, ratio: float, steps: int) -> tp.pruner.MetaPruner:
    ignored = [model.get_submodule(name) for name in setup.keep]
    if setup.num_classes is not None:
        ignored += head_layers(model, setup.num_classes)
    return tp.pruner.MetaPruner(
        model,
        setup.example_inputs,
        importance=_IMPORTANCE[setup.importance](),
        pruning_ratio=ratio,
        iterative_steps=steps,
        round_to=setup.round_to,
        ignored_layers=ignored,
    )


@torch.no_grad()
def _check_output(model: nn.Module, setup: _Setup) -> None:
    """The pruned model still runs on the example input and gives outputs of the unpruned model's shapes."""
    was_training = model.training
    model.eval()
    try:
        shapes = tuple(t.shape for t in _tensors(model(setup.example_inputs)))
    finally:
        model.train(was_training)
    if shapes != setup.output_shapes:
        raise _OutputChanged(f"the output shape changed from {_shapes(setup.output_shapes)} to {_shapes(shapes)}")


def _shapes(shapes: tuple[torch.Size, ...]) -> str:
    return " and ".join(str(list(s)) for s in shapes) or "no tensor"


def _what(exc: BaseException) -> str:
    """An exception as 'Type: first line of its message', short enough for a one-sentence error."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 160 else text[:157] + "..."
    if isinstance(exc, _OutputChanged):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _attempt(action: Callable[[], T], pristine: nn.Module, subject: nn.Module, setup: _Setup, ratio: float) -> T:
    """Run one pruning action on `subject`; any failure becomes the DeploykitError `_diagnose` words."""
    try:
        return action()
    except DeploykitError:
        raise
    except Exception as exc:
        raise _diagnose(pristine, subject, setup, ratio, exc) from exc


def _diagnose(
    pristine: nn.Module, subject: nn.Module, setup: _Setup, ratio: float, exc: Exception
) -> DeploykitError:
    """The one-sentence error for a pruning of `pristine` at `ratio` that failed with `exc` (on `subject`).

    torch-pruning cannot say which layer it misunderstood, so the layers are found by trying: keeping every
    prunable layer must work (else tracing itself fails, and the innermost module in the traceback is named);
    then a bisection over the layers in execution order finds the first one whose keeping makes the pruning
    work, and that repeats until it does. Magnitude importance stands in for Taylor (no gradients needed).
    """
    trial_setup = dataclasses.replace(setup, importance="l2" if setup.importance == "taylor" else setup.importance)
    candidates = [r for r in setup.roots if not any(r == k or r.startswith(f"{k}.") for k in setup.keep)]

    def works(extra: list[str]) -> bool:
        trial = copy.deepcopy(pristine)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _pruner(trial, dataclasses.replace(trial_setup, keep=(*setup.keep, *extra)), ratio, 1).step()
                _check_output(trial, trial_setup)
        except Exception:
            return False
        return True

    what = _what(exc)
    if not works(candidates):
        layer = _layer_in_traceback(exc, subject)
        at = f" at its layer {layer!r}" if layer else ""
        return DeploykitError(
            f"torch-pruning cannot trace the model{at} ({what}): structured pruning needs operations DepGraph can "
            "follow, so change that operation or use method: unstructured in the prune stage."
        )
    found: list[str] = []
    while len(found) < _MAX_CULPRITS and not works(found):
        rest = [c for c in candidates if c not in found]
        miss, hit = 0, len(rest)  # keeping found + rest[:miss] fails, found + rest[:hit] works
        while hit - miss > 1:
            middle = (miss + hit) // 2
            if works(found + rest[:middle]):
                hit = middle
            else:
                miss = middle
        found.append(rest[hit - 1])
    if not found:  # the l2 stand-in for Taylor works: the failure depends on which channels go
        layer = _layer_in_traceback(exc, subject)
        found = [layer] if layer else []
    if not found:
        return DeploykitError(
            f"Structured pruning breaks the model ({what}): add the layers around the operation that fails to "
            "ignored_layers: in the prune stage, or use another importance."
        )
    names = ", ".join(repr(n) for n in found)
    one = len(found) == 1
    return DeploykitError(
        f"Structured pruning breaks the model at {'layer' if one else 'layers'} {names} ({what}): torch-pruning "
        f"cannot follow how {'its' if one else 'their'} output channels are used, so add {names} to "
        f"ignored_layers: in the prune stage to keep {'its' if one else 'their'} channels."
    )


def _layer_in_traceback(exc: BaseException, model: nn.Module) -> str | None:
    """The innermost submodule of `model` that a frame of the traceback was working on (its `self`, or a
    local holding it or a torch-pruning node of it), if any."""
    names = {id(m): name for name, m in model.named_modules() if name}
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            for candidate in (value, getattr(value, "module", None)):
                if isinstance(candidate, nn.Module) and id(candidate) in names:
                    return names[id(candidate)]
    return None


def _pruned_copy(model: nn.Module, setup: _Setup, ratio: float) -> nn.Module:
    trial = copy.deepcopy(model)
    for mine, theirs in zip(model.parameters(), trial.parameters()):  # deepcopy leaves .grad behind
        theirs.grad = None if mine.grad is None else mine.grad.clone()

    def prune() -> None:
        _pruner(trial, setup, ratio, 1).step()
        _check_output(trial, setup)

    _attempt(prune, model, trial, setup, ratio)
    trial.zero_grad(set_to_none=True)
    return trial


def _smallest_ratio_meeting(model: nn.Module, setup: _Setup, budget: Budget, goal: float) -> tuple[nn.Module, float]:
    """The pruned copy of `model` at (about) the lowest channel ratio whose measure is at or under `goal`.

    The ratio rises step by step rather than by bisection over the whole range: with round_to, a layer whose
    rounded count would reach 0 is left whole, so very high ratios can prune *less* than moderate ones.
    """

    def trial(ratio: float) -> nn.Module:
        return _pruned_copy(model, setup, ratio)

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
