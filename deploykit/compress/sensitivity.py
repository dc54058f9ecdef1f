"""Which layers suffer most from INT8: per-layer SQNR between a float ONNX model and its quantized twin.

Both models run on the same batches with every intermediate tensor exposed (ONNX Runtime's own QDQ debugging
tools, `onnxruntime.quantization.qdq_loss_debug`). For each Conv/Gemm/MatMul of the float model we compare the
float and quantized values of its input (as the layer reads it) and of its output, as signal-to-quantization-
noise ratios in dB. A layer's sensitivity is the SQNR it loses between input and output: the error its own
weight and output quantization add. Ranking by output SQNR alone would always blame the deepest layers,
because error accumulates along the network, and excluding those rarely helps.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization.qdq_loss_debug import (
    DEQUANT_OUTPUT_SUFFIX,
    collect_activations,
    compute_signal_to_quantization_noice_ratio,
    modify_model_output_intermediate_tensors,
)

from deploykit.compress.quantize import BatchReader, input_name

# Identical tensors give ~300 dB (the norm over float eps); anything past this is "no error" for ranking.
_MAX_SQNR_DB = 100.0
# Activations a quantizer folds into the layer before them: the layer's quantized output then carries their name.
_FUSED_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's float-vs-quantized agreement, in dB of SQNR (higher is better)."""

    node: str
    op_type: str
    sqnr_in_db: float
    sqnr_out_db: float
    module: str = ""  # the PyTorch module the node was exported from, when the exporter recorded it

    @property
    def loss_db(self) -> float:
        """SQNR lost inside this layer; the ranking key (largest first)."""
        return self.sqnr_in_db - self.sqnr_out_db

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_db": round(self.loss_db, 3)}


def rank_layers(
    float_model: Path, quant_model: Path, batches: Sequence[np.ndarray], scratch: Path, op_types: Sequence[str]
) -> list[LayerSensitivity]:
    """Layers of `op_types` in `float_model` (named nodes only), most sensitive first.

    `quant_model` must come from `float_model` (same tensor names), QDQ or dynamically quantized.
    """
    float_acts = _activations(float_model, batches, scratch / "float.debug.onnx")
    quant_acts = _activations(quant_model, batches, scratch / "quant.debug.onnx")
    graph = onnx.load(str(float_model), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def sqnr(tensor: str) -> float | None:
        # A quantized layer reads (and its consumers read) the dequantized value when there is one.
        quant = quant_acts.get(tensor + DEQUANT_OUTPUT_SUFFIX, quant_acts.get(tensor))
        if tensor not in float_acts or quant is None:
            return None
        return min(compute_signal_to_quantization_noice_ratio(float_acts[tensor], quant), _MAX_SQNR_DB)

    ranked = []
    for node in graph.node:
        if node.op_type not in op_types or not node.name:
            continue
        inputs = [s for s in (sqnr(t) for t in node.input if t and t not in initializers) if s is not None]
        output = node.output[0]
        following = consumers.get(output, [])
        if len(following) == 1 and following[0].op_type in _FUSED_ACTIVATIONS:
            output = following[0].output[0]
        out = sqnr(output)
        if inputs and out is not None:
            ranked.append(
                LayerSensitivity(node.name, node.op_type, round(min(inputs), 3), round(out, 3), _torch_module(node))
            )
    return sorted(ranked, key=lambda layer: layer.loss_db, reverse=True)


def _torch_module(node: onnx.NodeProto) -> str:
    """The dotted PyTorch module path torch.onnx's dynamo exporter stores in a node's metadata ("" if none): for a
    conv with its BatchNorm folded in, the norm's path (e.g. layer1.0.bn2), which names the block."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            return scopes[-2] if len(scopes) >= 3 else ""  # ["", "layer1", "layer1.0", ..., the aten op]
    return ""


def _activations(model: Path, batches: Sequence[np.ndarray], augmented: Path) -> dict[str, list[np.ndarray]]:
    """Every float tensor of `model` on `batches`, keyed by tensor name (one flattened array per batch)."""
    modify_model_output_intermediate_tensors(str(model), str(augmented))
    return collect_activations(str(augmented), BatchReader(input_name(model), batches))
