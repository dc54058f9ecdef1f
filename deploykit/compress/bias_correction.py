"""Bias correction for ONNX Runtime's QDQ models: each quantized Conv/Gemm's bias absorbs the mean error that
INT8 weights add to its output.

Rounding a layer's weights to 8 bits shifts the mean of its output channels (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", 2019): a small, systematic error that BatchNorm-free INT8 graphs
carry into every later layer and that per-tensor weight scales (and depthwise convolutions) make large. Each layer
is corrected on the input it reads in the quantized model, from the calibration batches:

    delta[c] = mean over samples and positions of (conv(x, W_int8 - W_float))[c] + (b_int8 - b_float)[c]

and its int32 bias moves by -delta / bias_scale. With its own input on both sides, each layer's correction is
independent of the others, so one pass corrects them all (the "fast" variant, as NNCF does for OpenVINO). ONNX
Runtime's quantizer has no such step; NNCF's runs only on its own quantized graphs, so this module does the
arithmetic itself on the model ONNX Runtime wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from deploykit.files import atomic_path

_CORRECTED_OPS = ("Conv", "Gemm")
_MAX_ROWS = 8  # samples per pass: the inputs of every corrected layer are held at once


@dataclass
class _Layer:
    node: onnx.NodeProto
    weight_delta: torch.Tensor  # W_int8 - W_float, as the layer computes with it
    bias_delta: np.ndarray  # b_int8 - b_float, per output channel
    bias: onnx.TensorProto  # the int32 initializer the correction rewrites
    bias_scale: np.ndarray  # per output channel
    total: np.ndarray  # running sum of the per-channel output error
    count: int = 0

    def add(self, x: np.ndarray) -> None:
        """Accumulate the mean output error that the weight delta gives on input batch `x`."""
        error = _apply(self.node, torch.from_numpy(np.ascontiguousarray(x)), self.weight_delta)
        dims = [d for d in range(error.dim()) if d != 1]  # every axis but the channels
        self.total += error.double().sum(dim=dims).numpy()
        self.count += error.numel() // error.shape[1]


def correct_bias(float_model: Path, quant_model: Path, batches: Sequence[np.ndarray]) -> int:
    """Rewrite `quant_model` (a QDQ model ONNX Runtime made from `float_model`) with corrected biases; returns how
    many layers were corrected. Layers left in FP32, or without a quantized bias, are left as they are."""
    model = onnx.load(str(quant_model))
    layers = _layers(model, onnx.load(str(float_model)))
    if not layers:
        return 0
    readers: dict[str, list[_Layer]] = {}  # a tensor may feed several layers (a block's conv and its shortcut)
    for layer in layers:
        readers.setdefault(layer.node.input[0], []).append(layer)
    run = _probe(model, list(readers))
    for batch in _split(batches):
        for value, reading in zip(run(batch), readers.values()):
            for layer in reading:
                layer.add(value)
    for layer in layers:
        delta = layer.total / layer.count + layer.bias_delta
        q = numpy_helper.to_array(layer.bias).astype(np.int64) - np.round(delta / layer.bias_scale).astype(np.int64)
        limits = np.iinfo(np.int32)
        q = np.clip(q, limits.min, limits.max).astype(np.int32)
        layer.bias.CopyFrom(numpy_helper.from_array(q, layer.bias.name))
    with atomic_path(Path(quant_model)) as tmp:
        onnx.save(model, str(tmp))
    return len(layers)


def _layers(model: onnx.ModelProto, float_model: onnx.ModelProto) -> list[_Layer]:
    """The quantized Conv/Gemm nodes whose weight and bias come from DequantizeLinear of initializers, each matched
    to its float twin by node name (the quantizer keeps names; a folded Relu gives the output another one)."""
    initializers = {t.name: t for t in model.graph.initializer}
    float_weights = {t.name: numpy_helper.to_array(t) for t in float_model.graph.initializer}
    twins = {n.name: n for n in float_model.graph.node if n.op_type in _CORRECTED_OPS and n.name}
    producers = {out: n for n in model.graph.node for out in n.output}
    layers = []
    for node in model.graph.node:
        twin = twins.get(node.name)
        if node.op_type not in _CORRECTED_OPS or twin is None or len(node.input) < 3 or len(twin.input) < 3:
            continue
        weight, bias = producers.get(node.input[1]), producers.get(node.input[2])
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in (weight, bias)):
            continue
        if not all(i in initializers for p in (weight, bias) for i in p.input) or not _plain(node):
            continue
        w_float, b_float = (float_weights.get(twin.input[i]) for i in (1, 2))
        if w_float is None or b_float is None:
            continue
        w_int8 = _dequantize(weight, initializers)
        if w_int8.shape != w_float.shape:
            continue
        scale = numpy_helper.to_array(initializers[bias.input[1]]).astype(np.float64)
        channels = b_float.shape[0]
        layers.append(
            _Layer(
                node=node,
                weight_delta=torch.from_numpy((w_int8 - w_float).astype(np.float32)),
                bias_delta=_dequantize(bias, initializers).astype(np.float64) - b_float,
                bias=initializers[bias.input[0]],
                bias_scale=np.broadcast_to(scale, (channels,)),
                total=np.zeros(channels),
            )
        )
    return layers


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _plain(node: onnx.NodeProto) -> bool:
    """Whether `_apply` computes this node as ONNX does: explicit pads only; Gemm as x @ W^T, unscaled."""
    attrs = _attributes(node)
    if node.op_type == "Conv":
        return attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    return attrs.get("transA", 0) == 0 and attrs.get("transB", 0) == 1 and attrs.get("alpha", 1.0) == 1.0


def _apply(node: onnx.NodeProto, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The node's linear part (no bias) on input `x` with weight `weight`."""
    if node.op_type == "Gemm":
        return x.reshape(x.shape[0], -1) @ weight.T
    attrs = _attributes(node)
    spatial = weight.dim() - 2
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    # ONNX lists all begins then all ends; F.pad wants (last begin, last end, ...) from the last axis back.
    torch_pads = [p for axis in reversed(range(spatial)) for p in (pads[axis], pads[axis + spatial])]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(
        F.pad(x, torch_pads),
        weight,
        stride=list(attrs.get("strides", [1] * spatial)),
        dilation=list(attrs.get("dilations", [1] * spatial)),
        groups=attrs.get("group", 1),
    )


def _dequantize(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray:
    """A DequantizeLinear of initializers, evaluated: (q - zero_point) * scale along the node's axis."""
    q, scale, *zero = (numpy_helper.to_array(initializers[name]).astype(np.float64) for name in node.input)
    zero_point = zero[0] if zero else np.zeros_like(scale)
    if scale.size > 1:  # per channel, along the node's axis
        shape = [1] * q.ndim
        shape[_attributes(node).get("axis", 1)] = scale.size
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return ((q - zero_point) * scale).astype(np.float32)


def _split(batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [batch[i : i + _MAX_ROWS] for batch in batches for i in range(0, len(batch), _MAX_ROWS)]


def _probe(model: onnx.ModelProto, outputs: list[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
    """A function giving the named tensors of `model` on a batch (exposed as extra graph outputs)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs if name not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by name
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(outputs, {name: np.ascontiguousarray(batch, dtype=np.float32)})
