"""The `quantize` stage: an INT8 ONNX model checked against FP32 for accuracy, agreement, size and speed."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploykit.artifacts import ModelStats, Pick, Role, StageResult, latest
from deploykit.errors import DeploykitError
from deploykit.files import atomic_copy, atomic_write_json
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register
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

# Settings that only some methods read; setting one for another method is a mistake worth reporting.
_METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "calibration_samples": ("ptq", "pt2e"),
    "calibration_batch_size": ("ptq", "pt2e"),
    "calibrate_method": ("ptq",),
    "percentile": ("ptq",),
    "activation_type": ("ptq",),
    "per_channel": ("ptq", "dynamic"),
    "qat": ("qat",),
    "qat_fold_batchnorm": ("qat",),
}


def _qat_default() -> TrainConfig:
    return TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=0.01))


class QuantizeConfig(BaseModel):
    """The quantize stage."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["ptq", "pt2e", "qat", "dynamic"] = Field(
        "ptq",
        description="ptq: ONNX Runtime static QDQ of the 'onnx' model; dynamic: ONNX Runtime weights-only INT8 of its "
        "Gemm/MatMul layers; pt2e / qat: torchao post-training / quantization-aware INT8 of the checkpoint.",
    )
    calibration_samples: int = Field(
        256, ge=1, description="ptq/pt2e: real training-split samples that calibrate activation ranges."
    )
    calibration_batch_size: int = Field(32, ge=1, description="ptq/pt2e: batch size of the calibration passes.")
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="ptq: how activation ranges are chosen from the calibration data."
    )
    percentile: float = Field(
        99.999, gt=0.0, le=100.0, description="ptq with calibrate_method percentile: the percentile of |x| kept."
    )
    per_channel: bool = Field(True, description="ptq/dynamic: one weight scale per output channel, not per tensor.")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="ptq: uint8 runs 3-4x faster on x86 CPUs (u8 x s8 kernels); int8 is symmetric, as TensorRT needs."
    )
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
    qat: TrainConfig = Field(
        default_factory=_qat_default, description="qat: the fine-tuning run on the fake-quantized model."
    )
    qat_fold_batchnorm: bool = Field(
        True,
        description="qat: fold BatchNorm into the convolutions before fine-tuning (frozen statistics); false trains "
        "BatchNorm too, and torchao's conversion then takes over a minute longer on a 2-core CPU.",
    )

    @model_validator(mode="after")
    def _settings_apply(self) -> QuantizeConfig:
        for name, methods in _METHOD_SETTINGS.items():
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if self.method not in methods and getattr(self, name) != default:
                raise ValueError(
                    f"{name} does not apply to method {self.method!r} (only to {', '.join(methods)}): remove it"
                )
        return self


@register("quantize")
class QuantizeStage(Stage):
    """Quantize to INT8, keep the accuracy drop in budget, and check agreement, size and speed against FP32."""

    Config = QuantizeConfig

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.export import export_onnx
        from deploykit.export.torch2onnx import onnx_size_bytes
        from deploykit.runtime import evaluate_accuracy, ort_session, torch_session
        from deploykit.train import load_model

        cfg = self.config
        from_onnx = cfg.method in ("ptq", "dynamic")
        # Inputs first, so that a pipeline lacking one fails before any work.
        fp32 = latest(ctx.upstream, Role.ONNX)
        if from_onnx and fp32 is None:
            raise DeploykitError(
                f"Stage '{ctx.name}' (method {cfg.method}) quantizes the FP32 ONNX model of an export stage, but no "
                "earlier stage wrote one: add an export stage before quantize."
            )
        checkpoint = None if from_onnx else ctx.find(Role.CHECKPOINT, f" (method {cfg.method} quantizes a PyTorch model)")
        # What to deploy instead when INT8 does not pay off: the very FP32 model it was compared with.
        fallback = fp32 or checkpoint
        bundle = ctx.data()
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="quantize-", dir=ctx.work_dir) as tmp:
            scratch = Path(tmp)
            if from_onnx:
                fp32_onnx = fp32.path
                reference = ort_session(fp32_onnx, cfg.latency_threads)
                fp32_accuracy = evaluate_accuracy(reference, bundle.val)
                search, extra = self._search_onnx(ctx, fp32_onnx, fp32_accuracy, scratch)
            else:
                model, _ = load_model(checkpoint.path.parent)
                # only to time INT8 against
                fp32_onnx = fp32.path if fp32 else export_onnx(model, bundle.input_shape, scratch / "fp32.onnx")
                reference = torch_session(model, cfg.latency_threads)
                fp32_accuracy = evaluate_accuracy(reference, bundle.val)
                search, extra = self._torchao(ctx, model, fp32_accuracy, scratch)
            int8_path = ctx.out_dir / INT8_FILE
            atomic_copy(search.best.path, int8_path)
            metrics, int8_wins, reason = self._check(ctx, reference, fp32_onnx, int8_path, fp32_accuracy, search)
        metrics.update(extra)
        pick = Pick(ctx.name, Role.ONNX_INT8, reason) if int8_wins else Pick(fallback.stage, fallback.role, reason)
        metrics["deployable"] = f"{pick.stage}/{pick.role}"
        atomic_write_json(ctx.out_dir / REPORT_FILE, metrics)
        ctx.reporter.log(
            f"INT8 ({cfg.method}): val acc {metrics['fp32_accuracy']:.2%} -> {metrics['int8_accuracy']:.2%}, "
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

    # -- making candidates ---------------------------------------------------------------------------------

    def _calibration(self, bundle: DataBundle) -> list[np.ndarray]:
        from deploykit.data import sample_batch

        x, _ = sample_batch(bundle, self.config.calibration_samples, "train")
        return [b.numpy() for b in x.split(self.config.calibration_batch_size)]

    def _search_onnx(
        self, ctx: StageContext, fp32_onnx: Path, fp32_accuracy: float, scratch: Path
    ) -> tuple[SearchResult, dict[str, Any]]:
        """ONNX Runtime quantization inside the accuracy-aware search (ptq and dynamic)."""
        from deploykit.compress.quantize import (
            DYNAMIC_OPS,
            STATIC_OPS,
            preprocess,
            quantize_dynamic_int8,
            quantize_static_qdq,
            search_exclusions,
        )
        from deploykit.compress.sensitivity import rank_layers
        from deploykit.runtime import evaluate_accuracy, ort_session

        cfg, bundle = self.config, ctx.data()
        static = cfg.method == "ptq"
        source = preprocess(fp32_onnx, scratch / "float.onnx")
        batches = self._calibration(bundle) if static else []
        sensitivity: list[dict[str, Any]] = []

        def attempt(excluded: list[str]) -> tuple[float, Path]:
            path = scratch / f"candidate-{len(excluded)}.onnx"
            if excluded:
                what, steps = f"fallback: {len(excluded)} layer(s) in FP32", 1
            else:
                what, steps = "calibrating" if static else "quantizing", len(batches) + 1
            with ctx.reporter.task(what, total=steps) as bar:
                if static:
                    quantize_static_qdq(
                        source,
                        path,
                        batches,
                        calibrate_method=cfg.calibrate_method,
                        percentile=cfg.percentile,
                        per_channel=cfg.per_channel,
                        activation_type=cfg.activation_type,
                        exclude=excluded,
                        cache=scratch / "calibration.json",  # later attempts reuse the first one's ranges
                        on_batch=bar.advance,
                    )
                else:
                    quantize_dynamic_int8(source, path, per_channel=cfg.per_channel, exclude=excluded)
                accuracy = evaluate_accuracy(ort_session(path, cfg.latency_threads), bundle.val)
                bar.advance()
            ctx.reporter.log(f"{len(excluded)} layer(s) in FP32: val acc {accuracy:.2%} (FP32 {fp32_accuracy:.2%})")
            return accuracy, path

        def rank() -> list[str]:
            samples = (batches or self._calibration(bundle))[:_SENSITIVITY_BATCHES]
            op_types = STATIC_OPS if static else DYNAMIC_OPS
            with ctx.reporter.task("ranking layers by SQNR", total=None):
                layers = rank_layers(source, scratch / "candidate-0.onnx", samples, scratch, op_types)
            sensitivity.extend(layer.to_dict() for layer in layers[:_TOP_SENSITIVE])
            return [layer.node for layer in layers]

        search = search_exclusions(attempt, rank, fp32_accuracy, cfg.max_accuracy_drop, cfg.time_budget_s)
        return search, {"sensitivity": sensitivity}

    def _torchao(
        self, ctx: StageContext, model: nn.Module, fp32_accuracy: float, scratch: Path
    ) -> tuple[SearchResult, dict[str, Any]]:
        """torchao pt2e PTQ or QAT to a QDQ ONNX; the accuracy drop is reported, no layer-wise fallback exists."""
        import torch

        from deploykit.compress.quantize import Candidate, SearchResult, accuracy_drop, quantize_pt2e, quantize_qat
        from deploykit.export import export_onnx
        from deploykit.runtime import evaluate_accuracy, ort_session

        cfg, bundle = self.config, ctx.data()
        extra: dict[str, Any] = {}
        start = time.monotonic()
        if cfg.method == "pt2e":
            batches = [torch.from_numpy(b) for b in self._calibration(bundle)]
            with ctx.reporter.task("calibrating (pt2e)", total=len(batches)) as bar:
                quantized = quantize_pt2e(model, batches, on_batch=bar.advance)
        else:
            quantized, fit = quantize_qat(
                model,
                bundle,
                cfg.qat,
                ctx.work_dir / "qat",
                ctx.reporter,
                ctx.pipeline.data.augment.mixup_alpha,
                fold_batchnorm=cfg.qat_fold_batchnorm,
            )
            extra["qat"] = {"history": fit.history, **{k: fit.metrics[k] for k in ("val_acc", "epochs_run")}}
        path = export_onnx(quantized, bundle.input_shape, scratch / "candidate.onnx")
        accuracy = evaluate_accuracy(ort_session(path, cfg.latency_threads), bundle.val)
        candidate = Candidate([], accuracy, path, round(time.monotonic() - start, 3))
        goal_met = cfg.max_accuracy_drop is None or accuracy_drop(fp32_accuracy, accuracy) <= cfg.max_accuracy_drop
        note = (
            f"{cfg.method} quantizes the whole model in torch, so there is no layer-wise FP32 fallback: "
            "use method ptq for the accuracy-aware search"
        )
        return SearchResult(candidate, [candidate], goal_met, note), extra

    # -- checking the result -------------------------------------------------------------------------------

    def _check(
        self,
        ctx: StageContext,
        reference: Session,
        fp32_onnx: Path,
        int8_path: Path,
        fp32_accuracy: float,
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
            if shape != reference.run(x).shape:  # the model's head, not the dataset, fixes the class count
                raise DeploykitError(
                    f"The INT8 model gives logits of shape {shape} for a batch of {len(x)}: the quantizer broke the "
                    "dynamic batch dimension; re-export the FP32 model with a dynamic batch."
                )
        x, _ = sample_batch(bundle, cfg.parity_samples, "val")
        batches = [b for b in (x[:1], x[1:8], x[8:]) if len(b)]  # batches of 1 and 7 as serving sends them
        parity = check_parity(reference, int8, [b.numpy() for b in batches], "int8")
        with ctx.reporter.task("timing FP32 vs INT8", total=None):
            latency = compare_latency(
                ort_session(fp32_onnx, cfg.latency_threads),
                int8,
                real_batches(bundle, [1])[0],
                rounds=cfg.latency_rounds,
                window_s=cfg.latency_window_s,
                min_speedup=cfg.min_speedup,
            )
        best = search.best
        drop = accuracy_drop(fp32_accuracy, best.accuracy)
        int8_wins = search.goal_met and latency["worth_it"]
        reason = latency["message"]
        if not search.goal_met:
            reason = f"INT8 loses {drop:g} accuracy points, more than max_accuracy_drop {cfg.max_accuracy_drop:g}"
        fp32_bytes, int8_bytes = fp32_onnx.stat().st_size, int8_path.stat().st_size
        metrics = {
            "method": cfg.method,
            "fp32_accuracy": fp32_accuracy,
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
                    "accuracy_drop": accuracy_drop(fp32_accuracy, c.accuracy),
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

