"""The `quantize` stage: an INT8 ONNX model checked against FP32 for accuracy, agreement, size and speed."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from deploykit.artifacts import ArtifactRef, ModelStats, Pick, Role, StageResult, latest
from deploykit.errors import DeploykitError
from deploykit.files import atomic_copy, atomic_write_json
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, by_method, register
from deploykit.train.config import OptimizerConfig, TrainConfig

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from deploykit.compress.quantize import SearchResult
    from deploykit.data import DataBundle
    from deploykit.runtime import Session

INT8_FILE = "model.int8.onnx"
REPORT_FILE = "quantize.json"
_SENSITIVITY_BATCHES = 2  # calibration batches the per-layer SQNR analysis runs on
_TOP_SENSITIVE = 10  # layers listed in the report
_AUTO_CALIBRATION = ("minmax", "percentile", "entropy")  # cheapest first; entropy builds histograms of every tensor
_REPORT_SENSITIVITY_SAMPLES = 16  # when no fallback ran, the report's SQNR table is measured on this many samples
_SENSITIVITY_BATCH_SIZE = 32  # dynamic has no calibration data: the SQNR analysis samples batches of this size
_PerChannel = Annotated[bool, Field(description="ptq/dynamic: one weight scale per output channel, not per tensor.")]


def _qat_default() -> TrainConfig:
    return TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=0.01))


class QuantizeSettings(BaseModel):
    """What every quantize method shares: the accuracy budget and the checks against FP32."""

    model_config = ConfigDict(extra="forbid")
    weight_type: Literal["int8"] = Field("int8", description="Weight type: signed 8-bit, what fast CPU kernels take.")
    max_accuracy_drop: float | None = Field(
        1.0,
        description="Largest val top-1 loss allowed, in percentage points; ptq/dynamic keep the most sensitive layers "
        "in FP32 until it holds. null disables the accuracy-aware search.",
    )
    time_budget_s: float = Field(300.0, ge=0.0, description="Time the accuracy-aware search may spend on attempts.")
    min_speedup: float = Field(
        1.05, gt=0.0, description="INT8 must be this much faster than FP32 (P50, batch 1) to be the deployable model."
    )
    latency_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads for timing and evaluation (default: its choice)."
    )
    latency_rounds: int = Field(
        3, ge=1, description="Alternating FP32/INT8 latency measurements; their median P50s are compared."
    )
    latency_window_s: float = Field(0.5, gt=0.0, description="Length of one latency stability window in seconds.")
    parity_samples: int = Field(256, ge=1, description="Validation samples on which INT8 top-1 must agree with FP32.")


class _CalibratedSettings(QuantizeSettings):
    """Methods that calibrate activation ranges on real training samples."""

    calibration_samples: int = Field(
        256, ge=1, description="ptq/pt2e: real training-split samples that calibrate activation ranges."
    )
    calibration_batch_size: int = Field(32, ge=1, description="ptq/pt2e: batch size of the calibration passes.")


class PtqSettings(_CalibratedSettings):
    """ONNX Runtime static QDQ of the 'onnx' model, inside the accuracy-aware search."""

    method: Literal["ptq"] = Field("ptq", description="ptq: ONNX Runtime static QDQ of the 'onnx' model.")
    calibrate_method: Literal["auto", "minmax", "entropy", "percentile"] = Field(
        "auto",
        description="ptq: how activation ranges are chosen from the calibration data; auto tries minmax, then "
        "percentile, then entropy while INT8 misses max_accuracy_drop, and keeps the most accurate.",
    )
    percentile: float = Field(
        99.999, gt=0.0, le=100.0, description="ptq with calibrate_method percentile: the percentile of |x| kept."
    )
    per_channel: _PerChannel = True
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="ptq: uint8 runs 3-4x faster on x86 CPUs (u8 x s8 kernels); int8 is symmetric, as TensorRT needs."
    )
    bias_correction: bool = Field(
        False,
        description="ptq: shift each INT8 Conv/Gemm bias by the mean error its rounded weights add to its output on "
        "the calibration data (deploykit/compress/bias_correction.py).",
    )


class DynamicSettings(QuantizeSettings):
    """ONNX Runtime weights-only INT8 of the 'onnx' model's Gemm/MatMul layers, inside the accuracy-aware search."""

    method: Literal["dynamic"] = Field(
        "dynamic", description="dynamic: ONNX Runtime weights-only INT8 of the 'onnx' model's Gemm/MatMul layers."
    )
    per_channel: _PerChannel = True


class Pt2eSettings(_CalibratedSettings):
    """torchao post-training INT8 of the checkpoint."""

    method: Literal["pt2e"] = Field("pt2e", description="pt2e: torchao post-training INT8 of the checkpoint.")


class QatSettings(QuantizeSettings):
    """torchao quantization-aware INT8 of the checkpoint: fine-tuning on the fake-quantized model."""

    method: Literal["qat"] = Field("qat", description="qat: torchao quantization-aware INT8 of the checkpoint.")
    qat: TrainConfig = Field(
        default_factory=_qat_default, description="qat: the fine-tuning run on the fake-quantized model."
    )
    qat_fold_batchnorm: bool = Field(
        True,
        description="qat: fold BatchNorm into the convolutions before fine-tuning (frozen statistics); false trains "
        "BatchNorm too, and torchao's conversion then takes over a minute longer on a 2-core CPU.",
    )


@dataclass
class _Fp32:
    """The FP32 model INT8 is judged against."""

    onnx: Path  # timed against INT8
    session: Session  # the reference for accuracy and top-1 agreement
    accuracy: float
    model: nn.Module | None = None  # the PyTorch model, for the methods that quantize a checkpoint


@register("quantize")
class QuantizeStage(Stage):
    """Quantize to INT8, keep the accuracy drop in budget, and check agreement, size and speed against FP32."""

    Config = by_method(PtqSettings, DynamicSettings, Pt2eSettings, QatSettings)

    def needs_torch_model(self) -> bool:
        return _METHODS[type(self.config)].quantizes == Role.CHECKPOINT

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.export.torch2onnx import onnx_size_bytes

        cfg = self.config
        method = _METHODS[type(cfg)]
        # Inputs first, so that a pipeline lacking one fails before any work.
        fp32 = latest(ctx.upstream, Role.ONNX)
        if method.quantizes == Role.ONNX and fp32 is None:
            raise DeploykitError(
                f"Stage '{ctx.name}' (method {cfg.method}) quantizes the FP32 ONNX model of an export stage, but no "
                "earlier stage wrote one: add an export stage before quantize."
            )
        checkpoint = None
        if method.quantizes == Role.CHECKPOINT:
            checkpoint = ctx.find(Role.CHECKPOINT, f" (method {cfg.method} quantizes a PyTorch model)")
        # What to deploy instead when INT8 does not pay off: the very FP32 model it was compared with.
        fallback = fp32 or checkpoint
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="quantize-", dir=ctx.work_dir) as tmp:
            scratch = Path(tmp)
            reference = self._fp32(ctx, fp32, checkpoint, scratch)
            search, extra = method.make(self, ctx, reference, scratch)
            int8_path = ctx.out_dir / INT8_FILE
            atomic_copy(search.best.path, int8_path)
            metrics, int8_wins, reason = self._check(ctx, reference, int8_path, search)
        metrics.update(extra)
        pick = Pick(ctx.name, Role.ONNX_INT8, reason) if int8_wins else Pick(fallback.stage, fallback.role, reason)
        metrics["deployable"] = f"{pick.stage}/{pick.role}"
        atomic_write_json(ctx.out_dir / REPORT_FILE, metrics)
        ctx.reporter.log(
            f"INT8 ({cfg.method}): val {ctx.pipeline.metric_name} {metrics['fp32_accuracy']:.2%} -> "
            f"{metrics['int8_accuracy']:.2%}, "
            f"{len(metrics['excluded_nodes'])} layer(s) in FP32, {metrics['size_ratio']:.2f}x the size, "
            f"{metrics['speedup']:.2f}x faster; deployable: {metrics['deployable']}"
        )
        source = ctx.stats(fallback)  # quantization keeps the parameters and the MACs
        stats = ModelStats(source.params, source.macs, onnx_size_bytes(int8_path), metrics["int8_accuracy"])
        return StageResult(
            artifacts={Role.ONNX_INT8: INT8_FILE, "quant_report": REPORT_FILE},
            metrics=metrics,
            models={Role.ONNX_INT8: stats},
            deployable=pick,
        )

    def _fp32(
        self, ctx: StageContext, onnx: ArtifactRef | None, checkpoint: ArtifactRef | None, scratch: Path
    ) -> _Fp32:
        """The upstream ONNX model, or the checkpoint's model when the method quantizes one (timed through the
        upstream ONNX, or an export of its own)."""
        from deploykit.export import export_onnx
        from deploykit.runtime import evaluate_accuracy, ort_session, torch_session
        from deploykit.train import load_model

        bundle, threads = ctx.data(), self.config.latency_threads
        if checkpoint is None:
            session = ort_session(onnx.path, threads)
            return _Fp32(onnx.path, session, evaluate_accuracy(session, bundle.val, task=bundle.task))
        model, _ = load_model(checkpoint.path.parent)
        path = onnx.path if onnx else export_onnx(model, bundle.input_shape, scratch / "fp32.onnx")
        session = torch_session(model, threads)
        return _Fp32(path, session, evaluate_accuracy(session, bundle.val, task=bundle.task), model)

    # -- making candidates: one handler per method (_METHODS) ----------------------------------------------

    def _ptq(self, ctx: StageContext, fp32: _Fp32, scratch: Path) -> tuple[SearchResult, dict[str, Any]]:
        from deploykit.compress.bias_correction import correct_bias
        from deploykit.compress.quantize import STATIC_OPS, accuracy_drop, quantize_static_qdq
        from deploykit.runtime import evaluate_accuracy, ort_session

        cfg, bundle = self.config, ctx.data()
        batches = _batches(bundle, cfg.calibration_samples, cfg.calibration_batch_size)
        methods = _AUTO_CALIBRATION if cfg.calibrate_method == "auto" else (cfg.calibrate_method,)
        trials: list[dict[str, Any]] = []
        corrected: dict[Path, int] = {}  # bias-corrected layers per candidate file, as last written

        def calibrated(
            method: str, source: Path, path: Path, excluded: list[str], on_batch: Callable[[], None]
        ) -> None:
            quantize_static_qdq(
                source,
                path,
                batches,
                calibrate_method=method,
                percentile=cfg.percentile,
                per_channel=cfg.per_channel,
                activation_type=cfg.activation_type,
                exclude=excluded,
                cache=scratch / f"calibration-{method}.json",  # later attempts reuse the first one's ranges
                on_batch=on_batch,
            )
            if cfg.bias_correction:
                corrected[path] = correct_bias(source, path, batches)

        def best() -> str:
            return max(trials, key=lambda t: t["accuracy"])["method"]  # the first of equals: the cheapest

        def quantize(source: Path, path: Path, excluded: list[str], on_batch: Callable[[], None]) -> None:
            if not trials:  # the all-INT8 attempt: each calibration in turn until one keeps the accuracy
                for method in methods:
                    calibrated(method, source, path, [], on_batch if not trials else lambda: None)
                    accuracy = evaluate_accuracy(ort_session(path, cfg.latency_threads), bundle.val, task=bundle.task)
                    trials.append({"method": method, "accuracy": accuracy})
                    drop = accuracy_drop(fp32.accuracy, accuracy)
                    if cfg.max_accuracy_drop is None or drop <= cfg.max_accuracy_drop:
                        break
                if len(trials) > 1:
                    ctx.reporter.log("calibration: " + ", ".join(f"{t['method']} {t['accuracy']:.2%}" for t in trials))
            if excluded or best() != trials[-1]["method"]:  # else `path` already holds the best all-INT8 model
                calibrated(best(), source, path, excluded, on_batch)

        search, extra = self._search_onnx(ctx, fp32, scratch, quantize, batches, STATIC_OPS)
        calibration = {"method": best(), "trials": trials, "bias_corrected_layers": corrected.get(search.best.path, 0)}
        return search, {**extra, "calibration": calibration}

    def _dynamic(self, ctx: StageContext, fp32: _Fp32, scratch: Path) -> tuple[SearchResult, dict[str, Any]]:
        from deploykit.compress.quantize import DYNAMIC_OPS, quantize_dynamic_int8

        def quantize(source: Path, path: Path, excluded: list[str], on_batch: Callable[[], None]) -> None:
            quantize_dynamic_int8(source, path, per_channel=self.config.per_channel, exclude=excluded)

        return self._search_onnx(ctx, fp32, scratch, quantize, [], DYNAMIC_OPS)

    def _pt2e(self, ctx: StageContext, fp32: _Fp32, scratch: Path) -> tuple[SearchResult, dict[str, Any]]:
        import torch

        from deploykit.compress.quantize import quantize_pt2e

        cfg = self.config

        def quantize() -> tuple[nn.Module, dict[str, Any]]:
            calibration = _batches(ctx.data(), cfg.calibration_samples, cfg.calibration_batch_size)
            batches = [torch.from_numpy(b) for b in calibration]
            with ctx.reporter.task("calibrating (pt2e)", total=len(batches)) as bar:
                return quantize_pt2e(fp32.model, batches, on_batch=bar.advance), {}

        return self._torchao(ctx, fp32, scratch, quantize)

    def _qat(self, ctx: StageContext, fp32: _Fp32, scratch: Path) -> tuple[SearchResult, dict[str, Any]]:
        from deploykit.compress.quantize import quantize_qat

        cfg = self.config

        def quantize() -> tuple[nn.Module, dict[str, Any]]:
            quantized, fit = quantize_qat(
                fp32.model,
                ctx.data(),
                cfg.qat,
                ctx.work_dir / "qat",
                ctx.reporter,
                ctx.pipeline.data.augment.mixup_alpha,
                fold_batchnorm=cfg.qat_fold_batchnorm,
            )
            summary = {k: fit.metrics[k] for k in ("val_acc", "epochs_run")}
            return quantized, {"qat": {"history": fit.history, **summary}}

        return self._torchao(ctx, fp32, scratch, quantize)

    def _search_onnx(
        self,
        ctx: StageContext,
        fp32: _Fp32,
        scratch: Path,
        quantize: Callable[[Path, Path, list[str], Callable[[], None]], None],
        batches: list[np.ndarray],
        op_types: Sequence[str],
    ) -> tuple[SearchResult, dict[str, Any]]:
        """ONNX Runtime quantization inside the accuracy-aware search (ptq and dynamic): `quantize(source, path,
        excluded, on_batch)` writes one candidate, calibrating on `batches` (none for dynamic)."""
        from deploykit.compress.quantize import preprocess, search_exclusions
        from deploykit.compress.sensitivity import rank_layers
        from deploykit.runtime import evaluate_accuracy, ort_session

        cfg, bundle = self.config, ctx.data()
        source = preprocess(fp32.onnx, scratch / "float.onnx")
        sensitivity: list[dict[str, Any]] = []

        def attempt(excluded: list[str]) -> tuple[float, Path]:
            path = scratch / f"candidate-{len(excluded)}.onnx"
            if excluded:
                what, steps = f"fallback: {len(excluded)} layer(s) in FP32", 1
            else:
                what, steps = "calibrating" if batches else "quantizing", len(batches) + 1
            with ctx.reporter.task(what, total=steps) as bar:
                quantize(source, path, excluded, bar.advance)
                accuracy = evaluate_accuracy(ort_session(path, cfg.latency_threads), bundle.val, task=bundle.task)
                bar.advance()
            ctx.reporter.log(
                f"{len(excluded)} layer(s) in FP32: val {ctx.pipeline.metric_name} {accuracy:.2%} "
                f"(FP32 {fp32.accuracy:.2%})"
            )
            return accuracy, path

        def ranked(samples: list[np.ndarray]) -> list[str]:
            with ctx.reporter.task("ranking layers by SQNR", total=None):
                layers = rank_layers(source, scratch / "candidate-0.onnx", samples, scratch, op_types)
            sensitivity[:] = [layer.to_dict() for layer in layers[:_TOP_SENSITIVE]]
            return [layer.node for layer in layers]

        def rank() -> list[str]:
            size = _SENSITIVITY_BATCH_SIZE
            return ranked((batches or _batches(bundle, _SENSITIVITY_BATCHES * size, size))[:_SENSITIVITY_BATCHES])

        search = search_exclusions(attempt, rank, fp32.accuracy, cfg.max_accuracy_drop, cfg.time_budget_s)
        if not sensitivity:  # the goal was met at once and nothing was ranked: the report still shows which layer hurts
            ranked(_batches(bundle, _REPORT_SENSITIVITY_SAMPLES, _REPORT_SENSITIVITY_SAMPLES))
        return search, {"sensitivity": sensitivity}

    def _torchao(
        self, ctx: StageContext, fp32: _Fp32, scratch: Path, quantize: Callable[[], tuple[nn.Module, dict[str, Any]]]
    ) -> tuple[SearchResult, dict[str, Any]]:
        """torchao pt2e PTQ or QAT to a QDQ ONNX: `quantize()` gives the quantized model and extra metrics; the
        accuracy drop is reported, no layer-wise fallback exists."""
        from deploykit.compress.quantize import Candidate, SearchResult, accuracy_drop
        from deploykit.export import export_onnx
        from deploykit.runtime import evaluate_accuracy, ort_session

        cfg, bundle = self.config, ctx.data()
        start = time.monotonic()
        quantized, extra = quantize()
        path = export_onnx(quantized, bundle.input_shape, scratch / "candidate.onnx")
        accuracy = evaluate_accuracy(ort_session(path, cfg.latency_threads), bundle.val, task=bundle.task)
        candidate = Candidate([], accuracy, path, round(time.monotonic() - start, 3))
        goal_met = cfg.max_accuracy_drop is None or accuracy_drop(fp32.accuracy, accuracy) <= cfg.max_accuracy_drop
        note = (
            f"{cfg.method} quantizes the whole model in torch, so there is no layer-wise FP32 fallback: "
            "use method ptq for the accuracy-aware search"
        )
        return SearchResult(candidate, [candidate], goal_met, note), extra

    # -- checking the result -------------------------------------------------------------------------------

    def _check(
        self,
        ctx: StageContext,
        fp32: _Fp32,
        int8_path: Path,
        search: SearchResult,
    ) -> tuple[dict[str, Any], bool, str]:
        """Batch sizes, top-1 agreement, sizes and latency of the saved INT8 model; whether INT8 is the one to
        deploy, and why."""
        from deploykit.compress.quantize import accuracy_drop, compare_latency, float_layers
        from deploykit.data import sample_batch
        from deploykit.export import check_parity, real_batches
        from deploykit.runtime import ort_session

        cfg, bundle = self.config, ctx.data()
        int8 = ort_session(int8_path, cfg.latency_threads)
        for x in real_batches(bundle, [1, 7]):
            shape = int8.run(x).shape
            if shape != fp32.session.run(x).shape:  # the model's head, not the dataset, fixes the class count
                raise DeploykitError(
                    f"The INT8 model gives logits of shape {shape} for a batch of {len(x)}: the quantizer broke the "
                    "dynamic batch dimension; re-export the FP32 model with a dynamic batch."
                )
        x, _ = sample_batch(bundle, cfg.parity_samples, "val")
        batches = [b for b in (x[:1], x[1:8], x[8:]) if len(b)]  # batches of 1 and 7 as serving sends them
        parity = check_parity(fp32.session, int8, [b.numpy() for b in batches], "int8")
        with ctx.reporter.task("timing FP32 vs INT8", total=None):
            latency = compare_latency(
                ort_session(fp32.onnx, cfg.latency_threads),
                int8,
                real_batches(bundle, [1])[0],
                rounds=cfg.latency_rounds,
                window_s=cfg.latency_window_s,
                min_speedup=cfg.min_speedup,
            )
        best = search.best
        drop = accuracy_drop(fp32.accuracy, best.accuracy)
        int8_wins = search.goal_met and latency["worth_it"]
        reason = latency["message"]
        if not search.goal_met:
            reason = f"INT8 loses {drop:g} accuracy points, more than max_accuracy_drop {cfg.max_accuracy_drop:g}"
        fp32_bytes, int8_bytes = fp32.onnx.stat().st_size, int8_path.stat().st_size
        metrics = {
            "method": cfg.method,
            "fp32_accuracy": fp32.accuracy,
            "int8_accuracy": best.accuracy,
            "accuracy_drop": drop,
            "max_accuracy_drop": cfg.max_accuracy_drop,
            "accuracy_goal_met": search.goal_met,
            "excluded_nodes": best.excluded,
            "float_layers": float_layers(int8_path),
            "fallback": search.note,
            "attempts": [
                {
                    "excluded": len(c.excluded),
                    "accuracy": c.accuracy,
                    "accuracy_drop": accuracy_drop(fp32.accuracy, c.accuracy),
                    "seconds": c.seconds,
                }
                for c in search.attempts
            ],
            "parity": {k: v for k, v in parity.items() if k != "per_batch"},
            "latency": latency,
            "speedup": latency["speedup"],
            "latency_note": latency["message"],
            "load_avg": [round(v, 2) for v in os.getloadavg()],
            "fp32_bytes": fp32_bytes,
            "int8_bytes": int8_bytes,
            "size_ratio": round(int8_bytes / fp32_bytes, 4),
            "deployable_reason": reason,
        }
        return metrics, int8_wins, reason


def _batches(bundle: DataBundle, samples: int, batch_size: int) -> list[np.ndarray]:
    """The first `samples` training samples, in batches: calibration data."""
    from deploykit.data import sample_batch

    x, _ = sample_batch(bundle, samples, "train")
    return [b.numpy() for b in x.split(batch_size)]


class _Method(NamedTuple):
    quantizes: Role  # the upstream model the method reads
    make: Callable[[QuantizeStage, StageContext, _Fp32, Path], tuple[SearchResult, dict[str, Any]]]


# How each method makes its INT8 candidate; the stage's run() does the rest, the same for all.
_METHODS: dict[type[QuantizeSettings], _Method] = {
    PtqSettings: _Method(Role.ONNX, QuantizeStage._ptq),
    DynamicSettings: _Method(Role.ONNX, QuantizeStage._dynamic),
    Pt2eSettings: _Method(Role.CHECKPOINT, QuantizeStage._pt2e),
    QatSettings: _Method(Role.CHECKPOINT, QuantizeStage._qat),
}
