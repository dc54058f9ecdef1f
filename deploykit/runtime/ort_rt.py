"""ONNX Runtime sessions behind the Session interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from deploykit.errors import DeploykitError
from deploykit.runtime.base import Session, as_input

# Ops that only appear in a quantized graph: QDQ (QuantizeLinear), QOperator (QLinearConv, ...) or integer ops.
_INT8_OPS = ("QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger")
# What InferenceSession raises for a file it cannot load; none of these share a base class but Exception.
_LOAD_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    RuntimeError,
)


def onnx_precision(path: Path) -> str:
    """The graph's types: 'int8' when it holds quantized ops, 'fp16' when its float weights are FP16, else 'fp32'
    (weights' values are not read)."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except (OSError, DecodeError) as exc:
        raise DeploykitError(f"The ONNX model {path} could not be read ({exc}): re-export it.") from exc
    ops = {node.op_type for node in graph.node}
    if any(op in _INT8_OPS or op.startswith("QLinear") for op in ops):
        return "int8"
    floats = {t.data_type for t in graph.initializer} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    return "fp16" if floats == {onnx.TensorProto.FLOAT16} else "fp32"


class OrtSession(Session):
    def __init__(self, session: ort.InferenceSession, path: Path, precision: str, device: str) -> None:
        self.session = session
        self.path, self.precision = path, precision
        self.name = f"ort-{precision}" if device == "cpu" else f"ort-{device}-{precision}"
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._output], {self._input: as_input(x)})[0].astype(np.float32, copy=False)


def _providers(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise DeploykitError(f"Unknown ONNX Runtime device {device!r}: use 'cpu' or 'cuda'.")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeploykitError(
            "ONNX Runtime has no CUDA execution provider here: install the `gpu` extra (onnxruntime-gpu) "
            "on a machine with an NVIDIA GPU, or use device='cpu'."
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_session(path: Path, threads: int | None = None, device: str = "cpu") -> Session:
    """Open an ONNX file with full graph optimisation, sequential execution and `threads` intra-op threads."""
    path = Path(path)
    providers = _providers(device)
    if not path.is_file():
        raise DeploykitError(f"The ONNX model {path} does not exist: check the path or re-run the export stage.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0 lets ONNX Runtime pick
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except _LOAD_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DeploykitError(f"ONNX Runtime could not load {path} ({reason}): re-export the model.") from exc
    # onnxruntime-gpu silently falls back to CPU when CUDA cannot start; a "cuda" session must not.
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise DeploykitError(
            f"ONNX Runtime could not start CUDA for {path}: check the NVIDIA driver and CUDA libraries."
        )
    return OrtSession(session, path, onnx_precision(path), device)
