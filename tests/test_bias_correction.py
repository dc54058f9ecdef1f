"""Bias correction of ONNX Runtime QDQ models: the mean error INT8 weights add to each layer's output goes away."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.compress.bias_correction import _probe, correct_bias
from deploykit.compress.quantize import quantize_static_qdq
from deploykit.runtime import ort_session

RNG = np.random.default_rng(7)


@pytest.fixture
def float_model(tmp_path):
    """Conv (3->8, 3x3, pad 1, stride 2) -> Relu -> Flatten -> Gemm (128->5): per-channel weight magnitudes spread
    over 300x, so one per-tensor INT8 scale rounds the small channels coarsely and shifts their means."""
    spread = np.geomspace(1.0, 1 / 300, 8, dtype=np.float32)[:, None, None, None]
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * spread
    fc = RNG.standard_normal((5, 128)).astype(np.float32) * np.geomspace(1.0, 1 / 100, 5, dtype=np.float32)[:, None]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32) * 0.1, "b"),
        numpy_helper.from_array(fc, "fc_w"),
        numpy_helper.from_array(np.zeros(5, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("Flatten", ["relu_out"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        inits,
    )
    path = tmp_path / "float.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def images(n):
    return RNG.uniform(0, 1, (n, 3, 8, 8)).astype(np.float32)  # non-negative, like pixels: a mean to shift


def output_error(float_path, quant_path, x):
    """Mean error per output unit (the bias) and mean squared error of the quantized model against the float one."""
    error = ort_session(quant_path, threads=1).run(x) - ort_session(float_path, threads=1).run(x)
    return np.abs(error.mean(axis=0)).mean(), (error**2).mean()


def gemm_weight_bias(float_path, quant_path, x):
    """The bias the Gemm's INT8 weights add on their own: its quantized output against the float Gemm applied to
    the same (quantized) input."""
    model = onnx.load(str(quant_path))
    gemm_input = next(n for n in model.graph.node if n.name == "fc").input[0]
    seen, y = _probe(model, [gemm_input, "y"])(x)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(float_path)).graph.initializer}
    return np.abs((y - (seen.reshape(len(x), -1) @ weights["fc_w"].T + weights["fc_b"])).mean(axis=0)).mean()


def test_correction_removes_the_mean_error_of_int8_weights(float_model, tmp_path):
    calibration, held_out = [images(32) for _ in range(4)], images(512)
    quant = quantize_static_qdq(float_model, tmp_path / "q.onnx", calibration, per_channel=False)
    bias_before, mse_before = output_error(float_model, quant, held_out)
    layer_before = gemm_weight_bias(float_model, quant, held_out)
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(quant)).graph.initializer}

    assert correct_bias(float_model, quant, calibration) == 2  # the conv and the gemm
    # On data it was not computed from: the layer's own bias nearly gone (measured 10x smaller), and the model's
    # output closer to the float model's (its bias 40% and its MSE 20% smaller; activation rounding remains).
    assert gemm_weight_bias(float_model, quant, held_out) < 0.25 * layer_before
    bias_after, mse_after = output_error(float_model, quant, held_out)
    assert bias_after < 0.8 * bias_before and mse_after < mse_before, (bias_before, bias_after, mse_before, mse_after)
    # Only the int32 biases moved; weights and activation ranges are as the quantizer left them.
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(quant)).graph.initializer}
    changed = {name for name in after if not np.array_equal(after[name], before[name])}
    assert changed and all(after[name].dtype == np.int32 for name in changed)


def test_layers_left_in_fp32_are_not_touched(float_model, tmp_path):
    calibration = [images(16)]
    quant = quantize_static_qdq(float_model, tmp_path / "q.onnx", calibration, per_channel=True, exclude=["fc"])
    assert correct_bias(float_model, quant, calibration) == 1
    graph = onnx.load(str(quant)).graph
    fc_bias = next(t for t in graph.initializer if t.name == "fc_b")
    assert numpy_helper.to_array(fc_bias).dtype == np.float32  # still the float bias of an FP32 layer
