"""Importing ONNX files made elsewhere: real legacy-exporter files with static batches, opset 11, NHWC inputs,
external data and foreign names become the canonical graph, and bad files fail with one clear sentence."""

import json
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import external_data_helper, helper
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.export.onnx_import import OnnxInfo, check_sample_shape, import_onnx, inspect_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = (3, 16, 16)


class Net(nn.Module):
    """Conv, BN, pooling and a linear head: the usual classifier ops, at a size that exports in milliseconds."""

    def __init__(self, nhwc: bool = False, flat_view: bool = False, features: bool = False) -> None:
        super().__init__()
        self.nhwc, self.flat_view, self.features = nhwc, flat_view, features
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4 if flat_view else 4, 5)

    def forward(self, x):
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        x = torch.relu(self.bn(self.conv(x)))
        if self.flat_view:  # hard-codes batch 1 in the graph (a Reshape to [1, -1])
            pooled = nn.functional.adaptive_avg_pool2d(x, 4).view(1, -1)
        else:
            pooled = x.mean(dim=(2, 3))
        logits = self.head(pooled)
        return (logits, torch.sigmoid(pooled)) if self.features else logits  # the Sigmoid feeds only output 2


def export(path, model, shape=(1, *SAMPLE), opset=13, **kwargs):
    torch.manual_seed(0)
    for p in model.parameters():  # BN statistics that are not the identity, so a layout mix-up shows in the values
        nn.init.normal_(p, std=0.5)
    model.bn.running_mean.normal_(std=0.1)
    model.bn.running_var.uniform_(0.5, 2.0)
    kwargs.setdefault("input_names", ["images"])
    kwargs.setdefault("output_names", ["scores"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy TorchScript exporter is deprecated, on purpose
        torch.onnx.export(model.eval(), torch.randn(shape), str(path), dynamo=False, opset_version=opset, **kwargs)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    made = {
        "nchw13": export(src / "nchw13.onnx", Net()),
        "nchw11": export(src / "nchw11.onnx", Net(), opset=11),
        "nhwc": export(src / "nhwc.onnx", Net(nhwc=True), shape=(1, 16, 16, 3)),
        "view": export(src / "view.onnx", Net(flat_view=True)),
        "two_outputs": export(src / "two.onnx", Net(features=True), output_names=["scores", "features"]),
        "swapped": export(src / "swapped.onnx", Net(), input_names=["logits"], output_names=["input"]),
        "dynamic": export(src / "dynamic.onnx", Net(), dynamic_axes={"images": {0: "N"}, "scores": {0: "N"}}),
        "open_hw": export(src / "open_hw.onnx", Net(), dynamic_axes={"images": {0: "N", 2: "H", 3: "W"}}),
    }
    ext_dir = tmp_path_factory.mktemp("external")
    onnx.save_model(
        onnx.load(str(made["nchw13"])), str(ext_dir / "model.onnx"),
        save_as_external_data=True, all_tensors_to_one_file=True, location="w.data", size_threshold=0,
    )
    made["external"] = ext_dir / "model.onnx"
    return made


def original_outputs(path, x, layout="NCHW"):
    """The original file's first output, one sample at a time (a static-batch original takes only batch 1)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    feed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x
    return np.concatenate([session.run([out], {name: feed[i : i + 1]})[0] for i in range(len(x))])


def canonical_outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["logits"]
    return session.run(["logits"], {"input": x})[0]


def assert_parity(original, imported, sizes, layout="NCHW"):
    rng = np.random.default_rng(1)
    for n in sizes:
        x = rng.standard_normal((n, *SAMPLE)).astype(np.float32)
        want, got = original_outputs(original, x, layout), canonical_outputs(imported, x)
        assert got.shape == want.shape == (n, 5)
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def opset(model):
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_inspect_a_static_batch_nchw_file(files):
    info = inspect_onnx(files["nchw13"])
    assert info == OnnxInfo(
        input_name="images", output_name="scores", input_shape=[1, 3, 16, 16], layout="NCHW",
        sample_shape=(3, 16, 16), batch=1, opset=13, has_external_data=False, num_outputs=1,
    )
    assert inspect_onnx(files["dynamic"]).batch == "dynamic" and inspect_onnx(files["dynamic"]).input_shape[0] == "N"
    assert inspect_onnx(files["nchw11"]).opset == 11
    assert inspect_onnx(files["external"]).has_external_data
    assert inspect_onnx(files["two_outputs"]).num_outputs == 2


def test_inspect_resolves_the_layout(files):
    auto = inspect_onnx(files["nhwc"])
    assert (auto.layout, auto.input_shape, auto.sample_shape) == ("NHWC", [1, 16, 16, 3], (3, 16, 16))
    forced = inspect_onnx(files["nhwc"], input_layout="NCHW")  # the user knows better than the guess
    assert (forced.layout, forced.sample_shape) == ("NCHW", (16, 16, 3))
    assert inspect_onnx(files["nchw13"], input_layout="NHWC").sample_shape == (16, 3, 16)
    with pytest.raises(DeploykitError, match="Unknown model.input_layout 'NWHC'"):
        inspect_onnx(files["nchw13"], input_layout="NWHC")


def test_import_makes_a_static_batch_file_canonical(files, tmp_path):
    dst = tmp_path / "out" / "model.onnx"
    result = import_onnx(files["nchw13"], dst)
    assert json.loads(json.dumps(result)) == result
    assert result["original_input"] == "images" and result["original_output"] == "scores"
    assert (result["layout"], result["opset_before"], result["opset_after"]) == ("NCHW", 13, 13)
    assert result["batch"] == "dynamic" and result["parity_max_rel_diff"] <= 1e-5
    assert result["input_shape"] == ["batch", 3, 16, 16] and result["output_shape"] == ["batch", 5]
    assert not result["had_external_data"] and result["num_outputs_dropped"] == 0
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert dims(model.graph.input[0]) == ["batch", 3, 16, 16] and dims(model.graph.output[0]) == ["batch", 5]
    assert opset(model) == 13
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx"]  # no temp file left behind
    assert_parity(files["nchw13"], dst, [1, 3])


def test_import_converts_opset_11_to_13(files, tmp_path):
    result = import_onnx(files["nchw11"], tmp_path / "model.onnx")
    assert (result["opset_before"], result["opset_after"], result["batch"]) == (11, 13, "dynamic")
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert opset(model) == 13 and model.ir_version >= 7
    assert_parity(files["nchw11"], tmp_path / "model.onnx", [1, 3])


def test_import_puts_nhwc_behind_a_transpose(files, tmp_path):
    result = import_onnx(files["nhwc"], tmp_path / "model.onnx")
    assert (result["layout"], result["input_shape"], result["batch"]) == ("NHWC", ["batch", 3, 16, 16], "dynamic")
    model = onnx.load(str(tmp_path / "model.onnx"))
    first = model.graph.node[0]
    assert first.op_type == "Transpose" and list(first.input) == ["input"]
    assert list(helper.get_attribute_value(first.attribute[0])) == [0, 2, 3, 1]
    assert_parity(files["nhwc"], tmp_path / "model.onnx", [1, 3], layout="NHWC")
    # The same file read as NCHW is (16, 16, 3) per sample: the data's (3, 16, 16) contradicts it before anything runs.
    with pytest.raises(DeploykitError, match=r"\(16, 16, 3\).*\(3, 16, 16\).*input_layout"):
        import_onnx(files["nhwc"], tmp_path / "forced.onnx", input_layout="NCHW", sample_shape=SAMPLE)
    assert not (tmp_path / "forced.onnx").exists()


def test_import_pulls_external_data_into_the_file(files, tmp_path):
    dst = tmp_path / "model.onnx"
    result = import_onnx(files["external"], dst)
    assert result["had_external_data"] and result["batch"] == "dynamic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    model = onnx.load(str(dst), load_external_data=False)
    weights = model.graph.initializer
    assert weights and not any(external_data_helper.uses_external_data(t) for t in weights)
    assert_parity(files["external"], dst, [1, 3])


def test_a_graph_that_hard_codes_batch_1_keeps_it(files, tmp_path):
    dst = tmp_path / "model.onnx"
    result = import_onnx(files["view"], dst)
    assert result["batch"] == 1 and result["input_shape"] == [1, 3, 16, 16]
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert [o.name for o in model.graph.output] == ["logits"]
    assert_parity(files["view"], dst, [1])


def test_extra_outputs_are_dropped(files, tmp_path):
    result = import_onnx(files["two_outputs"], tmp_path / "model.onnx")
    assert result["num_outputs_dropped"] == 1 and result["original_output"] == "scores"
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits"]
    assert "Sigmoid" not in {n.op_type for n in model.graph.node}  # the nodes only the dropped output used go too
    assert_parity(files["two_outputs"], tmp_path / "model.onnx", [1, 3])


def test_foreign_names_that_clash_with_ours_are_swapped_cleanly(files, tmp_path):
    result = import_onnx(files["swapped"], tmp_path / "model.onnx")  # its input is "logits", its output "input"
    assert (result["original_input"], result["original_output"]) == ("logits", "input")
    assert_parity(files["swapped"], tmp_path / "model.onnx", [1, 3])


def test_a_dynamic_batch_gets_our_symbol(files, tmp_path):
    result = import_onnx(files["dynamic"], tmp_path / "model.onnx")
    assert result["batch"] == "dynamic" and result["input_shape"] == ["batch", 3, 16, 16]
    assert dims(onnx.load(str(tmp_path / "model.onnx")).graph.output[0]) == ["batch", 5]


@pytest.mark.parametrize(
    "content, words",
    [
        (os.urandom(4096), "is not an ONNX file"),
        (b"", "is not an ONNX file"),
        (b"model:\n  onnx: model.onnx\n", "is not an ONNX file"),
    ],
    ids=["random-bytes", "empty", "yaml"],
)
def test_files_that_are_not_onnx_fail_with_one_sentence(tmp_path, content, words):
    src = tmp_path / "bad.onnx"
    src.write_bytes(content)
    with pytest.raises(DeploykitError, match=words) as err:
        inspect_onnx(src)
    assert str(src) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DeploykitError, match=words):
        import_onnx(src, tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_open_height_and_width_need_the_sample_shape(files, tmp_path):
    assert inspect_onnx(files["open_hw"]).sample_shape == (3, None, None)
    with pytest.raises(DeploykitError, match=r"open dims \(3, \?, \?\).*data.image_size"):
        import_onnx(files["open_hw"], tmp_path / "model.onnx")
    result = import_onnx(files["open_hw"], tmp_path / "model.onnx", sample_shape=(3, 20, 24))
    assert result["input_shape"] == ["batch", 3, "H", "W"] and result["batch"] == "dynamic"
    x = np.random.default_rng(2).standard_normal((2, 3, 20, 24)).astype(np.float32)
    got = canonical_outputs(tmp_path / "model.onnx", x)
    want = ort.InferenceSession(str(files["open_hw"]), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_a_failed_opset_conversion_says_which_opset_to_use(files, tmp_path, monkeypatch):
    from deploykit.export import onnx_import

    def refuse(model, target):
        raise RuntimeError("No Adapter From Version $11 for Foo")

    monkeypatch.setattr(onnx_import.version_converter, "convert_version", refuse)
    with pytest.raises(DeploykitError, match=r"from opset 11 to 13 failed \(No Adapter.*\): re-export it with opset 13"):
        import_onnx(files["nchw11"], tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def graph_file(path, inputs, nodes, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_graphs_the_pipeline_cannot_feed_are_refused(tmp_path):
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    const = helper.make_node("Constant", [], ["y"], value=helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], [1.0]))
    with pytest.raises(DeploykitError, match="has no inputs"):
        inspect_onnx(graph_file(tmp_path / "none.onnx", [], [const], [out]))

    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    b = helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    add = helper.make_node("Add", ["a", "b"], ["y"])
    with pytest.raises(DeploykitError, match="has 2 inputs \\('a', 'b'\\)"):
        inspect_onnx(graph_file(tmp_path / "two.onnx", [a, b], [add], [y]))

    # A weight listed among the inputs (old exporters do this) is not a second input.
    w = helper.make_tensor("b", onnx.TensorProto.FLOAT, [1, 3, 4, 4], np.ones(48, np.float32))
    assert inspect_onnx(graph_file(tmp_path / "weight.onnx", [a, b], [add], [y], [w])).input_name == "a"

    ints = helper.make_tensor_value_info("a", onnx.TensorProto.INT64, [1, 3, 4, 4])
    yi = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    cast = helper.make_node("Cast", ["a"], ["y"], to=onnx.TensorProto.FLOAT)
    with pytest.raises(DeploykitError, match="takes INT64 input 'a'.*float32"):
        inspect_onnx(graph_file(tmp_path / "ints.onnx", [ints], [cast], [yi]))


def test_check_sample_shape(files):
    info = inspect_onnx(files["nchw13"])
    check_sample_shape(info, (3, 16, 16))
    with pytest.raises(DeploykitError, match=r"\(3, 16, 16\).*\(3, 32, 32\).*input_layout.*data.image_size") as err:
        check_sample_shape(info, (3, 32, 32))
    assert "\n" not in str(err.value)
    with pytest.raises(DeploykitError, match=r"\(1, 16, 16, 3\)"):  # rank differs
        check_sample_shape(info, (1, 16, 16, 3))
    with pytest.raises(DeploykitError, match=r"\(3, 16, 16\).*\(1, 16, 16\)"):  # grey data for an RGB model
        check_sample_shape(info, (1, 16, 16))
    open_dims = OnnxInfo(
        input_name="x", output_name="y", input_shape=["N", 3, "H", "W"], layout="NCHW", sample_shape=(3, None, None),
        batch="dynamic", opset=17, has_external_data=False, num_outputs=1,
    )
    check_sample_shape(open_dims, (3, 64, 48))  # open dims take any size
