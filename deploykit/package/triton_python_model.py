"""Triton python-backend model serving `model.onnx` (ONNX Runtime or OpenVINO) or `model.xml` (OpenVINO IR):
the portable flavour's model.py.

deploykit.package.triton_repo copies this file as `<version>/model.py`. It runs inside Triton's python
stub with the environment named by EXECUTION_ENV_PATH (numpy 1.x, its own onnxruntime and openvino), so it
imports only numpy, the runtime its config names (parameter `runtime`) and the standard library, never deploykit.

Every request of a Triton batch is checked on its own; the valid ones are concatenated along the
batch dimension and run in one session call, then the outputs are split back per request. A bad
request gets an error response while the others in the same batch still succeed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton (unit tests): only the plain functions below are used
    pb_utils = None

_NUMPY_TYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}

Feed = dict[str, np.ndarray]


class RequestError(Exception):
    """Why one request failed; `code` names the pb_utils.TritonError code (INVALID_ARG answers HTTP 400)."""

    def __init__(self, message: str, code: str = "INVALID_ARG") -> None:
        super().__init__(message)
        self.code = code


def input_specs(model_config: dict[str, Any]) -> list[tuple[str, type, list[int]]]:
    """(name, numpy dtype, full expected shape with -1 for any size) of each input in a Triton model config."""
    batch = [-1] if model_config.get("max_batch_size", 0) > 0 else []  # batched configs omit the batch dim
    return [
        (i["name"], _NUMPY_TYPES[i["data_type"]], batch + [int(d) for d in i["dims"]]) for i in model_config["input"]
    ]


def check_request(get: Callable[[str], np.ndarray | None], specs: list[tuple[str, type, list[int]]]) -> Feed:
    """The request's inputs as a session feed; raise RequestError naming the first input that does not fit."""
    feed: Feed = {}
    for name, dtype, shape in specs:
        array = get(name)
        if array is None:
            raise RequestError(f"input '{name}' is missing from the request; send it with shape {shape}.")
        if array.dtype != dtype:
            raise RequestError(f"input '{name}' has data type {array.dtype}; the model expects {np.dtype(dtype)}.")
        if array.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, array.shape)):
            raise RequestError(
                f"input '{name}' has shape {list(array.shape)}; the model expects {shape} (-1 is any size)."
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():  # NaN/Inf only ever yield garbage outputs
            raise RequestError(f"input '{name}' holds NaN or infinite values; send finite numbers.")
        feed[name] = array
    return feed


def run_requests(
    run: Callable[[Feed], list[np.ndarray]],
    feeds: list[Feed | RequestError],
    output_names: list[str],
    batched: bool,
) -> list[Feed | RequestError]:
    """Outputs per request: feeds of one shape run as one concatenated batch; errors pass through."""
    groups: dict[Any, list[int]] = {}
    for i, feed in enumerate(feeds):
        if isinstance(feed, RequestError):
            continue
        # only equal non-batch shapes can be concatenated; unbatched models run each request alone
        key = tuple((n, a.shape[1:]) for n, a in sorted(feed.items())) if batched else i
        groups.setdefault(key, []).append(i)

    results: list[Feed | RequestError] = list(feeds)
    for members in groups.values():
        parts = [feeds[i] for i in members]
        joined = parts[0] if len(parts) == 1 else {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
        try:
            outputs = run(joined)
        except Exception as e:  # noqa: BLE001 (one failing group must not take the other requests down)
            error = e if isinstance(e, RequestError) else RequestError(f"the runtime failed: {e}", code="INTERNAL")
            for i in members:
                results[i] = error
            continue
        start = 0  # plain slices (views): np.split costs more than a small model's run
        for i, part in zip(members, parts):
            stop = start + len(next(iter(part.values())))
            results[i] = {name: out[start:stop] for name, out in zip(output_names, outputs)}
            start = stop
    return results


def session_options(threads: int | None, spin: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # By default idle workers sleep: the cores are shared with Triton's own threads and other instances.
    # Spinning wins latency back when the model's threads have cores to themselves.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def providers(instance_kind: str | None, device_id: str | None) -> list[Any]:
    """CUDA for a GPU instance when this onnxruntime has it, CPU otherwise."""
    import onnxruntime as ort

    if instance_kind == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(device_id or 0)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


Runner = Callable[[Feed], list[np.ndarray]]


def onnxruntime_runner(
    path: str, output_names: list[str], threads: int | None, spin: bool, args: dict, precision: str = "fp32"
) -> Runner:
    """ONNX Runtime on the file's own precision (`precision` is OpenVINO's to choose; the config never sets it here)."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    session = ort.InferenceSession(
        path,
        sess_options=session_options(threads, spin),
        providers=providers(args.get("model_instance_kind"), args.get("model_instance_device_id")),
    )

    def run(feed: Feed) -> list[np.ndarray]:
        try:
            return session.run(output_names, feed)
        except InvalidArgument as e:  # e.g. an image too small for the network: the client's to fix (HTTP 400)
            raise RequestError(f"ONNX Runtime rejected this input: {e}") from None

    return run


def openvino_runner(
    path: str, output_names: list[str], threads: int | None, spin: bool, args: dict, precision: str = "fp32"
) -> Runner:
    """OpenVINO on the CPU in the float precision the benchmark picked it in (fp32 unless told bf16: its own default
    would drop to bf16 on CPUs that have it), latency hint, one reused request."""
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": OV_HINTS[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in output_names]

    def run(feed: Feed) -> list[np.ndarray]:
        try:
            result = request.infer(feed)
        except RuntimeError as e:  # OpenVINO raises RuntimeError for inputs it cannot take
            raise RequestError(f"OpenVINO rejected this input: {e}") from None
        return [np.array(result[o], copy=True) for o in outputs]  # the request's buffers are reused

    return run


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}
OV_HINTS = {"fp32": "f32", "bf16": "bf16"}  # the config's `precision` -> OpenVINO's INFERENCE_PRECISION_HINT


def config_parameter(model_config: dict[str, Any], key: str) -> str | None:
    return model_config.get("parameters", {}).get(key, {}).get("string_value") or None


class TritonPythonModel:
    """The class Triton's python backend instantiates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.specs = input_specs(config)
        self.output_names = [o["name"] for o in config["output"]]
        self.batched = config.get("max_batch_size", 0) > 0
        threads = config_parameter(config, "intra_op_thread_count")
        runtime = config_parameter(config, "runtime") or "onnxruntime"
        file_name = config_parameter(config, "model_file") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], file_name)
        spin = config_parameter(config, "allow_spinning") == "1"
        precision = config_parameter(config, "precision") or "fp32"
        self._run = RUNNERS[runtime](path, self.output_names, int(threads) if threads else None, spin, args, precision)

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds: list[Feed | RequestError] = []
        for request in requests:
            try:
                feeds.append(check_request(lambda n, r=request: _as_numpy(r, n), self.specs))
            except RequestError as e:
                feeds.append(e)
        responses = []
        for result in run_requests(self._run, feeds, self.output_names, self.batched):
            if isinstance(result, RequestError):
                error = pb_utils.TritonError(str(result), getattr(pb_utils.TritonError, result.code))
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses


def _as_numpy(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
