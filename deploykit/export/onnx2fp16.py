"""onnx2fp16: an FP32 ONNX model as FP16 weights and arithmetic with FP32 inputs and outputs, for GPU runtimes.

onnxconverter-common's converter does the graph work (casts at the edges, FP16 initializers, ops FP16 kernels
lack kept in FP32). The file is checked where it is written: onnx.checker, every float weight in FP16, and its
outputs against the FP32 model's on real samples on the CPU (ONNX Runtime runs it there, slowly: the speed it is
for comes from a GPU, where it is timed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_bytes

_MAX_BYTES = 2**31 - 1  # one protobuf


def convert_onnx_fp16(source: Path, destination: Path) -> Path:
    """Write the FP16 version of `source` (FP32 in and out) to `destination`, checked by onnx.checker."""
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    try:
        half = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:  # the converter raises plain exceptions for graphs it cannot walk
        raise DeploykitError(
            f"Converting {source.name} to FP16 failed ({type(exc).__name__}: {exc}): keep it in FP32, or build an "
            "FP16 TensorRT engine from the FP32 file instead (the tensorrt stage)."
        ) from exc
    data = half.SerializeToString()
    if len(data) > _MAX_BYTES:
        raise DeploykitError(f"The FP16 model of {source.name} is over 2 GiB, one protobuf's limit: use TensorRT FP16.")
    onnx.checker.check_model(half, full_check=True)
    atomic_write_bytes(destination, data)
    return destination


def float_weight_types(path: Path) -> set[str]:
    """The element types of a model's floating-point initializers, e.g. {'FLOAT16'}."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    graph = onnx.load(str(path)).graph
    return {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer if t.data_type in floats}


def io_types(path: Path) -> list[str]:
    """The element types of the graph's inputs and outputs (FP16 models here keep FLOAT at both ends)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]]


def max_relative_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |candidate - reference| as a fraction of max |reference| (the logits' scale)."""
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(candidate.astype(np.float64) - reference))) / scale
