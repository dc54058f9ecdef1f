"""Triton model repository writer (config.pbtxt parsed as Triton's ModelConfig) and the portable model.py."""

import json
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import json_format, text_format
from onnx import helper, numpy_helper
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2

from deploykit.errors import DeploykitError
from deploykit.package import triton_python_model as tpm
from deploykit.package.triton_repo import (
    ModelIO,
    TensorSpec,
    TritonModelOptions,
    list_versions,
    model_io,
    render_config,
    write_triton_model,
)

KIND = model_config_pb2.ModelInstanceGroup


def tiny_onnx(path: Path, batch: str | int = "batch", hw: tuple = (4, 4), external: bool = False) -> Path:
    """input [batch, 3, H, W] -> mean over H, W -> MatMul -> logits [batch, 5]."""
    weights = numpy_helper.from_array(np.arange(15, dtype=np.float32).reshape(3, 5) / 10, "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMean", ["input", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [batch, 3, *hw])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [batch, 5])],
        [weights, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=80)
    else:
        onnx.save(model, str(path))
    return path


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return tiny_onnx(tmp_path / "src" / "model.onnx")


IO = ModelIO([TensorSpec("input", "TYPE_FP32", [3, 4, 4])], [TensorSpec("logits", "TYPE_FP32", [5])], batched=True)


# ---- reading the model ----------------------------------------------------------------------------


def test_model_io_reads_names_types_and_batch_dim(tmp_path):
    assert model_io(tiny_onnx(tmp_path / "a.onnx")) == IO
    fixed = model_io(tiny_onnx(tmp_path / "b.onnx", batch=1, hw=("h", "w")))
    assert fixed.batched is False
    assert fixed.inputs == [TensorSpec("input", "TYPE_FP32", [1, 3, -1, -1])]
    assert fixed.outputs == [TensorSpec("logits", "TYPE_FP32", [1, 5])]


def test_model_io_rejects_missing_and_non_onnx_files(tmp_path):
    with pytest.raises(DeploykitError, match="does not exist"):
        model_io(tmp_path / "nope.onnx")
    (tmp_path / "notes.onnx").write_text("not a model at all")
    with pytest.raises(DeploykitError, match="is not an ONNX model"):
        model_io(tmp_path / "notes.onnx")


# ---- config.pbtxt ---------------------------------------------------------------------------------


def test_portable_config_has_every_field():
    options = TritonModelOptions(
        preferred_batch_sizes=[8, 4], max_queue_delay_us=250, instances=2, threads=2, execution_env="/envs/triton"
    )
    config = parse(render_config("digits", IO, options, "python"))
    assert (config.name, config.backend, config.platform, config.max_batch_size) == ("digits", "python", "", 8)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [3, 4, 4])
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [5])]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, KIND.KIND_CPU)]
    assert config.version_policy.latest.num_versions == 1
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "intra_op_thread_count": "2",
        "EXECUTION_ENV_PATH": "/envs/triton",
        "runtime": "onnxruntime",  # what model.py opens the file with
        "model_file": "model.onnx",
    }
    warmups = {w.name: (w.batch_size, w.inputs["input"]) for w in config.model_warmup}
    assert sorted(warmups) == ["zeros_b1", "zeros_b8"]
    assert warmups["zeros_b8"][0] == 8
    assert (list(warmups["zeros_b1"][1].dims), warmups["zeros_b1"][1].zero_data) == ([3, 4, 4], True)


def test_native_config_uses_onnxruntime_platform_on_gpu():
    options = TritonModelOptions(flavour="native", kind="gpu", threads=3, versions_served=None, warmup=False)
    text = render_config("digits", IO, options, "onnxruntime_onnx")
    config = parse(text)
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "")
    assert config.instance_group[0].kind == KIND.KIND_GPU
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert dict(config.parameters)["intra_op_thread_count"].string_value == "3"
    assert "EXECUTION_ENV_PATH" not in config.parameters
    assert not config.HasField("optimization")  # the backend's default graph level (all) is the fastest
    assert len(config.model_warmup) == 0
    plan = parse(render_config("digits", IO, options, "tensorrt_plan"))
    assert plan.platform == "tensorrt_plan" and len(plan.parameters) == 0  # ORT threads mean nothing to TensorRT


def test_unbatched_config_keeps_batch_dim_and_warms_up_at_one():
    options = TritonModelOptions(max_batch_size=0, versions_served=3)
    text = render_config("digits", IO, options, "python")
    config = parse(text)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert "# no dynamic_batching" in text
    assert list(config.input[0].dims) == [-1, 3, 4, 4] and list(config.output[0].dims) == [-1, 5]
    assert [(w.batch_size, list(w.inputs["input"].dims)) for w in config.model_warmup] == [(1, [1, 3, 4, 4])]
    assert config.version_policy.latest.num_versions == 3


def test_dynamic_image_size_skips_warmup_with_a_reason():
    io = ModelIO([TensorSpec("input", "TYPE_FP32", [3, -1, -1])], IO.outputs, batched=True)
    text = render_config("digits", io, TritonModelOptions(), "python")
    assert len(parse(text).model_warmup) == 0
    assert "# no model_warmup: input 'input' has a dynamic size" in text


def test_render_refuses_batching_a_fixed_batch_model_and_unknown_platforms():
    fixed = ModelIO(
        [TensorSpec("input", "TYPE_FP32", [1, 3, 4, 4])], [TensorSpec("logits", "TYPE_FP32", [1, 5])], False
    )
    with pytest.raises(DeploykitError, match="fixed batch dimension"):
        render_config("digits", fixed, TritonModelOptions(), "python")
    assert parse(render_config("digits", fixed, TritonModelOptions(max_batch_size=0), "python")).input[0].dims == [
        1,
        3,
        4,
        4,
    ]
    with pytest.raises(DeploykitError, match="not supported"):
        render_config("digits", IO, TritonModelOptions(), "tensorflow_savedmodel")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"preferred_batch_sizes": [16]}, "preferred_batch_sizes"),
        ({"flavour": "native", "execution_env": "/env"}, "portable flavour only"),
        ({"max_batch_size": -1}, "greater than or equal"),
        ({"batch": 4}, "Extra inputs"),
    ],
)
def test_options_reject_inconsistent_values(fields, message):
    with pytest.raises(ValidationError, match=message):
        TritonModelOptions(**fields)


# ---- writing the repository -----------------------------------------------------------------------


def test_write_portable_adds_versions_without_touching_old_ones(onnx_file, tmp_path):
    repo = tmp_path / "repo"
    first = write_triton_model(repo, "digits", onnx_file, TritonModelOptions())
    assert first == repo / "digits" / "1"
    assert sorted(p.name for p in first.iterdir()) == ["model.onnx", "model.py"]
    assert (first / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert (first / "model.py").read_text() == Path(tpm.__file__).read_text()
    before = {p: p.stat().st_mtime_ns for p in first.iterdir()}

    second = write_triton_model(repo, "digits", onnx_file, TritonModelOptions(max_batch_size=4))
    assert second.name == "2" and list_versions(repo, "digits") == [1, 2]
    assert {p: p.stat().st_mtime_ns for p in first.iterdir()} == before
    assert parse((repo / "digits" / "config.pbtxt").read_text()).max_batch_size == 4  # the newest options win
    assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "2", "config.pbtxt"]  # no temp folder left
    assert (second / "model.onnx").stat().st_mode & 0o777 == 0o644  # readable by a server running as another user

    with pytest.raises(DeploykitError, match="already exists"):
        write_triton_model(repo, "digits", onnx_file, TritonModelOptions(), version=2)
    assert write_triton_model(repo, "digits", onnx_file, TritonModelOptions(), version=7).name == "7"
    assert list_versions(repo, "digits") == [1, 2, 7] and list_versions(repo, "other") == []


def test_write_native_copies_external_weights_that_still_load(tmp_path):
    src = tiny_onnx(tmp_path / "exported.onnx", external=True)
    version = write_triton_model(tmp_path / "repo", "digits", src, TritonModelOptions(flavour="native"))
    assert sorted(p.name for p in version.iterdir()) == ["exported.onnx.data", "model.onnx"]
    assert parse((version.parent / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    want = ort.InferenceSession(str(src)).run(None, {"input": x})[0]
    np.testing.assert_array_equal(ort.InferenceSession(str(version / "model.onnx")).run(None, {"input": x})[0], want)


def test_write_refuses_bad_inputs_before_writing_anything(onnx_file, tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(DeploykitError, match="is not allowed"):
        write_triton_model(repo, "../escape", onnx_file, TritonModelOptions())
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(DeploykitError, match="use flavour native"):
        write_triton_model(repo, "digits", plan, TritonModelOptions())
    fixed = tiny_onnx(tmp_path / "fixed.onnx", batch=1)
    with pytest.raises(DeploykitError, match="fixed batch dimension"):
        write_triton_model(repo, "digits", fixed, TritonModelOptions())
    with pytest.raises(DeploykitError, match="version 0 is not allowed"):
        write_triton_model(repo, "digits", onnx_file, TritonModelOptions(), version=0)
    assert not (repo / "digits").exists()


def test_write_tensorrt_plan_reads_io_from_its_source_onnx(onnx_file, tmp_path):
    engine_dir = tmp_path / "tensorrt"
    (engine_dir / "source").mkdir(parents=True)
    onnx_file.rename(engine_dir / "source" / "model.onnx")
    plan = engine_dir / "model.fp16.plan"
    plan.write_bytes(b"serialized engine")
    meta = {"precision": "fp16", "source_onnx": "model.onnx", "profile": {"max": [8, 3, 4, 4]}}
    (engine_dir / "model.fp16.json").write_text(json.dumps(meta))

    version = write_triton_model(tmp_path / "repo", "digits", plan, TritonModelOptions(flavour="native", threads=2))
    assert sorted(p.name for p in version.iterdir()) == ["model.plan"]
    config = parse((version.parent / "config.pbtxt").read_text())
    assert (config.platform, list(config.input[0].dims), len(config.parameters)) == ("tensorrt_plan", [3, 4, 4], 0)
    with pytest.raises(DeploykitError, match="exceeds the largest batch"):
        write_triton_model(tmp_path / "repo", "digits", plan, TritonModelOptions(flavour="native", max_batch_size=16))


# ---- the portable model.py ------------------------------------------------------------------------

SPECS = [("input", np.float32, [-1, 3, 4, 4])]


def test_check_request_names_the_problem():
    good = np.zeros((2, 3, 4, 4), np.float32)
    assert tpm.check_request({"input": good}.get, SPECS)["input"] is good
    cases = [
        ({}, "input 'input' is missing"),
        ({"input": good.astype(np.float64)}, "has data type float64; the model expects float32"),
        ({"input": np.zeros((2, 3, 4, 5), np.float32)}, r"has shape \[2, 3, 4, 5\]; the model expects \[-1, 3, 4, 4\]"),
        ({"input": np.zeros((3, 4, 4), np.float32)}, r"has shape \[3, 4, 4\]"),
    ]
    for request, message in cases:
        with pytest.raises(tpm.RequestError, match=message) as caught:
            tpm.check_request(request.get, SPECS)
        assert caught.value.code == "INVALID_ARG"


def test_run_requests_batches_valid_requests_in_one_call():
    calls = []

    def run(feed):
        calls.append(feed["x"].shape)
        return [feed["x"].sum(axis=(1, 2)), feed["x"][:, 0, 0] * 2]

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((n, 2, 2)).astype(np.float32)} for n in (1, 3, 2)]
    bad = tpm.RequestError("input 'x' is missing")
    results = tpm.run_requests(run, [feeds[0], bad, feeds[1], feeds[2]], ["sum", "first"], batched=True)
    assert calls == [(6, 2, 2)]
    assert results[1] is bad
    for feed, result in zip(feeds, [results[0], results[2], results[3]]):
        np.testing.assert_allclose(result["sum"], feed["x"].sum(axis=(1, 2)), rtol=1e-6)
        np.testing.assert_array_equal(result["first"], feed["x"][:, 0, 0] * 2)


def test_outputs_are_handed_back_as_views_of_the_runtime_outputs():
    outputs = [np.arange(6, dtype=np.float32).reshape(3, 2), np.zeros((3, 1), np.float32)]
    feeds = [{"x": np.ones((n, 4), np.float32)} for n in (1, 2)]
    results = tpm.run_requests(lambda feed: outputs, feeds, ["a", "b"], batched=True)
    np.testing.assert_array_equal(results[0]["a"], [[0, 1]])
    np.testing.assert_array_equal(results[1]["a"], [[2, 3], [4, 5]])
    for result in results:  # no copy on the hot path
        assert np.shares_memory(result["a"], outputs[0]) and np.shares_memory(result["b"], outputs[1])


def test_run_requests_groups_shapes_and_isolates_failures():
    def run(feed):
        if feed["x"].shape[1] == 1:
            raise RuntimeError("kernel larger than the image")
        return [feed["x"].mean(axis=1)]

    feeds = [
        {"x": np.ones((1, 4), np.float32)},
        {"x": np.ones((2, 1), np.float32)},
        {"x": np.full((1, 4), 3, np.float32)},
    ]
    results = tpm.run_requests(run, feeds, ["m"], batched=True)
    assert [r["m"].tolist() for r in (results[0], results[2])] == [[1.0], [3.0]]
    assert isinstance(results[1], tpm.RequestError) and results[1].code == "INTERNAL"
    assert "kernel larger than the image" in str(results[1])

    calls = []
    tpm.run_requests(lambda f: calls.append(1) or [f["x"]], [feeds[0], feeds[2]], ["m"], batched=False)
    assert len(calls) == 2  # an unbatched model runs each request as sent


def fake_pb_utils():
    """The few pieces of triton_python_backend_utils that model.py touches."""

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code="INTERNAL"):
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.outputs, self.error = {t.name: t.array for t in output_tensors}, error

    return types.SimpleNamespace(
        TritonError=TritonError,
        Tensor=Tensor,
        InferenceResponse=InferenceResponse,
        get_input_tensor_by_name=lambda request, name: request.get(name),
    )


def _initialized(repo: Path, version: Path, name: str = "digits") -> tpm.TritonPythonModel:
    """model.py initialised as Triton's python backend would, on a written repository."""
    config = parse((repo / name / "config.pbtxt").read_text())
    args = {
        "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
        "model_repository": str(repo / name),
        "model_version": version.name,
        "model_instance_kind": "CPU",
    }
    model = tpm.TritonPythonModel()
    model.initialize(args)
    return model


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=pytest.mark.openvino)])
def test_python_model_serves_a_written_repository(onnx_file, tmp_path, monkeypatch, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (the openvino extra)")
    pb = fake_pb_utils()
    monkeypatch.setattr(tpm, "pb_utils", pb)
    repo = tmp_path / "repo"
    version = write_triton_model(repo, "digits", onnx_file, TritonModelOptions(threads=1, runtime=runtime))
    model = _initialized(repo, version)
    runs = []
    real_run = model._run
    model._run = lambda feed: runs.append(1) or real_run(feed)

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 3, 4, 4)).astype(np.float32) for n in (1, 2)]
    requests = [
        {"input": pb.Tensor("input", xs[0])},
        {"image": pb.Tensor("image", xs[1])},
        {"input": pb.Tensor("input", xs[1])},
    ]
    responses = model.execute(requests)
    assert len(runs) == 1  # the two valid requests ran as one batch
    reference = ort.InferenceSession(str(onnx_file))
    for response, x in ((responses[0], xs[0]), (responses[2], xs[1])):
        assert response.error is None
        np.testing.assert_allclose(response.outputs["logits"], reference.run(None, {"input": x})[0], rtol=1e-5)
    assert responses[1].error.code == "INVALID_ARG" and "input 'input' is missing" in responses[1].error.message


@pytest.mark.openvino
def test_openvino_ir_is_packaged_with_its_weights_portable_and_native(onnx_file, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the openvino extra)")
    from deploykit.export.onnx2openvino import convert_onnx

    xml = convert_onnx(onnx_file, tmp_path / "ir" / "model.xml")
    monkeypatch.setattr(tpm, "pb_utils", fake_pb_utils())
    repo = tmp_path / "repo"
    version = write_triton_model(repo, "digits", xml, TritonModelOptions(threads=1))
    assert sorted(p.name for p in version.iterdir()) == ["model.bin", "model.py", "model.xml"]
    config = parse((repo / "digits" / "config.pbtxt").read_text())
    assert config.parameters["runtime"].string_value == "openvino"  # an IR runs on OpenVINO whatever was asked
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, 4, 4])] and config.max_batch_size == 8
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    (response,) = _initialized(repo, version).execute([{"input": tpm.pb_utils.Tensor("input", x)}])
    np.testing.assert_allclose(response.outputs["logits"], ort.InferenceSession(str(onnx_file)).run(None, {"input": x})[0], rtol=1e-5)
    native = write_triton_model(tmp_path / "native", "digits", xml, TritonModelOptions(flavour="native", threads=2))
    config = parse((tmp_path / "native" / "digits" / "config.pbtxt").read_text())
    assert (config.backend, config.default_model_filename) == ("openvino", "model.xml")
    assert config.parameters["INFERENCE_NUM_THREADS"].string_value == "2"
    assert sorted(p.name for p in native.iterdir()) == ["model.bin", "model.xml"]
    onnx_on_ov = parse(render_config("digits", IO, TritonModelOptions(flavour="native", runtime="openvino"), "openvino"))
    assert (onnx_on_ov.backend, onnx_on_ov.default_model_filename) == ("openvino", "model.onnx")


def test_spinning_is_opt_in_and_reaches_the_portable_session_only():
    assert "allow_spinning" not in render_config("digits", IO, TritonModelOptions(), "python")
    config = parse(render_config("digits", IO, TritonModelOptions(spin=True, threads=2), "python"))
    assert config.parameters["allow_spinning"].string_value == "1"
    native = parse(render_config("digits", IO, TritonModelOptions(flavour="native", spin=True), "onnxruntime_onnx"))
    assert "allow_spinning" not in native.parameters
    from deploykit.package.triton_python_model import session_options

    assert session_options(2, spin=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
