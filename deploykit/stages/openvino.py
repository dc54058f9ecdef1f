"""The `openvino` stage: the newest FP32 ONNX model as OpenVINO IR, FP32 and INT8 (NNCF post-training quantization)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deploykit.artifacts import ModelStats, Role, StageResult
from deploykit.errors import DeploykitError
from deploykit.files import atomic_copy
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register

FP32_FILE, INT8_FILE = "model.xml", "model.int8.xml"


class OpenVinoConfig(BaseModel):
    """The openvino stage."""

    model_config = ConfigDict(extra="forbid")
    precisions: list[Literal["fp32", "int8"]] = Field(
        default_factory=lambda: ["fp32", "int8"], min_length=1, description="IR files to write: fp32 and/or int8."
    )
    calibration_samples: int = Field(256, ge=1, description="int8: real training-split samples NNCF calibrates on.")
    calibration_batch_size: int = Field(32, ge=1, description="int8: batch size of the calibration passes.")
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="int8: NNCF preset; performance uses symmetric activations (fastest on CPUs)."
    )
    max_accuracy_drop: float | None = Field(
        1.0,
        description="int8: largest val top-1 loss in points; NNCF's accuracy-controlled quantization keeps the "
        "costliest layers in FP32 until it holds. null: plain PTQ, the drop is only reported.",
    )
    threads: int | None = Field(None, ge=1, description="OpenVINO inference threads for the accuracy evaluation.")
    rtol_scale: float = Field(
        1e-4, gt=0.0, description="fp32 parity with ONNX Runtime: largest logit difference, as a fraction of max |logit|."
    )


@register("openvino")
class OpenVinoStage(Stage):
    """Convert the newest FP32 ONNX to OpenVINO IR (fp32) and quantize it with NNCF (int8), checked on real samples."""

    Config = OpenVinoConfig

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.runtime.ov_rt import require_openvino

        require_openvino()  # before any work: say how to install it
        from deploykit.data import sample_batch
        from deploykit.export import check_parity, real_batches
        from deploykit.export.onnx2openvino import (
            REPRODUCE_SCRIPT,
            convert_onnx,
            ir_size_bytes,
            quantize_nncf,
            write_reproduce_script,
        )
        from deploykit.runtime import evaluate_accuracy, ort_session, ov_session

        cfg, bundle = self.config, ctx.data()
        source = ctx.find(Role.ONNX, " (the FP32 ONNX model OpenVINO converts)")
        onnx_path = atomic_copy(source.path, ctx.out_dir / "source" / source.path.name)
        reference = ort_session(onnx_path, cfg.threads)
        fp32_accuracy = evaluate_accuracy(reference, bundle.val, task=bundle.task)
        result = StageResult(artifacts={"reproduce": REPRODUCE_SCRIPT}, metrics={"reference_accuracy": fp32_accuracy})
        stats = ctx.stats(source)

        if "fp32" in cfg.precisions:
            xml = convert_onnx(onnx_path, ctx.out_dir / FP32_FILE)
            session = ov_session(xml, cfg.threads)
            parity = check_parity(reference, session, real_batches(bundle, [1, 7]), "fp32", rtol_scale=cfg.rtol_scale)
            if not parity["passed"]:
                raise DeploykitError(
                    f"OpenVINO's FP32 IR does not match ONNX Runtime: max |logit difference| "
                    f"{parity['max_abs_diff']:.3g} exceeds {parity['tolerance']:.3g}; report the model to OpenVINO."
                )
            accuracy = evaluate_accuracy(session, bundle.val, task=bundle.task)
            self._publish(result, Role.OPENVINO, xml, replace(stats, bytes=ir_size_bytes(xml), accuracy=accuracy))
            result.metrics |= {"fp32_accuracy": accuracy, "fp32_parity": parity}
        write_reproduce_script(ctx.out_dir, onnx_path.name, FP32_FILE)

        if "int8" in cfg.precisions:
            x, _ = sample_batch(bundle, cfg.calibration_samples, "train")
            calibration = [b.numpy() for b in x.split(cfg.calibration_batch_size)]
            validation = None
            if cfg.max_accuracy_drop is not None:
                vx, vy = sample_batch(bundle, len(bundle.val), "val")
                validation = [(a.numpy(), b.numpy()) for a, b in zip(vx.split(64), vy.split(64))]
            start = time.perf_counter()
            with ctx.reporter.task("NNCF INT8 quantization", total=None):
                xml = quantize_nncf(
                    onnx_path,
                    ctx.out_dir / INT8_FILE,
                    calibration,
                    preset=cfg.preset,
                    validation=validation,
                    max_drop=cfg.max_accuracy_drop,
                    task=ctx.pipeline.task_json(),
                )
            accuracy = evaluate_accuracy(ov_session(xml, cfg.threads), bundle.val, task=bundle.task)
            self._publish(result, Role.OPENVINO_INT8, xml, replace(stats, bytes=ir_size_bytes(xml), accuracy=accuracy))
            drop = round(100 * (fp32_accuracy - accuracy), 4)
            result.metrics |= {
                "int8_accuracy": accuracy,
                "int8_accuracy_drop": drop,
                "int8_method": "accuracy_control" if validation else "ptq",
                "nncf_seconds": round(time.perf_counter() - start, 3),
            }
            ctx.reporter.log(
                f"OpenVINO INT8 (NNCF): val {ctx.pipeline.metric_name} {fp32_accuracy:.2%} -> {accuracy:.2%} "
                f"({drop:+g} points)"
            )
        return result

    @staticmethod
    def _publish(result: StageResult, role: Role, xml: Path, stats: ModelStats) -> None:
        """The IR graph under its role, its weights file beside it (so the cache checks both)."""
        result.artifacts[role] = xml.name
        result.artifacts[f"{role}_weights"] = xml.with_suffix(".bin").name
        result.models[role] = stats
