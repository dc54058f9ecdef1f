"""TensorRT engines behind the Session interface, with torch CUDA tensors as device buffers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from deploykit.errors import DeploykitError
from deploykit.runtime.base import Session, as_input, require_tensorrt


def engine_metadata_path(plan: Path) -> Path:
    """Where the metadata JSON of an engine lives: model.fp16.plan -> model.fp16.json."""
    return Path(plan).with_suffix(".json")


def _precision(plan: Path) -> str:
    meta = engine_metadata_path(plan)
    if meta.is_file():
        return json.loads(meta.read_text())["precision"]
    tags = [s.lstrip(".") for s in plan.suffixes]  # model.int8.plan -> ["int8", "plan"]
    return next((t for t in tags if t in ("fp16", "int8", "fp32")), "fp32")


def _torch_dtype(trt, dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=trt.nptype(dtype))).dtype


class TrtSession(Session):
    def __init__(self, path: Path, trt) -> None:
        self.path, self.precision = path, _precision(path)
        self.name = f"trt-{self.precision}"
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise DeploykitError(
                f"TensorRT could not load the engine {path}: engines only run on the GPU model and TensorRT "
                "version that built them, so rebuild it with the tensorrt stage here."
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        self._input, self._output = inputs[0], outputs[0]
        self._in_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self._input))
        self._out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self._output))

    def run(self, x: np.ndarray) -> np.ndarray:
        x_dev = torch.from_numpy(as_input(x)).to("cuda", dtype=self._in_dtype)
        self.context.set_input_shape(self._input, tuple(x_dev.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self._output)), dtype=self._out_dtype, device="cuda")
        self.context.set_tensor_address(self._input, x_dev.data_ptr())
        self.context.set_tensor_address(self._output, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise DeploykitError(
                f"TensorRT failed to run {self.path} on a batch of shape {tuple(x.shape)}: "
                "check that the batch fits the engine's optimisation profile."
            )
        stream.synchronize()
        return out.float().cpu().numpy()


def trt_session(path: Path) -> Session:
    """Load a serialized TensorRT engine (needs TensorRT and an NVIDIA GPU)."""
    trt = require_tensorrt()  # before touching the file: a missing GPU is the problem to report
    path = Path(path)
    if not path.is_file():
        raise DeploykitError(f"The TensorRT engine {path} does not exist: check the path or re-run the tensorrt stage.")
    return TrtSession(path, trt)
