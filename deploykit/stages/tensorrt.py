"""The `tensorrt` stage: TensorRT engines (FP16, INT8) from the pipeline's ONNX models, for this machine's GPU."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploykit.artifacts import ArtifactRef, Role, StageResult, latest
from deploykit.files import atomic_copy, atomic_write_text
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register

REPRODUCE_SCRIPT = "reproduce_tensorrt.py"


class TensorRTConfig(BaseModel):
    """The tensorrt stage."""

    model_config = ConfigDict(extra="forbid")
    precisions: list[Literal["fp16", "int8"]] = Field(
        default_factory=lambda: ["fp16"],
        min_length=1,
        description="Engines: fp16 from the FP32 ONNX; int8 from the quantize stage's QDQ ONNX, else calibrated.",
    )
    min_batch: int = Field(1, ge=1, description="Smallest batch the engines accept.")
    opt_batch: int = Field(8, ge=1, description="Batch TensorRT tunes its kernels for (and calibrates at).")
    max_batch: int = Field(32, ge=1, description="Largest batch the engines accept.")
    workspace_mb: int = Field(2048, ge=64, description="GPU scratch memory TensorRT may use while building, in MiB.")
    calibration_samples: int = Field(
        512, ge=1, description="int8 from an FP32 ONNX: real training samples fed to the entropy calibrator."
    )

    @model_validator(mode="after")
    def _check(self) -> TensorRTConfig:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                "batches must satisfy min_batch <= opt_batch <= max_batch, "
                f"not {self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError("each precision may be listed once")
        return self


def _symmetric_int8(path: Path) -> bool:
    """TensorRT's explicit quantization takes only signed int8 Q/DQ with zero points of 0."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zero = inits.get(node.input[2]) if len(node.input) > 2 else None
            if zero is None or zero.data_type != onnx.TensorProto.INT8 or np.any(numpy_helper.to_array(zero)):
                return False
    return True


def _int8_source(ctx: StageContext) -> ArtifactRef:
    """The newest QDQ ONNX (explicit quantization) if TensorRT can take it, else the newest FP32 ONNX (calibrated)."""
    qdq = latest(ctx.upstream, Role.ONNX_INT8)
    if qdq is not None:
        if _symmetric_int8(qdq.path):
            return qdq
        ctx.reporter.log(
            f"{qdq.path.name} uses unsigned or asymmetric activations (fast on x86 CPUs) that TensorRT does not take: "
            "calibrating the int8 engine from the FP32 ONNX instead (set activation_type: int8 in quantize to reuse it)."
        )
    return ctx.find(Role.ONNX, " (int8 engines are built from 'onnx_int8' or 'onnx')")


_SCRIPT = '''\
"""Rebuild the TensorRT engines of this folder from the ONNX files in source/ (needs TensorRT and an NVIDIA GPU).

Engines only run on the GPU model and TensorRT version that built them: run this on the target machine.
INT8 engines calibrated from an FP32 model reuse the calibration cache (*.calib) in this folder.
Usage: python {script} [OUTPUT_DIR]    (default: rebuilt/ beside this script)
"""

import sys
from dataclasses import replace
from pathlib import Path

from deploykit.export.onnx2trt import build_engine, calibration_cache_path

HERE = Path(__file__).resolve().parent
out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "rebuilt"
BUILDS = {builds!r}

for precision, onnx_name in BUILDS.items():
    plan = out / f"model.{{precision}}.plan"
    calib = calibration_cache_path(HERE / plan.name)
    build_engine(
        HERE / "source" / onnx_name, plan, precision=precision, input_shape={input_shape!r},
        min_batch={min_batch}, opt_batch={opt_batch}, max_batch={max_batch}, workspace_mb={workspace_mb},
        calibration_cache=calib if calib.is_file() else None,
    )
    print(plan)
'''


@register("tensorrt")
class TensorRTStage(Stage):
    """Build TensorRT engines (fp16, int8) with a dynamic batch profile; needs TensorRT and an NVIDIA GPU."""

    Config = TensorRTConfig

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.runtime import require_tensorrt

        require_tensorrt()  # before any work: no data loading or file copies on a machine that cannot build
        from deploykit.data import sample_batch
        from deploykit.export import build_engine
        from deploykit.export.onnx2trt import calibration_cache_path
        from deploykit.runtime import engine_metadata_path, onnx_precision

        cfg = self.config
        bundle = ctx.data()
        input_shape = bundle.input_shape
        artifacts, metrics, builds, models = {}, {}, {}, {}
        for precision in cfg.precisions:
            ref = _int8_source(ctx) if precision == "int8" else ctx.find(Role.ONNX, " (the FP32 ONNX model)")
            onnx_path = ref.path
            source = atomic_copy(onnx_path, ctx.out_dir / "source" / onnx_path.name)
            calibration = None
            if precision == "int8" and onnx_precision(source) != "int8":
                calibration = sample_batch(bundle, cfg.calibration_samples, "train")[0].numpy()
            plan = ctx.out_dir / f"model.{precision}.plan"
            ctx.reporter.log(f"building TensorRT {precision} engine from {onnx_path.name}")
            metrics[precision] = build_engine(
                source,
                plan,
                precision=precision,
                min_batch=cfg.min_batch,
                opt_batch=cfg.opt_batch,
                max_batch=cfg.max_batch,
                input_shape=input_shape,
                calibration=calibration,
                workspace_mb=cfg.workspace_mb,
            )
            artifacts[f"trt_{precision}"] = plan.name
            # An engine keeps its source's parameters and MACs; its accuracy is measured where it runs.
            models[f"trt_{precision}"] = replace(ctx.stats(ref), bytes=plan.stat().st_size, accuracy=None)
            artifacts[f"trt_{precision}_meta"] = engine_metadata_path(plan).name
            if calibration_cache_path(plan).is_file():  # the reproduce script replays it instead of the samples
                artifacts[f"trt_{precision}_calibration"] = calibration_cache_path(plan).name
            builds[precision] = source.name
        script = _SCRIPT.format(
            script=REPRODUCE_SCRIPT,
            builds=builds,
            input_shape=input_shape,
            min_batch=cfg.min_batch,
            opt_batch=cfg.opt_batch,
            max_batch=cfg.max_batch,
            workspace_mb=cfg.workspace_mb,
        )
        atomic_write_text(ctx.out_dir / REPRODUCE_SCRIPT, script)
        artifacts["reproduce"] = REPRODUCE_SCRIPT
        return StageResult(artifacts=artifacts, metrics=metrics, models=models)
