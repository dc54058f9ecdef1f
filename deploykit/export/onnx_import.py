"""ONNX -> canonical ONNX: bring a model made by another tool into the pipeline's one shape of graph.

Downstream stages assume one float32 input "input" laid out [N, C, ...] and one float32 output "logits", both with
a symbolic batch dim 0, default-domain opset >= 13 and every weight inside the one file. Real files bring a static
batch of 1, opset 11, external .data files, their own tensor names and NHWC inputs; import_onnx rewrites those and
proves with ONNX Runtime that the result still computes what the original does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper, version_converter

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_bytes

CANONICAL_OPSET = 13  # the oldest opset the quantize, OpenVINO and TensorRT stages all take
INPUT, OUTPUT, BATCH = "input", "logits", "batch"
LAYOUTS = ("auto", "NCHW", "NHWC")
PARITY_RTOL = 1e-5  # imported vs original, relative to the logits' scale: the same ops on the same weights
_BATCH_RTOL = 1e-4  # one sample alone vs inside a batch: ORT may pick other kernels for another batch size
_TO_NHWC = [0, 2, 3, 1]  # the Transpose in front of an NHWC graph: canonical NCHW "input" -> what the graph expects
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one message, so for an ONNX file without external data

Dim = int | str | None


@dataclass(frozen=True)
class OnnxInfo:
    """What an ONNX file's graph says about its input and output, read without loading external weights."""

    input_name: str
    output_name: str
    input_shape: list[Dim]  # as stored: int, the symbol's name, or None for an unnamed unknown dim
    layout: str  # "NCHW" or "NHWC", resolved from input_layout
    sample_shape: tuple[int | None, ...]  # one sample, channels first; None where the file leaves the dim open
    batch: str | int  # "dynamic", or the fixed batch size the graph declares
    opset: int  # default-domain opset
    has_external_data: bool
    num_outputs: int  # only the first output is imported; the rest are dropped


def _dims(value: onnx.ValueInfoProto) -> list[Dim] | None:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _shape_text(shape: Any) -> str:
    return "(" + ", ".join("?" if d is None or isinstance(d, str) else str(d) for d in shape) + ")"


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every graph nested in its nodes' attributes (If, Loop, Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _subgraphs(sub)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for g in _subgraphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                yield from (*([attr.t] if attr.HasField("t") else []), *attr.tensors)


def _load(path: Path) -> onnx.ModelProto:
    """The ModelProto at `path`, weights left in their external files."""
    if not path.is_file():
        raise DeploykitError(f"The ONNX model {path} does not exist: check model.onnx in the pipeline file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as exc:
        raise DeploykitError(f"The ONNX model {path} could not be read ({exc}): check its permissions.") from exc
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise DeploykitError(
            f"{path} is not an ONNX file (it does not parse as an ONNX model): point model.onnx at a .onnx export."
        ) from exc
    # An empty or unlucky file parses as an empty message: a real model always says its IR version and opsets.
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph"):
        raise DeploykitError(
            f"{path} is not an ONNX file (it holds no model graph): point model.onnx at a .onnx export."
        )
    return model


def _inspect(model: onnx.ModelProto, path: Path, input_layout: str) -> OnnxInfo:
    if input_layout not in LAYOUTS:
        raise DeploykitError(f"Unknown model.input_layout {input_layout!r}: use one of {', '.join(LAYOUTS)}.")
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise DeploykitError(f"{path} imports no standard ONNX opset (only custom domains): re-export it as ONNX.")
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]  # old exporters list weights as inputs too
    if not inputs:
        raise DeploykitError(f"The ONNX model {path} has no inputs: export the model with its image tensor as input.")
    if len(inputs) > 1:
        names = ", ".join(repr(i.name) for i in inputs)
        raise DeploykitError(
            f"The ONNX model {path} has {len(inputs)} inputs ({names}) but the pipeline feeds one image tensor: "
            "re-export it with a single input."
        )
    if not graph.output:
        raise DeploykitError(f"The ONNX model {path} has no outputs: re-export it with its logits as output.")
    source, output = inputs[0], graph.output[0]
    elem = source.type.tensor_type.elem_type
    if not source.type.HasField("tensor_type") or elem != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(elem) if source.type.HasField("tensor_type") else "a non-tensor"
        raise DeploykitError(
            f"The ONNX model {path} takes {kind} input {source.name!r} but the pipeline feeds float32 images: "
            "re-export it with a float32 input."
        )
    out_elem = output.type.tensor_type.elem_type
    if out_elem not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.FLOAT):
        raise DeploykitError(
            f"The first output {output.name!r} of the ONNX model {path} is "
            f"{onnx.TensorProto.DataType.Name(out_elem)}, not float32 logits: re-export it with the logits first."
        )
    if source.name == output.name:
        raise DeploykitError(f"The ONNX model {path} returns its input {source.name!r} unchanged: export the model.")
    shape = _dims(source)
    if shape is None or len(shape) < 2:
        found = "no shape" if shape is None else f"shape {_shape_text(shape)}"
        raise DeploykitError(
            f"The input {source.name!r} of the ONNX model {path} has {found}, not [batch, channels, ...]: "
            "re-export it with a batched image input."
        )
    layout = input_layout
    if layout == "auto":
        nhwc = len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3)
        layout = "NHWC" if nhwc else "NCHW"
    if layout == "NHWC" and len(shape) != 4:
        raise DeploykitError(
            f"model.input_layout is NHWC but the input {source.name!r} of {path} has shape {_shape_text(shape)}, "
            "not 4-D: use input_layout NCHW or auto."
        )
    sample = shape[1:] if layout == "NCHW" else [shape[3], shape[1], shape[2]]
    return OnnxInfo(
        input_name=source.name,
        output_name=output.name,
        input_shape=shape,
        layout=layout,
        sample_shape=tuple(d if isinstance(d, int) and d > 0 else None for d in sample),
        batch=shape[0] if isinstance(shape[0], int) and shape[0] > 0 else "dynamic",
        opset=opset,
        has_external_data=any(external_data_helper.uses_external_data(t) for t in _tensors(graph)),
        num_outputs=len(graph.output),
    )


def inspect_onnx(path: Path, input_layout: str = "auto") -> OnnxInfo:
    """Read an ONNX file's input, output, layout, batch and opset without loading its external weights.

    Raises DeploykitError for a file that is not ONNX or whose graph cannot take one float32 image batch.
    """
    path = Path(path)
    return _inspect(_load(path), path, input_layout)


def check_sample_shape(info: OnnxInfo, sample_shape: tuple[int, ...]) -> None:
    """Fail early when the data's samples (channels first, no batch) cannot feed the graph's input."""
    sample = tuple(sample_shape)
    fits = len(sample) == len(info.sample_shape) and all(
        want is None or want == got for want, got in zip(info.sample_shape, sample)
    )
    if not fits:
        raise DeploykitError(
            f"The ONNX model's input {info.input_name!r} takes samples of shape {_shape_text(info.sample_shape)} "
            f"(channels first; the file is {info.layout}) but the data gives {_shape_text(sample)}: "
            "set model.input_layout or data.image_size/data.channels to match."
        )


def _names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in _subgraphs(graph):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        names.update(t.name for t in g.initializer)
        names.update(s.values.name for s in g.sparse_initializer)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere they appear, nested graphs included (they may read outer-scope tensors)."""
    for g in _subgraphs(graph):
        for value in (*g.input, *g.output, *g.value_info, *g.initializer):
            value.name = mapping.get(value.name, value.name)
        for sparse in g.sparse_initializer:
            sparse.values.name = mapping.get(sparse.values.name, sparse.values.name)
        for node in g.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
            node.output[:] = [mapping.get(n, n) for n in node.output]


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor `node` reads, counting what its nested graphs read from the outer scope (a superset)."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            for g in _subgraphs(sub):
                for inner in g.node:
                    names.update(inner.input)
    return names


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes and weights that only fed the outputs that were dropped."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed |= _reads(node)
    kept.reverse()
    if len(kept) < len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    for field in (graph.initializer, graph.value_info):
        keep = [item for item in field if item.name in needed]
        if len(keep) < len(field):
            del field[:]
            field.extend(keep)


def _set_batch(model: onnx.ModelProto, batch: int | None) -> None:
    """Dim 0 of the input and output: the symbol "batch" (None) or a fixed size."""
    for value in (model.graph.input[0], model.graph.output[0]):
        shape = value.type.tensor_type.shape
        if value.type.tensor_type.HasField("shape") and len(shape.dim) >= 1:
            if batch is None:
                shape.dim[0].dim_param = BATCH
            else:
                shape.dim[0].dim_value = batch


def _canonical(model: onnx.ModelProto, info: OnnxInfo, src: Path) -> onnx.ModelProto:
    """Rename, drop extra outputs and put a Transpose in front of an NHWC graph; the batch dim is left as it was."""
    if info.opset < CANONICAL_OPSET:
        try:
            model = version_converter.convert_version(model, CANONICAL_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeError/ConvertError from C++ for any op it lacks
            raise DeploykitError(
                f"Converting {src} from opset {info.opset} to {CANONICAL_OPSET} failed ({_reason(exc)}): "
                f"re-export it with opset {CANONICAL_OPSET} or newer."
            ) from exc
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    if model.ir_version >= 4:  # IR 4 stopped requiring weights to be listed as inputs; the pipeline wants one input
        keep = [i for i in graph.input if i.name not in weights]
        del graph.input[:]
        graph.input.extend(keep)
    del graph.output[1:]
    _prune(graph)

    existing = _names(graph)
    taken = existing | {INPUT, OUTPUT}
    inner = _unique(f"{INPUT}_nhwc", taken) if info.layout == "NHWC" else INPUT
    mapping = {info.input_name: inner, info.output_name: OUTPUT}
    for name in (INPUT, OUTPUT):  # another tensor already called "input" or "logits" moves out of the way
        if name in existing and name not in mapping:
            mapping[name] = _unique(f"{name}_orig", taken)
    _rename(graph, mapping)  # one lookup per reference, so swapped names cannot chain

    if info.layout == "NHWC":
        dims = list(graph.input[0].type.tensor_type.shape.dim)
        new_input = helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, None)
        new_shape = new_input.type.tensor_type.shape
        for i in (0, 3, 1, 2):
            new_shape.dim.add().CopyFrom(dims[i])
        node_names = {n.name for n in graph.node}
        transpose = helper.make_node(
            "Transpose", [INPUT], [inner], name=_unique("input_to_nhwc", node_names), perm=_TO_NHWC
        )
        graph.node.insert(0, transpose)
        graph.input[0].CopyFrom(new_input)

    # An opset-13 graph needs IR 7; converted files keep their old IR version otherwise.
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    return model


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failed probe at batch 2 logs errors; failures reach the caller as exceptions
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, input_name: str, output_name: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([output_name], {input_name: x})[0], dtype=np.float32)


def _diff(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| as a fraction of want's scale (max |want|); inf when the shapes differ."""
    if got.shape != want.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-12)
    return float(np.max(np.abs(got - want))) / scale if want.size else 0.0


def _takes_batch(model: onnx.ModelProto, batch: int, sample: tuple[int, ...], rng: np.random.Generator) -> bool:
    """Does `model` run a batch of `batch` and give each sample what it gives that sample alone?

    A graph exported at batch 1 often hard-codes it (a Reshape to [1, -1]): such a graph fails, returns another
    batch, or mixes samples, and all three show here.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
        session = _session(model)
        x = rng.standard_normal((batch, *sample)).astype(np.float32)
        out = _run(session, INPUT, OUTPUT, x)
        if out.ndim < 1 or out.shape[0] != batch:
            return False
        alone = [_run(session, INPUT, OUTPUT, x[i : i + 1]) for i in range(batch)]
        return all(_diff(out[i : i + 1], one) <= _BATCH_RTOL for i, one in enumerate(alone))
    except Exception:  # noqa: BLE001 (ORT and the checker raise unrelated types; any failure means "not this batch")
        return False


def _reason(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def import_onnx(
    src: Path, dst: Path, input_layout: str = "auto", *, sample_shape: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Write `src` as a canonical ONNX file at `dst` and return what was changed (JSON-able).

    Canonical: float32 input "input" [batch, C, ...] and output "logits" [batch, ...], default-domain opset >= 13,
    weights inside the file. The batch becomes symbolic only if ONNX Runtime shows the graph takes a batch of 2;
    otherwise it stays fixed. ORT must also give the original's output on a random input, or nothing is written.
    `sample_shape` (channels first) fills dims the file leaves open, such as a dynamic height and width.
    """
    src, dst = Path(src), Path(dst)
    model = _load(src)
    info = _inspect(model, src, input_layout)
    if sample_shape is not None:
        check_sample_shape(info, sample_shape)
    sample = tuple(sample_shape) if sample_shape is not None else info.sample_shape
    if any(d is None for d in sample):
        raise DeploykitError(
            f"The input {info.input_name!r} of {src} has open dims {_shape_text(info.sample_shape)} per sample: "
            "give the sample shape (data.image_size/data.channels) so the import can check the model."
        )
    if info.has_external_data:
        try:
            external_data_helper.load_external_data_for_model(model, str(src.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise DeploykitError(
                f"The external weights of {src} could not be read ({_reason(exc)}): keep its .data files beside it."
            ) from exc

    try:
        original = _session(src)
    except Exception as exc:  # ORT's load errors share no base class but Exception
        raise DeploykitError(f"ONNX Runtime could not load {src} ({_reason(exc)}): re-export the model.") from exc
    fixed = info.batch if isinstance(info.batch, int) else 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((fixed, *sample)).astype(np.float32)
    try:
        fed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if info.layout == "NHWC" else x
        want = _run(original, info.input_name, info.output_name, fed)
    except Exception as exc:  # ORT's errors share no base class but Exception
        raise DeploykitError(
            f"ONNX Runtime could not run {src} on a {info.layout} input of shape "
            f"{_shape_text((fixed, *sample))} ({_reason(exc)}): check model.input_layout and the data's shape."
        ) from exc
    if want.ndim < 1 or want.shape[0] != fixed:
        raise DeploykitError(
            f"The output {info.output_name!r} of {src} has shape {_shape_text(want.shape)} for a batch of {fixed}, "
            "with no batch dim first: re-export it so its first output is [batch, ...] logits."
        )

    static = _canonical(model, info, src)
    _set_batch(static, fixed)
    if static.ByteSize() > _MAX_PROTO_BYTES:
        raise DeploykitError(
            f"{src} holds over 2 GiB of weights, more than one ONNX file can hold: import a smaller model."
        )
    dynamic = copy.deepcopy(static)
    _set_batch(dynamic, None)
    del dynamic.graph.value_info[:]  # intermediate shapes were inferred at the fixed batch
    probe = 2 if fixed != 2 else 3
    chosen, batch = (dynamic, "dynamic") if _takes_batch(dynamic, probe, sample, rng) else (static, fixed)

    try:
        onnx.checker.check_model(chosen, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise DeploykitError(
            f"The imported {src} fails onnx.checker ({_reason(exc)}): re-export it with opset {CANONICAL_OPSET}+."
        ) from exc
    try:
        got = _run(_session(chosen), INPUT, OUTPUT, x)
    except Exception as exc:  # ORT's errors share no base class but Exception
        raise DeploykitError(
            f"ONNX Runtime could not run the imported {src} ({_reason(exc)}): re-export it with opset "
            f"{CANONICAL_OPSET} or newer and import that."
        ) from exc
    diff = _diff(got, want)
    if diff > PARITY_RTOL:
        raise DeploykitError(
            f"The imported {src} differs from the original by {diff:.2g} of the logits' scale on a random input "
            f"(limit {PARITY_RTOL:g}): re-export it with opset {CANONICAL_OPSET} or newer and import that."
        )
    atomic_write_bytes(dst, chosen.SerializeToString())

    opset_after = next(o.version for o in chosen.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "source": str(src),
        "original_input": info.input_name,
        "original_output": info.output_name,
        "layout": info.layout,
        "opset_before": info.opset,
        "opset_after": opset_after,
        "batch": batch,
        "had_external_data": info.has_external_data,
        "num_outputs_dropped": info.num_outputs - 1,
        "input_shape": _dims(chosen.graph.input[0]),
        "output_shape": _dims(chosen.graph.output[0]),
        "parity_max_rel_diff": diff,
    }
