"""Triton model repository writer: `<repo>/<name>/config.pbtxt` plus one folder per model version.

Two flavours:
- portable: Triton's python backend runs the model through a generated model.py (the source of
  deploykit.package.triton_python_model) with ONNX Runtime or OpenVINO, so it serves on any Triton build,
  even one with only the python backend.
- native: Triton's own onnxruntime_onnx, openvino or tensorrt_plan backend loads model.onnx / model.xml /
  model.plan directly.

A new version is assembled in a hidden folder inside `<repo>/<name>/` and renamed into place, so a
server polling the repository never sees half a version and existing versions are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from google.protobuf.message import DecodeError
from google.protobuf.text_encoding import CEscape
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploykit.errors import DeploykitError
from deploykit.files import atomic_copy, atomic_write_text
from deploykit.package.names import validate_model_name

PLATFORMS = ("onnxruntime_onnx", "openvino", "tensorrt_plan", "python")
_IR_TYPES = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "f64": "TYPE_FP64", "i64": "TYPE_INT64", "i32": "TYPE_INT32",
             "i8": "TYPE_INT8", "u8": "TYPE_UINT8", "boolean": "TYPE_BOOL"}  # fmt: skip
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")

_TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.STRING: "TYPE_STRING",
}


class TritonModelOptions(BaseModel):
    """How one model is served by Triton: flavour, batching, instances, versions, warm-up, threads."""

    model_config = ConfigDict(extra="forbid")
    flavour: Literal["portable", "native"] = Field(
        "portable",
        description="portable: python backend running ONNX Runtime via a generated model.py; "
        "native: Triton's onnxruntime_onnx or tensorrt_plan backend.",
    )
    max_batch_size: int = Field(8, ge=0, description="Largest batch Triton forms; 0 disables batching.")
    dynamic_batching: bool = Field(
        True, description="Let Triton merge concurrent requests into one batch (only when max_batch_size >= 1)."
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list, description="Batch sizes the dynamic batcher aims for; each <= max_batch_size."
    )
    # 0 still batches every request that queued while the instance was busy, without making a lone request
    # wait: measured on the quickstart model, 500 us added 0.6 ms to P50 at one user and no throughput at eight.
    max_queue_delay_us: int = Field(0, ge=0, description="Longest a request waits for a batch to fill (us).")
    instances: int = Field(1, ge=1, description="Model instances (instance_group count).")
    kind: Literal["cpu", "gpu"] = Field("cpu", description="Where instances run: KIND_CPU or KIND_GPU.")
    versions_served: int | None = Field(
        1, ge=1, description="Serve the newest N versions; null serves every version in the repository."
    )
    warmup: bool = Field(True, description="Run zero-filled batches (1 and max) at load time.")
    threads: int | None = Field(None, ge=1, description="Runtime intra-op threads; null lets it choose.")
    runtime: Literal["onnxruntime", "openvino"] = Field(
        "onnxruntime",
        description="What runs an ONNX model: ONNX Runtime, or OpenVINO (what the benchmark's selection picks when "
        "it is faster here). An OpenVINO IR (.xml) always runs on OpenVINO.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="OpenVINO only: the float layers' precision, bf16 on CPUs with AVX-512 BF16 or AMX (what the "
        "benchmark picked it in); fp32 is always said, since OpenVINO's own default there is bf16.",
    )
    spin: bool = Field(
        False, description="Portable only: ONNX Runtime threads spin while idle (lower latency on dedicated cores)."
    )
    execution_env: str | None = Field(
        None, description="Portable only: Python environment folder with numpy and onnxruntime for the stub."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TritonModelOptions:
        too_big = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if too_big:
            raise ValueError(
                f"preferred_batch_sizes {too_big} must lie between 1 and max_batch_size ({self.max_batch_size})"
            )
        if self.execution_env and self.flavour != "portable":
            raise ValueError("execution_env applies to the portable flavour only: drop it or set flavour portable")
        if self.precision != "fp32" and self.runtime != "openvino":
            raise ValueError(
                f"precision {self.precision} runs on OpenVINO only: set runtime openvino or precision fp32"
            )
        return self


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's TYPE_* name
    dims: list[int]  # without the batch dim when the model is batched; -1 for a dynamic size


@dataclass(frozen=True)
class ModelIO:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batched: bool  # every input and output has a dynamic first (batch) dimension


def _load_onnx(model_file: Path) -> onnx.ModelProto:
    if not model_file.is_file():
        raise DeploykitError(f"Model file {model_file} does not exist: pass the path of an exported .onnx file.")
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except (DecodeError, ValueError) as e:
        raise DeploykitError(
            f"{model_file} is not an ONNX model ({e}): pass a .onnx file from the export stage."
        ) from None
    if not model.graph.output:
        raise DeploykitError(
            f"{model_file} is not an ONNX model (its graph has no outputs): pass a .onnx file from the export stage."
        )
    return model


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def _io_of(model: onnx.ModelProto, model_file: Path) -> ModelIO:
    weights = {t.name for t in model.graph.initializer}  # old exporters list weights as graph inputs too
    values = [v for v in model.graph.input if v.name not in weights], list(model.graph.output)
    shapes = [_shape(v) for v in values[0] + values[1]]
    batched = all(s and s[0] == -1 for s in shapes)

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        elem = value.type.tensor_type.elem_type
        if elem not in _TRITON_TYPES:
            raise DeploykitError(
                f"{model_file}: tensor '{value.name}' has ONNX type {onnx.TensorProto.DataType.Name(elem)}, "
                "which Triton cannot serve; cast it to a numeric type before export."
            )
        dims = _shape(value)[1:] if batched else _shape(value)
        return TensorSpec(value.name, _TRITON_TYPES[elem], dims)

    return ModelIO([spec(v) for v in values[0]], [spec(v) for v in values[1]], batched)


def model_io(model_file: Path) -> ModelIO:
    """Inputs, outputs and batchability of an ONNX model, read from its graph (weights are not loaded)."""
    model_file = Path(model_file)
    return _io_of(_load_onnx(model_file), model_file)


def ir_io(xml: Path) -> ModelIO:
    """Inputs, outputs and batchability of an OpenVINO IR, read with OpenVINO."""
    from deploykit.runtime.ov_rt import require_openvino

    model = require_openvino().Core().read_model(str(xml))
    ports = [*model.inputs, *model.outputs]
    shapes = [[d.get_length() if d.is_static else -1 for d in port.get_partial_shape()] for port in ports]
    batched = all(s and s[0] == -1 for s in shapes)

    def spec(port: object, shape: list[int]) -> TensorSpec:
        kind = port.get_element_type().get_type_name()  # type: ignore[attr-defined]
        if kind not in _IR_TYPES:
            raise DeploykitError(f"{xml}: tensor '{port.get_any_name()}' has type {kind}, which Triton cannot serve.")  # type: ignore[attr-defined]
        return TensorSpec(port.get_any_name(), _IR_TYPES[kind], shape[1:] if batched else shape)  # type: ignore[attr-defined]

    specs = [spec(port, shape) for port, shape in zip(ports, shapes)]
    return ModelIO(specs[: len(model.inputs)], specs[len(model.inputs) :], batched)


def _text(value: str) -> str:
    return f'"{CEscape(value, as_utf8=True)}"'


def _dims(dims: list[int]) -> str:
    return f"[ {', '.join(map(str, dims))} ]"


DimsOf = Callable[[TensorSpec], list[int]]


def _tensors(section: str, specs: list[TensorSpec], dims_of: DimsOf) -> list[str]:
    rows = [f"  {{ name: {_text(s.name)}, data_type: {s.data_type}, dims: {_dims(dims_of(s))} }}" for s in specs]
    return [f"{section} [", ",\n".join(rows), "]"]


def _parameters(options: TritonModelOptions, platform: str, model_file: str) -> list[str]:
    params: dict[str, str] = {}
    if options.threads and platform not in ("tensorrt_plan", "openvino"):  # the onnxruntime backend and model.py
        params["intra_op_thread_count"] = str(options.threads)
    if options.threads and platform == "openvino":
        params["INFERENCE_NUM_THREADS"] = str(options.threads)
    if platform == "python":  # which runtime model.py opens, on which file, in which precision
        runtime = "openvino" if model_file.endswith(".xml") else options.runtime
        params |= {"runtime": runtime, "model_file": model_file}
        if runtime == "openvino":
            params["precision"] = options.precision
    if platform == "openvino":  # the backend's own switch, always said (it logs an error line for each unset key)
        params["HINT_BF16"] = "YES" if options.precision == "bf16" else "NO"
    if options.spin and platform == "python":
        params["allow_spinning"] = "1"
    if options.execution_env and platform == "python":
        params["EXECUTION_ENV_PATH"] = options.execution_env
    return [f"parameters {{ key: {_text(k)}, value: {{ string_value: {_text(v)} }} }}" for k, v in params.items()]


def _warmup(io: ModelIO, options: TritonModelOptions, dims_of: DimsOf) -> list[str]:
    if not options.warmup:
        return []
    # warm-up needs concrete shapes; an unbatched config keeps the batch dim, which is set to 1 here
    shapes = {s.name: [1, *s.dims] if io.batched and options.max_batch_size == 0 else dims_of(s) for s in io.inputs}
    dynamic = [name for name, dims in shapes.items() if -1 in dims]
    if dynamic:
        return [
            f"# no model_warmup: input '{dynamic[0]}' has a dynamic size besides the batch; warm-up needs fixed shapes"
        ]
    entries = []
    for size in sorted({1, max(options.max_batch_size, 1)}):
        inputs = " ".join(
            f"inputs {{ key: {_text(s.name)}, value: {{ data_type: {s.data_type}, "
            f"dims: {_dims(shapes[s.name])}, zero_data: true }} }}"
            for s in io.inputs
        )
        entries.append(f'  {{ name: "zeros_b{size}", batch_size: {size}, {inputs} }}')
    return ["model_warmup [", ",\n".join(entries), "]"]


def render_config(
    name: str, io: ModelIO, options: TritonModelOptions, platform: str, model_file: str = "model.onnx"
) -> str:
    """The config.pbtxt text (protobuf text of Triton's ModelConfig) for one model stored as `model_file`."""
    if platform not in PLATFORMS:
        raise DeploykitError(f"Triton platform {platform!r} is not supported: use one of {', '.join(PLATFORMS)}.")
    if platform == "openvino" and options.max_batch_size:
        # Triton 24.10's openvino backend fixes the model's batch at max_batch_size, so a batch-1 warm-up fails to
        # load ("expected requests with batch size '8', got '1'"); ENABLE_BATCH_PADDING loads but breaks on the next
        # full batch (an upstream bug). max_batch_size 0 with a -1 batch dimension loads and serves (measured
        # against the real backend, FIELD-NOTES 2026-12-07): every request runs at its own batch size.
        options = options.model_copy(update={"max_batch_size": 0, "preferred_batch_sizes": []})
    batching = options.max_batch_size > 0
    if batching and not io.batched:
        raise DeploykitError(
            f"Model {name!r} has a fixed batch dimension, so Triton cannot batch it: "
            "export it with a dynamic batch dimension or set max_batch_size to 0."
        )
    empty = [s.name for s in io.inputs + io.outputs if batching and not s.dims]
    if empty:
        raise DeploykitError(
            f"Tensor '{empty[0]}' of model {name!r} has only a batch dimension, which Triton needs reshaped: "
            "export it with shape [batch, 1]."
        )

    def dims_of(spec: TensorSpec) -> list[int]:  # an unbatched config lists the (dynamic) batch dim itself
        return [-1, *spec.dims] if io.batched and not batching else spec.dims

    runtime = "OpenVINO" if model_file.endswith(".xml") or options.runtime == "openvino" else "ONNX Runtime"
    lines = [
        f"# Written by deploykit ({f'python backend + {runtime}' if platform == 'python' else platform}).",
        f"name: {_text(name)}",
        f"backend: {_text(platform)}" if platform in ("python", "openvino") else f"platform: {_text(platform)}",
        f"max_batch_size: {options.max_batch_size}",
        "version_policy: { all: { } }"
        if options.versions_served is None
        else f"version_policy: {{ latest: {{ num_versions: {options.versions_served} }} }}",
        *([f"default_model_filename: {_text(model_file)}"] if platform == "openvino" else []),
        *_tensors("input", io.inputs, dims_of),
        *_tensors("output", io.outputs, dims_of),
    ]
    if options.dynamic_batching and not batching:
        lines.append("# no dynamic_batching: max_batch_size 0 turns batching off")
    elif options.dynamic_batching:
        lines.append("dynamic_batching {")
        if options.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_dims(sorted(set(options.preferred_batch_sizes)))}")
        lines += [f"  max_queue_delay_microseconds: {options.max_queue_delay_us}", "}"]
    lines.append(f"instance_group [ {{ count: {options.instances}, kind: KIND_{options.kind.upper()} }} ]")
    lines += _parameters(options, platform, model_file)
    if platform == "onnxruntime_onnx":
        lines.append(
            "# graph optimisation: the onnxruntime backend defaults to ORT_ENABLE_ALL; "
            "optimization { graph { level: 1 } } would lower it to 'extended', so it is left out"
        )
    lines += _warmup(io, options, dims_of)
    return "\n".join(lines) + "\n"


def list_versions(repo: Path, name: str) -> list[int]:
    """The version numbers present under `<repo>/<name>/`, ascending (hidden temp folders are not versions)."""
    model_dir = Path(repo) / validate_model_name(name)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_tensors(sub)


def _external_data(model: onnx.ModelProto, model_file: Path) -> list[Path]:
    """The external weight files (e.g. model.onnx.data) the model refers to, checked to sit beside it."""
    locations = {
        entry.value
        for t in _all_tensors(model.graph)
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    files = []
    for location in sorted(locations):
        path = model_file.parent / location
        if Path(location).is_absolute() or ".." in Path(location).parts or not path.is_file():
            raise DeploykitError(
                f"{model_file} refers to external weights {location!r} that are not beside it: "
                "keep that file next to the model or re-export with external_data=False."
            )
        files.append(path)
    return files


def _plan_source_onnx(plan: Path, max_batch_size: int) -> Path:
    """The ONNX model a TensorRT engine was built from (its I/O cannot be read without TensorRT)."""
    from deploykit.runtime import engine_metadata_path  # imports torch: only needed for engines

    meta_path = engine_metadata_path(plan)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    source = meta.get("source_onnx")
    candidates = [plan.parent / "source" / source, plan.parent / source] if source else []
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise DeploykitError(
            f"Cannot find the ONNX model {plan} was built from (named in {meta_path.name}), which tells its inputs: "
            "package the engine from the tensorrt stage's output folder."
        )
    engine_max = meta.get("profile", {}).get("max", [max_batch_size])[0]
    if max_batch_size > engine_max:
        raise DeploykitError(
            f"max_batch_size {max_batch_size} exceeds the largest batch ({engine_max}) engine {plan} was built for: "
            "lower max_batch_size or rebuild the engine with a larger max_batch."
        )
    return found


def _native_platform(suffix: str, runtime: str) -> str:
    if suffix == ".plan":
        return "tensorrt_plan"
    return "openvino" if suffix == ".xml" or runtime == "openvino" else "onnxruntime_onnx"


def write_triton_model(
    repo: Path,
    name: str,
    model_file: Path,
    options: TritonModelOptions,
    version: int | None = None,
    notes: str | None = None,
) -> Path:
    """Add `model_file` as a new version of model `name` in Triton repository `repo`; return the version folder.

    `notes` (markdown for the model's clients: its preprocessing) go to README.md beside config.pbtxt, which Triton
    ignores."""
    validate_model_name(name)
    repo, model_file = Path(repo), Path(model_file)
    suffix = model_file.suffix.lower()
    if suffix not in (".onnx", ".xml", ".plan"):
        raise DeploykitError(
            f"Cannot serve {model_file} with Triton: pass a .onnx model, an OpenVINO .xml or a .plan TensorRT engine."
        )
    if suffix == ".plan" and options.flavour == "portable":
        raise DeploykitError(
            f"{model_file} is a TensorRT engine, which the portable flavour cannot run: use flavour native."
        )
    if not model_file.is_file():
        raise DeploykitError(f"Model file {model_file} does not exist: pass the path of an exported model.")

    platform = "python" if options.flavour == "portable" else _native_platform(suffix, options.runtime)
    stored = f"model{suffix}"
    if suffix == ".xml":
        io, extra = ir_io(model_file), [model_file.with_suffix(".bin")]
    else:
        onnx_file = _plan_source_onnx(model_file, options.max_batch_size) if suffix == ".plan" else model_file
        graph = _load_onnx(onnx_file)
        io, extra = _io_of(graph, onnx_file), _external_data(graph, model_file) if suffix == ".onnx" else []
    config = render_config(name, io, options, platform, stored)  # every check before any write

    model_dir = repo / name
    existing = list_versions(repo, name)
    number = version if version is not None else max(existing, default=0) + 1
    if number < 1:
        raise DeploykitError(f"Model version {number} is not allowed: Triton versions are whole numbers from 1.")
    target = model_dir / str(number)
    if target.exists():
        raise DeploykitError(
            f"Version {number} of model {name!r} already exists in {repo}: leave version unset to add the next one."
        )

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".v{number}-", dir=model_dir))  # hidden: Triton skips non-numeric folders
    try:
        atomic_copy(model_file, staging / stored)
        for data in extra:  # an ONNX graph names these files, so they keep their names; an IR's .bin follows its .xml
            atomic_copy(data, staging / (data.name if suffix == ".onnx" else "model.bin"))
        if platform == "python":
            atomic_copy(PYTHON_MODEL, staging / "model.py")
        staging.chmod(0o755)  # mkdtemp's folder is owner-only; the server may run as another user
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    atomic_write_text(model_dir / "config.pbtxt", config)
    if notes is not None:
        atomic_write_text(model_dir / "README.md", notes)
    return target
