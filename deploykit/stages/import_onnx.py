"""The `import_onnx` stage: the pipeline's `model: {onnx: ...}` file as the canonical FP32 ONNX later stages read.

The engine puts it first, named `source`, whenever the model is an ONNX file (a pipeline may also list it itself).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from deploykit.artifacts import ModelStats, Role, StageResult
from deploykit.errors import DeploykitError
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register

ONNX_FILE = "model.onnx"


class ImportOnnxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@register("import_onnx")
class ImportOnnxStage(Stage):
    """Bring the model's ONNX file in: one input 'input' (NCHW, dynamic batch), opset >= 13, weights inside, checked."""

    Config = ImportOnnxConfig

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.export.onnx_import import import_onnx
        from deploykit.export.torch2onnx import onnx_size_bytes
        from deploykit.runtime import evaluate_accuracy, ort_session

        source = ctx.pipeline.model
        if source.torch:
            raise DeploykitError(
                f"Stage '{ctx.name}' imports an ONNX model, but the pipeline's model is {source.label()}: remove the "
                "stage, or give model: {onnx: path/to/model.onnx}."
            )
        bundle, path = ctx.data(), ctx.out_dir / ONNX_FILE
        # the data's sample shape is checked against the graph first, and fills any dims the file leaves open
        info = import_onnx(source.onnx, path, source.input_layout, sample_shape=bundle.input_shape)
        accuracy = evaluate_accuracy(ort_session(path), bundle.val, task=bundle.task)
        ctx.reporter.log(
            f"imported {source.onnx.name} ({info['layout']}, opset {info['opset_before']} -> {info['opset_after']}, "
            f"batch {info['batch']}): val {ctx.pipeline.metric_name} {accuracy:.2%}"
        )
        stats = ModelStats(params=_param_count(path), bytes=onnx_size_bytes(path), accuracy=accuracy)
        return StageResult(
            artifacts={Role.ONNX: ONNX_FILE},
            metrics={"import": info, "val_acc": accuracy, "metric": ctx.pipeline.metric_name, "source": source.label()},
            models={Role.ONNX: stats},
        )


def _param_count(path: Path) -> int:
    """Elements of the graph's floating-point initializers: the weights the file carries."""
    import math

    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return sum(math.prod(t.dims) for t in onnx.load(str(path)).graph.initializer if t.data_type in floats)
