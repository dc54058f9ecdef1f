"""The `export` stage: the newest checkpoint as model.onnx, checked against PyTorch on real samples."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from deploykit.artifacts import Role, StageResult
from deploykit.errors import DeploykitError
from deploykit.files import atomic_copy, atomic_write_json
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register


class ExportConfig(BaseModel):
    """The export stage."""

    model_config = ConfigDict(extra="forbid")
    opset: int = Field(18, ge=18, description="ONNX opset; the dynamo exporter needs 18 or newer.")
    max_batch: int = Field(32, ge=1, description="Largest batch checked for parity (always added to the sizes below).")
    parity_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1, 7], description="Batch sizes of real samples on which ONNX Runtime must match."
    )
    rtol_scale: float = Field(
        1e-4, gt=0.0, description="FP32 parity: largest logit difference allowed, as a fraction of max |logit|."
    )


@register("export")
class ExportStage(Stage):
    """Export the newest checkpoint to ONNX (dynamic batch) and check it against PyTorch on real samples."""

    Config = ExportConfig

    def needs_torch_model(self) -> bool:
        return True

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.export import check_parity, export_onnx, real_batches, write_reproduce_script
        from deploykit.export.torch2onnx import REPRODUCE_SCRIPT, onnx_opset, onnx_size_bytes
        from deploykit.runtime import ort_session, torch_session
        from deploykit.sources.model import describe_arch
        from deploykit.train import load_model
        from deploykit.train.checkpoint import ARCH_FILE, CHECKPOINT_FILE

        cfg = self.config
        source = ctx.find("checkpoint", " (a trained model to export)")
        checkpoint = source.path
        model, arch = load_model(checkpoint.parent)
        bundle = ctx.data()
        input_shape = bundle.input_shape

        for name in (CHECKPOINT_FILE, ARCH_FILE):  # the reproduce script reads these, not the upstream folder
            atomic_copy(checkpoint.parent / name, ctx.out_dir / "source" / name)
        onnx_path = ctx.out_dir / "model.onnx"
        start = time.perf_counter()
        export_onnx(model, input_shape, onnx_path, opset=cfg.opset)
        seconds = time.perf_counter() - start
        write_reproduce_script(onnx_path, arch, f"source/{CHECKPOINT_FILE}", input_shape, cfg.opset)
        size_mb = onnx_path.stat().st_size / 1e6
        ctx.reporter.log(f"exported {describe_arch(arch)} to model.onnx ({size_mb:.2f} MB) in {seconds:.1f} s")

        sizes = sorted({*cfg.parity_batch_sizes, cfg.max_batch})
        parity = check_parity(
            torch_session(model), ort_session(onnx_path), real_batches(bundle, sizes), "fp32", rtol_scale=cfg.rtol_scale
        )
        if not parity["passed"]:
            raise DeploykitError(
                f"The exported model.onnx does not match PyTorch: max |logit difference| {parity['max_abs_diff']:.3g} "
                f"exceeds {parity['tolerance']:.3g} ({cfg.rtol_scale:g} x logit scale {parity['scale']:.3g}) on real "
                "samples; try another opset or report the layer to the exporter."
            )
        atomic_write_json(ctx.out_dir / "parity.json", parity)
        ctx.reporter.log(f"parity torch vs onnxruntime: {parity['max_abs_diff']:.2e} <= {parity['tolerance']:.2e}")
        metrics = {
            "parity": parity,
            "onnx_bytes": onnx_path.stat().st_size,
            "opset": onnx_opset(onnx_path),
            "export_seconds": round(seconds, 3),
            "input_shape": list(input_shape),
        }
        # Parity holds, so the ONNX model keeps the checkpoint's parameters, MACs and accuracy.
        stats = replace(ctx.stats(source), bytes=onnx_size_bytes(onnx_path))
        return StageResult(
            artifacts={Role.ONNX: "model.onnx", "reproduce": REPRODUCE_SCRIPT, "parity": "parity.json"},
            metrics=metrics,
            models={Role.ONNX: stats},
        )
