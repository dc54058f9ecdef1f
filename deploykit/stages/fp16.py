"""The `fp16` stage: the newest FP32 ONNX model converted to FP16 for GPU runtimes, written and checked here."""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from deploykit.artifacts import Role, StageResult
from deploykit.errors import DeploykitError
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register

FP16_FILE = "model.fp16.onnx"


class Fp16Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rtol_scale: float = Field(
        1e-2, gt=0.0, description="Parity with the FP32 model: largest output difference as a fraction of max |output|."
    )
    parity_samples: int = Field(64, ge=1, description="Validation samples the FP16 outputs are compared on.")


@register("fp16")
class Fp16Stage(Stage):
    """Convert the newest FP32 ONNX to FP16 (FP32 inputs and outputs) for GPU runtimes, checked against FP32 here."""

    Config = Fp16Config

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.data import sample_batch
        from deploykit.export.onnx2fp16 import convert_onnx_fp16, float_weight_types, io_types, max_relative_difference
        from deploykit.export.torch2onnx import onnx_size_bytes
        from deploykit.runtime import ort_session

        cfg = self.config
        source = ctx.find(Role.ONNX, " (the FP32 ONNX model to convert)")
        path = convert_onnx_fp16(source.path, ctx.out_dir / FP16_FILE)
        x, _ = sample_batch(ctx.data(), cfg.parity_samples, "val")
        reference, half = ort_session(source.path, 1).run(x.numpy()), ort_session(path, 1).run(x.numpy())
        difference = max_relative_difference(reference, half)
        if difference > cfg.rtol_scale:
            raise DeploykitError(
                f"The FP16 model of {source.path.name} differs from FP32 by {difference:.2e} of the outputs' scale, "
                f"over rtol_scale {cfg.rtol_scale:g}: a layer overflows in FP16; keep the FP32 model for GPU runtimes."
            )
        weights = sorted(float_weight_types(path))
        ctx.reporter.log(f"fp16: {path.name}, weights {weights}, outputs within {difference:.2e} of FP32")
        fp32 = ctx.stats(source)
        # accuracy is measured where FP16 runs fast, on a GPU (the CPU benchmark says why it declines it)
        stats = replace(fp32, bytes=onnx_size_bytes(path), accuracy=None)
        return StageResult(
            artifacts={Role.ONNX_FP16: FP16_FILE},
            metrics={"parity_rel_diff": difference, "weight_types": weights, "io_types": io_types(path),
                     "size_ratio": stats.bytes / max(fp32.bytes or 1, 1)},
            models={Role.ONNX_FP16: stats},
        )  # fmt: skip
