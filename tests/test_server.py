"""Every server behind one protocol: the engine table, the factory's refusals, and both real servers answering
through the same properties."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from servers import NAME, SAMPLE, export_tiny, portable_options

from deploykit.errors import DeploykitError
from deploykit.loadtest.metrics import scrape, total
from deploykit.serve.engines import ENGINES, PROTOCOLS, engine_traits
from deploykit.serve.oip import OipClient
from deploykit.serve.process import free_ports_on
from deploykit.serve.server import free_ports, make_server


def test_engine_table_answers_what_callers_used_to_branch_on():
    triton, torchserve = engine_traits("triton"), engine_traits("torchserve")
    assert triton.infer_route("m") == "/v2/models/m/infer" and torchserve.infer_route("m") == "/predictions/m"
    assert triton.check_protocol("grpc") == "grpc"
    with pytest.raises(DeploykitError, match="Protocol 'grpc' is not one torchserve speaks here: use http"):
        torchserve.check_protocol("grpc")
    with pytest.raises(DeploykitError, match="Engine 'kserve' is unknown: use one of triton, torchserve"):
        engine_traits("kserve")
    assert all(set(t.protocols) <= set(PROTOCOLS) for t in ENGINES.values())  # a protocol is a transport only
    assert "openvino" in triton.formats and torchserve.formats == ("onnx",)
    ports = free_ports("torchserve")
    assert set(ports) == {"inference", "management", "metrics"} and len(set(ports.values())) == 3


def test_free_ports_are_distinct_within_one_call():
    # Picked one after another, the OS may hand the same port back: Triton then refused to start (HTTP = gRPC).
    assert len(set(free_ports_on(64))) == 64
    assert all(len(set(free_ports(engine).values())) == len(engine_traits(engine).ports) for engine in ENGINES)


def test_the_factory_refuses_what_an_engine_does_not_have(tmp_path):
    with pytest.raises(DeploykitError, match="torchserve has no grpc port: it has inference, management, metrics"):
        make_server("torchserve", tmp_path, ports={"grpc": 9001})
    with pytest.raises(DeploykitError, match="TorchServe serves every archive in its model store: drop --model"):
        make_server("torchserve", tmp_path, models=["a"])
    server = make_server("triton", tmp_path, ports={"http": 9100}, log_dir=tmp_path / "logs")
    assert server.infer_url == "http://127.0.0.1:9100" and server.grpc_url == "127.0.0.1:8001"
    assert server.log_path == tmp_path / "logs" / "tritonserver.log" and not server.running


@pytest.mark.parametrize("fixture", ["triton", "torchserve"])
def test_both_real_servers_answer_through_the_same_protocol(fixture, request):
    served = request.getfixturevalue(fixture)
    server = served.server
    assert server.running and server.failed_models() == {}
    client = OipClient(server.infer_url, served.model, server.traits.name)  # with TorchServe's token (its /ping too)
    for _, route in server.traits.health:
        assert client.request(route.format(model=served.model))[0] == 200
    x = np.random.default_rng(0).standard_normal((2, *SAMPLE)).astype(np.float32)
    expected = ort.InferenceSession(str(served.onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = client.infer(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    counter, label = server.traits.success_counter
    assert total(scrape(server.metrics_url), counter, {label: served.model}) >= 1  # the request above was counted
    assert server.log_path.is_file()


@pytest.mark.openvino
def test_an_openvino_ir_is_served_by_the_real_triton(tmp_path):
    """The benchmark may pick an OpenVINO IR: the portable model.py then runs it with OpenVINO inside Triton."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the openvino extra)")
    from deploykit.export.onnx2openvino import convert_onnx
    from deploykit.package.triton_repo import write_triton_model
    from deploykit.runtime import open_artifact

    xml = convert_onnx(export_tiny(tmp_path / "tiny.onnx"), tmp_path / "ir" / "model.xml")
    write_triton_model(tmp_path / "repo", NAME, xml, portable_options())
    server = make_server("triton", tmp_path / "repo", ports=free_ports("triton"), log_dir=tmp_path)
    server.start()
    try:
        assert server.failed_models() == {}
        x = np.random.default_rng(1).standard_normal((3, *SAMPLE)).astype(np.float32)
        got = OipClient(server.infer_url, NAME).infer(x)
        np.testing.assert_allclose(got, open_artifact(xml, threads=1).run(x), rtol=1e-5, atol=1e-5)
    finally:
        server.stop()
