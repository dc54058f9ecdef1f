"""TorchServe end to end: a real .mar from torch-model-archiver, a real TorchServe (Java frontend, Python workers)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from servers import CLASSES, NAME, SAMPLE, export_tiny
from ts.context import Context, RequestProcessor

from deploykit.errors import DeploykitError
from deploykit.package import torchserve_handler
from deploykit.package.torchserve_archive import write_config_properties, write_torchserve_archive
from deploykit.serve import torchserve
from deploykit.serve.access import torchserve_keys
from deploykit.serve.oip import OipClient
from deploykit.serve.process import free_ports_on, http_status
from deploykit.serve.torchserve import TorchServeServer

TOKEN_REFUSED = 400  # what TorchServe 0.12 answers a missing or wrong token with (InvalidKeyException), not 401


def _ports() -> dict[str, int]:
    return dict(zip(("inference_port", "management_port", "metrics_port"), free_ports_on(3)))


def _body(x: np.ndarray, **override) -> bytes:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist(), **override}
    return json.dumps({"inputs": [tensor]}).encode()


def _post(url: str, body: bytes, key: dict[str, str], content_type: str = "application/json") -> tuple[int, dict]:
    return _call(urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **key}))


def _call(request: urllib.request.Request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _bearer(server: TorchServeServer, kind: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {torchserve_keys(server.key_file)[kind]}"}


def _group_members(pgid: int) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pgid=,pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in ps.splitlines() if line.split()[0] == str(pgid)]


def _inference_requests(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ts_inference_requests_total" and sample.labels.get("model_name") == NAME
    )


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def offline(onnx_model):
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def store(onnx_model, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("store")
    write_torchserve_archive(onnx_model, store, NAME, batch_size=4, max_batch_delay_ms=20, threads=1)
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    started = time.monotonic()
    ts = TorchServeServer(store, log_dir=tmp_path_factory.mktemp("logs"), **_ports()).start()
    print(f"TorchServe ready in {time.monotonic() - started:.1f} s")
    yield ts
    ts.stop()


@pytest.fixture(scope="module")
def key(server) -> dict[str, str]:
    """The header that lets a prediction in: TorchServe 0.12's token authorization is on."""
    return _bearer(server, "inference")


def test_archive_is_a_mar_with_the_handler_and_settings(store):
    mar = store / f"{NAME}.mar"
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert manifest["model"]["handler"] == "torchserve_handler.py"
        assert manifest["model"]["serializedFile"] == "tiny.onnx"
        assert manifest["model"]["modelName"] == NAME and manifest["model"]["modelVersion"] == "1.0"
        assert z.read("torchserve_handler.py") == Path(torchserve_handler.__file__).read_bytes()
        assert yaml.safe_load(z.read(manifest["model"]["configFile"])) == {"handler": {"intra_op_threads": 1}}
    sidecar = json.loads((store / f"{NAME}.json").read_text())
    assert sidecar == {"version": "1.0", "batch_size": 4, "max_batch_delay_ms": 20, "workers": 1}
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_config_properties_serves_the_store_on_loopback_with_prometheus(server, store):
    props = dict(line.split("=", 1) for line in (store / "config.properties").read_text().splitlines())
    assert props["metrics_mode"] == "prometheus"
    assert "disable_token_authorization" not in props  # TorchServe's token authorization stays on
    assert props["inference_address"] == f"http://127.0.0.1:{server.ports['inference']}"
    assert props["management_address"] == f"http://127.0.0.1:{server.ports['management']}"
    assert props["metrics_address"] == f"http://127.0.0.1:{server.ports['metrics']}"
    assert props["load_models"] == "tiny.mar"
    version = json.loads(props["models"])[NAME]["1.0"]
    assert (version["batchSize"], version["maxBatchDelay"], version["minWorkers"], version["maxWorkers"]) == (
        4,
        20,
        1,
        1,
    )
    assert server.models == [NAME]
    assert server.endpoints["metrics"] == f"http://127.0.0.1:{server.ports['metrics']}/metrics"


def test_ping_answers_with_the_inference_key(server, key):
    ping = f"{server.endpoints['inference']}/ping"
    assert _call(urllib.request.Request(ping, headers=key)) == (200, {"status": "Healthy"})
    assert http_status(ping) == TOKEN_REFUSED  # even health wants the key in 0.12; metrics do not
    assert http_status(server.endpoints["metrics"]) == 200


@pytest.mark.parametrize("batch", [1, 3])
def test_predictions_equal_onnxruntime(server, key, offline, batch):
    x = np.random.default_rng(batch).standard_normal((batch, *SAMPLE), dtype=np.float32)
    status, reply = _post(f"{server.endpoints['inference']}/predictions/{NAME}", _body(x), key)
    assert status == 200, reply
    (out,) = reply["outputs"]
    assert (reply["model_name"], out["name"], out["datatype"], out["shape"]) == (
        NAME,
        "logits",
        "FP32",
        [batch, CLASSES],
    )
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), offline(x), atol=1e-5, rtol=0)


def test_concurrent_requests_are_answered_and_counted(server, key, offline):
    url = f"{server.endpoints['inference']}/predictions/{NAME}"
    before = _inference_requests(server.endpoints["metrics"])
    inputs = [np.random.default_rng(i).standard_normal((1 + i % 3, *SAMPLE), dtype=np.float32) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda x: _post(url, _body(x), key), inputs))
    for x, (status, reply) in zip(inputs, replies):
        assert status == 200, reply
        np.testing.assert_allclose(
            np.reshape(reply["outputs"][0]["data"], (len(x), CLASSES)), offline(x), atol=1e-5, rtol=0
        )
    assert _inference_requests(server.endpoints["metrics"]) - before >= len(inputs)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not valid JSON"),
        (_body(np.zeros((1, 3, 9, 8), np.float32)), "shape [1, 3, 9, 8]"),
        (_body(np.zeros((1, *SAMPLE), np.float32), datatype="INT64"), "datatype 'INT64'"),
        (_body(np.zeros((1, *SAMPLE), np.float32), name="pixels"), 'no input named "input"'),
        (_body(np.zeros((2, *SAMPLE), np.float32), shape=[3, *SAMPLE]), "has 384 values"),
    ],
)
def test_malformed_request_gets_400_and_server_stays_up(server, key, body, says):
    status, reply = _post(f"{server.endpoints['inference']}/predictions/{NAME}", body, key)
    assert status == 400
    assert says in reply["error"]
    assert _call(urllib.request.Request(f"{server.endpoints['inference']}/ping", headers=key))[0] == 200


def test_form_encoded_post_is_told_to_send_json(server, key):
    body = _body(np.zeros((1, *SAMPLE), np.float32))
    status, reply = _post(
        f"{server.endpoints['inference']}/predictions/{NAME}", body, key, "application/x-www-form-urlencoded"
    )
    assert (status, reply["error"]) == (
        400,
        "The request has no raw body: POST the JSON with Content-Type: application/json.",
    )


def test_bad_request_does_not_fail_good_ones_in_its_batch(server, key, offline):
    """Good and bad requests sent together (TorchServe batches them within 20 ms) each get their own answer."""
    url = f"{server.endpoints['inference']}/predictions/{NAME}"
    good = np.random.default_rng(7).standard_normal((2, *SAMPLE), dtype=np.float32)
    bodies = [_body(good), b"{not json", _body(good), _body(good, datatype="FP16")] * 2
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: _post(url, b, key), bodies))
    assert [status for status, _ in replies] == [200, 400, 200, 400] * 2
    for status, reply in replies:
        if status == 200:
            np.testing.assert_allclose(np.reshape(reply["outputs"][0]["data"], (2, CLASSES)), offline(good), atol=1e-5)


def test_keys_are_private_and_named_for_clients(server):
    assert server.key_file == server.log_path.parent / "keys" / "key_file.json"
    assert stat.S_IMODE(server.key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.key_file.parent.stat().st_mode) == 0o700
    assert server.client_env() == {"DEPLOYKIT_TORCHSERVE_KEY_FILE": str(server.key_file)}
    keys = torchserve_keys(server.key_file)
    assert keys["inference"] != keys["management"]
    raw = json.loads(server.key_file.read_text())  # TorchServe's own format: a key and its expiry per API
    assert set(raw) == {"inference", "management", "API"} and "expiration time" in raw["inference"]
    expires = dt.datetime.fromisoformat(raw["inference"]["expiration time"][:19])
    assert expires - dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) > dt.timedelta(days=300)  # not 60 min


def test_management_api_wants_the_management_key(server, key, offline):
    models = f"{server.endpoints['management']}/models"
    for headers in ({}, key, {"Authorization": "Bearer wrong"}):
        status, reply = _call(urllib.request.Request(models, headers=headers))
        assert (status, reply["type"]) == (TOKEN_REFUSED, "InvalidKeyException")
    status, reply = _call(urllib.request.Request(f"{models}/{NAME}", method="DELETE"))
    assert (status, reply["type"]) == (TOKEN_REFUSED, "InvalidKeyException")
    assert _call(urllib.request.Request(models, headers=_bearer(server, "management"))) == (
        200,
        {"models": [{"modelName": NAME, "modelUrl": f"{NAME}.mar"}]},
    )
    # With the key, unregistering is still refused: TorchServe 0.12 turns its model API off by default.
    deleted = urllib.request.Request(f"{models}/{NAME}", method="DELETE", headers=_bearer(server, "management"))
    assert _call(deleted)[0] == 405
    assert server.failed_models() == {}  # deploykit's own polling sends the management key
    x = np.ones((1, *SAMPLE), np.float32)
    status, reply = _post(f"{server.endpoints['inference']}/predictions/{NAME}", _body(x), key)
    assert status == 200  # the model kept serving
    np.testing.assert_allclose(np.reshape(reply["outputs"][0]["data"], (1, CLASSES)), offline(x), atol=1e-5, rtol=0)


def test_inference_wants_the_inference_key(server, offline, monkeypatch):
    url = f"{server.endpoints['inference']}/predictions/{NAME}"
    x = np.random.default_rng(5).standard_normal((2, *SAMPLE), dtype=np.float32)
    for headers in ({}, _bearer(server, "management")):
        status, reply = _post(url, _body(x), headers)
        assert (status, reply["type"]) == (TOKEN_REFUSED, "InvalidKeyException")
    status, reply = _post(url, _body(x), _bearer(server, "inference"))
    assert status == 200
    np.testing.assert_allclose(np.reshape(reply["outputs"][0]["data"], (2, CLASSES)), offline(x), atol=1e-5, rtol=0)
    monkeypatch.setenv("DEPLOYKIT_TORCHSERVE_KEY_FILE", str(server.key_file))  # as a user's client finds the keys
    client = OipClient(server.infer_url, NAME, engine="torchserve")
    np.testing.assert_allclose(client.infer(x), offline(x), atol=1e-5, rtol=0)
    monkeypatch.delenv("DEPLOYKIT_TORCHSERVE_KEY_FILE")
    assert OipClient(server.infer_url, NAME, engine="torchserve").post_infer(_body(x))[0] == TOKEN_REFUSED


def test_handler_answers_each_request_of_one_batch(store, offline, tmp_path):
    """The handler as TorchServe's worker runs it, on the unpacked .mar, with TorchServe's own Context."""
    with zipfile.ZipFile(store / f"{NAME}.mar") as z:
        z.extractall(tmp_path)
    manifest = json.loads((tmp_path / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context(
        NAME,
        str(tmp_path),
        manifest,
        4,
        None,
        "0.12.0",
        model_yaml_config=yaml.safe_load((tmp_path / "model-config.yaml").read_text()),
    )
    handler = torchserve_handler.OnnxClassifierHandler()
    handler.initialize(context)
    assert handler.session.get_session_options().intra_op_num_threads == 1
    x1 = np.random.default_rng(1).standard_normal((1, *SAMPLE), dtype=np.float32)
    x2 = np.random.default_rng(2).standard_normal((2, *SAMPLE), dtype=np.float32)
    # What the worker passes: decoded JSON for application/json, the raw bytes when decoding failed.
    batch = [{"body": json.loads(_body(x1))}, {"body": b"\xff{"}, {"body": _body(x2)}, {"body": {"inputs": "x"}}]
    context.request_processor = [RequestProcessor({}) for _ in batch]
    replies = [json.loads(r) for r in handler.handle(batch, context)]
    assert [context.get_response_status(i)[0] for i in range(len(batch))] == [200, 400, 200, 400]
    assert "not valid JSON" in replies[1]["error"] and '"inputs" list' in replies[3]["error"]
    for x, reply in ((x1, replies[0]), (x2, replies[2])):
        np.testing.assert_allclose(np.reshape(reply["outputs"][0]["data"], (len(x), CLASSES)), offline(x), atol=1e-5)


def test_stop_leaves_no_process_behind(store, tmp_path):
    own_store = tmp_path / "store"
    own_store.mkdir()
    for suffix in (".mar", ".json"):
        shutil.copy(store / f"{NAME}{suffix}", own_store)
    stale = tmp_path / "logs" / "keys" / "key_file.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")  # a previous run's leftover must not be taken for this run's keys
    with TorchServeServer(own_store, log_dir=tmp_path / "logs", **_ports()) as ts:
        pgid = ts.process.proc.pid
        members = " ".join(_group_members(pgid))
        assert "java" in members and "model_service_worker" in members  # the frontend and its worker ran here
        assert ts.key_file == stale and set(torchserve_keys(stale)) == {"inference", "management"}
    assert _group_members(pgid) == []
    assert not list((tmp_path / "logs").glob("tmp-*"))  # unpacked archives and the pid file are gone
    assert not stale.exists()  # the keys died with the server
    with pytest.raises(DeploykitError, match=r"key_file.json is not TorchServe's key_file.json \(FileNotFoundError\)"):
        ts.failed_models()


def test_model_that_fails_to_load_is_named_with_the_reason(onnx_model, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not an ONNX model")
    write_torchserve_archive(onnx_model, tmp_path / "store", NAME)
    write_torchserve_archive(broken, tmp_path / "store", "broken")
    ts = TorchServeServer(tmp_path / "store", log_dir=tmp_path / "logs", **_ports())
    with pytest.raises(DeploykitError, match=r"could not load model 'broken' \(.*INVALID_PROTOBUF"):
        ts.start(timeout=60)
    assert _group_members(ts.process.proc.pid) == []


def test_a_server_that_exits_at_start_is_reported(store, tmp_path):
    ports = _ports()
    with socket.socket() as taken:  # its inference port is busy: TorchServe writes its keys, then gives up
        taken.bind(("127.0.0.1", ports["inference_port"]))
        taken.listen()
        ts = TorchServeServer(store, log_dir=tmp_path / "logs", **ports)
        with pytest.raises(DeploykitError, match=r"TorchServe exited with code \d+ before answering http://\S+/ping"):
            ts.start(timeout=60)
    assert _group_members(ts.process.proc.pid) == [] and not ts.key_file.exists()


def test_user_errors_name_the_thing(onnx_model, tmp_path):
    with pytest.raises(DeploykitError, match="model store .*does not exist"):
        TorchServeServer(tmp_path / "missing", **_ports()).start()
    with pytest.raises(DeploykitError, match="Model name '../evil' is not allowed"):
        write_torchserve_archive(onnx_model, tmp_path / "store", "../evil")
    with pytest.raises(DeploykitError, match="not an existing .onnx file"):
        write_torchserve_archive(tmp_path / "nothing.onnx", tmp_path / "store", NAME)
    with pytest.raises(DeploykitError, match="batch_size=0 is invalid"):
        write_torchserve_archive(onnx_model, tmp_path / "store", NAME, batch_size=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeploykitError, match="holds no .mar"):
        write_config_properties(tmp_path / "empty")
    assert not (tmp_path / "store").exists()  # every check ran before anything was written


def test_missing_java_is_reported_before_anything_starts(monkeypatch, store):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(torchserve.shutil, "which", lambda name: None)
    ts = TorchServeServer(store, **_ports())
    with pytest.raises(DeploykitError, match=r"no `java` was found.*install Java 11 or newer"):
        ts.start()
    assert ts.process is None


def test_old_java_is_reported(monkeypatch, store, tmp_path):
    java_home = tmp_path / "jdk8"
    (java_home / "bin").mkdir(parents=True)
    java = java_home / "bin" / "java"
    java.write_text("#!/bin/sh\necho 'openjdk version \"1.8.0_392\"' >&2\n")
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(java_home))
    with pytest.raises(DeploykitError, match=r'needs Java 11\+ but .* is version "1\.8'):
        TorchServeServer(store, **_ports()).start()
