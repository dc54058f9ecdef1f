"""OpenVINO sessions behind the Session interface: an ONNX file or an OpenVINO IR (.xml + .bin) on the CPU.

OpenVINO runs ONNX Runtime's QDQ files as they are (it folds QuantizeLinear/DequantizeLinear pairs into its
own int8 kernels), so the same INT8 file can be timed on both runtimes and the faster one deployed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeploykitError
from deploykit.runtime.base import Session, as_input

OPENVINO_MISSING = (
    "OpenVINO is not installed: install the `openvino` extra (pip install 'deploykit[openvino]') to run and "
    "export OpenVINO models."
)
_INT8_OPS = ("FakeQuantize", "FakeConvert")  # how an IR (or a QDQ ONNX read by OpenVINO) holds INT8
IR_SUFFIX = ".xml"


def require_openvino() -> Any:
    """The `openvino` module, or a DeploykitError saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise DeploykitError(OPENVINO_MISSING) from None
    return openvino


def ov_precision(model: Any) -> str:
    """'int8' when the read model holds quantization ops, else 'fp32'."""
    return "int8" if any(op.get_type_name() in _INT8_OPS for op in model.get_ops()) else "fp32"


# deploykit's names for the float precisions OpenVINO compiles to, and OpenVINO's names for them.
HINTS = {"fp32": "f32", "bf16": "bf16"}
_TYPE_NAMES = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "f16": "fp16"}


def compiled_precision(compiled: Any) -> str:
    """The float precision a compiled model really runs in, read back from OpenVINO (never from the file name)."""
    value = str(compiled.get_property("INFERENCE_PRECISION_HINT"))  # e.g. "<Type: 'bfloat16'>"
    name = value.split("'")[1] if "'" in value else value
    return _TYPE_NAMES.get(name, name)


class OpenVinoSession(Session):
    def __init__(self, compiled: Any, path: Path, precision: str) -> None:
        self.compiled, self.path, self.precision = compiled, path, precision
        self.float_precision = compiled_precision(compiled)
        self.name = f"ov-{self.execution_precision}"
        self._request = compiled.create_infer_request()  # one reused request: what a latency-bound server does
        self._output = compiled.output(0)

    @property
    def execution_precision(self) -> str:
        """fp32 / bf16 for a float model; int8 (its other layers in fp32) or int8+bf16 for a quantized one."""
        if self.precision == "int8":
            return "int8" if self.float_precision == "fp32" else f"int8+{self.float_precision}"
        return self.float_precision

    def run(self, x: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: as_input(x)})
        # A copy: OpenVINO's result shares the request's output buffer, which the next run (or freeing the
        # session) overwrites while the caller still holds the array.
        return np.array(result[self._output], dtype=np.float32, copy=True)


def ov_session(path: Path, threads: int | None = None, precision: str = "fp32") -> Session:
    """Compile an ONNX or IR model for the CPU with the latency hint and `threads` inference threads; its float
    layers run in `precision` (fp32, or bf16 where the CPU has it: OpenVINO falls back to fp32 where it has not,
    and the session's execution_precision says which it chose)."""
    if precision not in HINTS:
        raise DeploykitError(f"OpenVINO precision {precision!r} is not one deploykit runs: use {' or '.join(HINTS)}.")
    ov = require_openvino()
    path = Path(path)
    if not path.is_file():
        raise DeploykitError(f"The model {path} does not exist: check the path or re-run the stage that writes it.")
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeploykitError(f"OpenVINO could not read {path} ({reason}): re-export the model.") from exc
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        # Always said, never left to OpenVINO: on CPUs with BF16 or AMX its default drops FP32 models to bf16,
        # which would silently change outputs and report FP32 accuracy for BF16 speed.
        "INFERENCE_PRECISION_HINT": HINTS[precision],
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError:
        if precision == "fp32":
            raise
        # A CPU without the precision may refuse the hint rather than ignore it: run in FP32, and the session's
        # execution_precision (read back below) says so, so the row is labelled with what really ran.
        compiled = core.compile_model(model, "CPU", {**config, "INFERENCE_PRECISION_HINT": HINTS["fp32"]})
    return OpenVinoSession(compiled, path, ov_precision(model))
