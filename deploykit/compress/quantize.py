"""INT8 quantization: ONNX Runtime static (QDQ) and dynamic quantization, torchao pt2e PTQ and QAT, the
accuracy-aware search that keeps the most sensitive layers in FP32, and the latency guard.

Activations default to unsigned 8-bit and weights to signed 8-bit: on x86 CPUs ONNX Runtime's u8 x s8 kernels
(VNNI) are 3-4x faster than s8 x s8 ones (see FIELD-NOTES.md).
"""

from __future__ import annotations

import copy
import inspect
import statistics
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from torch import nn
from torch.fx import GraphModule

if TYPE_CHECKING:
    from deploykit.data import DataBundle
    from deploykit.progress import Reporter
    from deploykit.runtime import Session
    from deploykit.train.config import TrainConfig
    from deploykit.train.loop import FitResult

# Layers that carry weights worth quantizing, and so the units the accuracy-aware search can keep in FP32.
STATIC_OPS = ("Conv", "Gemm", "MatMul")
# Dynamic quantization only pays off for matrix products: ConvInteger is slower than FP32 Conv on CPU.
DYNAMIC_OPS = ("Gemm", "MatMul")

_CALIBRATION = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


# ---- ONNX Runtime ----------------------------------------------------------------------------------------


class BatchReader(CalibrationDataReader):
    """Feeds fixed batches to ONNX Runtime's calibrator and debugging tools; `on_batch` runs after each one."""

    def __init__(
        self, input_name: str, batches: Iterable[np.ndarray], on_batch: Callable[[], None] | None = None
    ) -> None:
        self._name, self._batches, self._on_batch = input_name, iter(batches), on_batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        if self._on_batch is not None:
            self._on_batch()
        return {self._name: np.ascontiguousarray(batch, dtype=np.float32)}


def input_name(path: Path) -> str:
    """The name of an ONNX model's first input."""
    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def preprocess(src: Path, dst: Path) -> Path:
    """Shape inference and graph optimisation (BatchNorm folding and such): ONNX Runtime's advice before quantizing."""
    quant_pre_process(str(src), str(dst))
    return Path(dst)


def quantize_static_qdq(
    model: Path,
    out: Path,
    batches: Sequence[np.ndarray],
    *,
    calibrate_method: str = "minmax",
    percentile: float = 99.999,
    per_channel: bool = True,
    activation_type: str = "uint8",
    exclude: Iterable[str] = (),
    cache: Path | None = None,
    on_batch: Callable[[], None] | None = None,
) -> Path:
    """Static INT8 in QDQ format (signed 8-bit weights), calibrated on `batches`; `exclude` names nodes left in FP32.

    With `cache`, calibrated ranges are saved there on the first call and reused (no calibration) afterwards.
    """
    quantize_static(
        str(model),
        str(out),
        BatchReader(input_name(model), batches, on_batch),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=_ACTIVATION_TYPES[activation_type],
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
        calibrate_method=_CALIBRATION[calibrate_method],
        # Signed activations are made symmetric (zero point 0): the form TensorRT's explicit quantization takes.
        extra_options={"CalibPercentile": percentile, "ActivationSymmetric": activation_type == "int8"},
        calibration_cache_path=str(cache) if cache else None,
    )
    return Path(out)


def quantize_dynamic_int8(model: Path, out: Path, *, per_channel: bool = True, exclude: Iterable[str] = ()) -> Path:
    """Weights-only INT8 of the Gemm/MatMul layers; activations are quantized on the fly at run time."""
    quantize_dynamic(
        str(model),
        str(out),
        op_types_to_quantize=list(DYNAMIC_OPS),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(exclude),
    )
    return Path(out)


def float_layers(path: Path, op_types: Sequence[str] = STATIC_OPS) -> list[str]:
    """Nodes of `op_types` whose weight is a plain float initializer, i.e. that run in FP32."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in initializers]


# ---- torchao pt2e ----------------------------------------------------------------------------------------


def trainable(model: GraphModule) -> GraphModule:
    """Let `.train()`/`.eval()` work on an exported model (they raise there) and return the model, as nn.Module's do.

    torchao's allow_exported_model_train_eval does the same but its methods return None, which breaks
    `model.eval()` chains in fit() and export_onnx().
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    def train(self: GraphModule, mode: bool = True) -> GraphModule:
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        return nn.Module.train(self, mode)  # the `training` flags too, which exporters read

    model.train = types.MethodType(train, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(lambda self: train(self, False), model)  # type: ignore[method-assign]
    return model


def _capture(model: nn.Module, example: torch.Tensor) -> GraphModule:
    """torch.export with a dynamic batch, so calibration, training and ONNX export may use any batch size."""
    # Two rows at least: torch.export specialises a dimension whose example size is 1.
    example = torch.cat([example, example])[: max(2, len(example))]
    forward_arg = next(iter(inspect.signature(model.forward).parameters))
    dynamic = {forward_arg: {0: torch.export.Dim("batch")}}
    return torch.export.export(model, (example,), dynamic_shapes=dynamic).module()


def _x86_quantizer(is_qat: bool) -> Any:
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=is_qat))


def quantize_pt2e(
    model: nn.Module, batches: Sequence[torch.Tensor], on_batch: Callable[[], None] | None = None
) -> GraphModule:
    """Post-training INT8 with torchao's pt2e flow and the X86 Inductor quantizer, calibrated on `batches`."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # A copy: the exported graph shares its parameters with `model`, and quantizing folds BatchNorm into them.
    prepared = prepare_pt2e(_capture(copy.deepcopy(model).eval(), batches[0]), _x86_quantizer(is_qat=False))
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
            if on_batch is not None:
                on_batch()
    return trainable(convert_pt2e(prepared)).eval()


def quantize_qat(
    model: nn.Module,
    bundle: DataBundle,
    cfg: TrainConfig,
    work_dir: Path,
    reporter: Reporter,
    mixup_alpha: float = 0.0,
    fold_batchnorm: bool = True,
) -> tuple[GraphModule, FitResult]:
    """Quantization-aware fine-tuning of a copy of `model` with torchao's pt2e flow, then conversion to INT8.

    fold_batchnorm folds BatchNorm into the convolutions first (its statistics frozen, as QAT recipes do for
    the last epochs anyway): fine-tuning then trains the graph that gets deployed, and torchao skips its
    conv-BN QAT pattern rewrites, which take over a minute on a 2-core CPU whatever the model's size.
    fit() drives the fake-quantized GraphModule unchanged (its train/eval made to work by `trainable`), so QAT
    gets the same optimizers, schedules, losses, resuming and diagnostics as ordinary training.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_  # what prepare_pt2e folds BatchNorm with

    from deploykit.data import sample_batch
    from deploykit.train import fit

    model = copy.deepcopy(model)  # the exported graph shares its parameters with the model, and QAT trains them
    example, _ = sample_batch(bundle, cfg.batch_size, "train")
    if fold_batchnorm:
        captured = _capture(model.eval(), example)
        _fuse_conv_bn_(captured)
    else:
        captured = _capture(model.train(), example)
    prepared = trainable(prepare_qat_pt2e(captured, _x86_quantizer(is_qat=True)))
    if cfg.precision == "auto":  # the observers must see the fp32 values the deployed INT8 graph is calibrated on
        cfg = cfg.model_copy(update={"precision": "fp32"})
    trained, result = fit(prepared, bundle, cfg, work_dir, reporter, mixup_alpha=mixup_alpha)
    return trainable(convert_pt2e(trained.eval())).eval(), result


# ---- accuracy-aware search -------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One quantized model: which layers it keeps in FP32, its top-1 accuracy (0-1) and how long it took."""

    excluded: list[str]
    accuracy: float
    path: Path
    seconds: float


@dataclass
class SearchResult:
    best: Candidate
    attempts: list[Candidate]
    goal_met: bool
    note: str
    ranking: list[str] = field(default_factory=list)


def accuracy_drop(fp32: float, int8: float) -> float:
    """Accuracy lost to quantization in percentage points."""
    return round((fp32 - int8) * 100, 4)


def exclusion_sizes(n: int) -> list[int]:
    """1, 2, 4, ... layers kept in FP32, ending with all `n`."""
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return [*sizes, n] if n else []


def search_exclusions(
    attempt: Callable[[list[str]], tuple[float, Path]],
    rank: Callable[[], list[str]],
    fp32_accuracy: float,
    max_drop: float | None,
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Quantize everything; while the accuracy drop exceeds `max_drop` points, retry keeping the 1, 2, 4, ...
    most sensitive layers (from `rank`, called only when needed) in FP32, until the goal is met, the layers
    run out, or the next attempt would overrun `budget_s` (counted from the first attempt).

    `attempt(excluded)` quantizes and returns (accuracy, path). The best candidate is the most accurate one,
    ties going to fewer FP32 layers. `max_drop` None disables the search.
    """
    start = clock()
    attempts: list[Candidate] = []
    ranking: list[str] = []

    def run(excluded: list[str]) -> bool:
        began = clock()
        accuracy, path = attempt(excluded)
        attempts.append(Candidate(excluded, accuracy, path, round(clock() - began, 3)))
        return max_drop is None or accuracy_drop(fp32_accuracy, accuracy) <= max_drop

    def result(goal_met: bool, note: str) -> SearchResult:
        best = max(attempts, key=lambda c: (c.accuracy, -len(c.excluded)))
        return SearchResult(best, attempts, goal_met, note, ranking)

    if run([]):
        return result(True, "accuracy goal disabled" if max_drop is None else "goal met with every layer quantized")
    ranking = rank()
    for k in exclusion_sizes(len(ranking)):
        typical = statistics.mean(c.seconds for c in attempts)
        if clock() - start + typical > budget_s:
            return result(False, f"time budget of {budget_s:g} s ran out after {len(attempts)} attempt(s)")
        if run(ranking[:k]):
            return result(True, f"goal met with {k} layer(s) in FP32")
    return result(False, f"goal not met even with all {len(ranking)} ranked layers in FP32")


# ---- latency guard ---------------------------------------------------------------------------------------


@dataclass
class LatencyVerdict:
    fp32_p50_ms: float
    int8_p50_ms: float
    speedup: float
    min_speedup: float
    worth_it: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def latency_verdict(fp32_p50_ms: float, int8_p50_ms: float, min_speedup: float) -> LatencyVerdict:
    """Is INT8 fast enough over FP32 to be worth deploying?"""
    speedup = fp32_p50_ms / int8_p50_ms if int8_p50_ms > 0 else float("inf")
    worth_it = speedup >= min_speedup
    timings = f"{fp32_p50_ms:.3f} -> {int8_p50_ms:.3f} ms P50, required {min_speedup:g}x"
    message = (
        f"INT8 is {speedup:.2f}x faster than FP32 on this CPU ({timings})"
        if worth_it
        else f"INT8 is only {speedup:.2f}x faster than FP32 on this CPU ({timings}): FP32 is the deployable model"
    )
    return LatencyVerdict(fp32_p50_ms, int8_p50_ms, round(speedup, 4), min_speedup, worth_it, message)


def compare_latency(
    fp32: Session, int8: Session, x: np.ndarray, *, rounds: int = 3, window_s: float = 0.5, min_speedup: float = 1.05
) -> dict[str, Any]:
    """Measure FP32 and INT8 alternately for `rounds` rounds (so both see the same machine load) and compare
    the medians of their P50 latencies; the load average is recorded beside every measurement."""
    from deploykit.bench import measure

    runs: dict[str, list[dict[str, Any]]] = {"fp32": [], "int8": []}
    for _ in range(rounds):
        for name, session in (("fp32", fp32), ("int8", int8)):
            m = measure(session, x, window_s=window_s)
            runs[name].append(
                {"p50_ms": m.p50_ms, "p95_ms": m.p95_ms, "stable": m.stable, "load_avg": m.load_avg_after}
            )
    p50 = {name: statistics.median(r["p50_ms"] for r in rs) for name, rs in runs.items()}
    verdict = latency_verdict(p50["fp32"], p50["int8"], min_speedup)
    return {**verdict.to_dict(), "batch": int(x.shape[0]), "rounds": runs}
