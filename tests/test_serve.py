"""The real Triton server: start, infer over HTTP and gRPC, a broken model failing alone, roll back, clean stop."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from servers import NAME, SAMPLE, export_tiny, portable_options, ports, start_triton

from deploykit.errors import DeploykitError
from deploykit.package.triton_repo import write_triton_model
from deploykit.serve import triton as triton_mod
from deploykit.serve.oip import OipClient
from deploykit.serve.process import http_status


def offline(onnx_path, x):
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SAMPLE)).astype(np.float32)


def group_alive(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,comm=", "-g", str(pgid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_http_and_grpc_inference_equal_onnxruntime(triton):
    x = batch(3)
    expected = offline(triton.onnx, x)
    http = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"))
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(http.infer(NAME, [inp]).as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    ginp = grpcclient.InferInput("input", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    np.testing.assert_allclose(grpc.infer(NAME, [ginp]).as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    grpc.close()
    assert http.is_server_live() and http.is_model_ready(NAME)
    http.close()


def test_binds_loopback_only_by_default(triton):
    assert triton.http_url.startswith("http://127.0.0.1:")
    argv = " ".join(triton.server.process.argv)
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in argv


@pytest.fixture(scope="module")
def versioned(tmp_path_factory):
    """Versions 1 and 2 of the tiny model (different weights) and a model whose file is not ONNX."""
    tmp = tmp_path_factory.mktemp("versions")
    v1, v2 = export_tiny(tmp / "v1.onnx", seed=1), export_tiny(tmp / "v2.onnx", seed=2)
    repo = tmp / "repo"
    write_triton_model(repo, NAME, v1, portable_options())
    write_triton_model(repo, NAME, v2, portable_options())
    broken = tmp / "broken.onnx"
    broken.write_bytes(v1.read_bytes())
    write_triton_model(repo, "broken", broken, portable_options())
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    server = start_triton(repo, log_path=tmp / "triton.log")
    yield server, v1, v2
    server.stop()


def served(server, x):
    body = json.dumps(
        {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    )
    url = f"{server.endpoints['http']}/v2/models/{NAME}/infer"
    with urllib.request.urlopen(urllib.request.Request(url, body.encode()), timeout=30) as r:
        reply = json.loads(r.read())
    return reply["model_version"], np.asarray(reply["outputs"][0]["data"], np.float32).reshape(
        reply["outputs"][0]["shape"]
    )


def test_a_broken_model_fails_alone_with_its_reason(versioned):
    server, _, _ = versioned
    failed = server.control.failed_models()
    assert list(failed) == ["broken"]
    assert "onnx" in failed["broken"].lower() or "protobuf" in failed["broken"].lower()
    assert http_status(f"{server.endpoints['http']}/v2/models/{NAME}/ready") == 200


def test_latest_version_serves_then_rolls_back_and_forward(versioned):
    server, v1, v2 = versioned
    x = batch(2, seed=3)
    version, y = served(server, x)
    assert version == "2"
    np.testing.assert_allclose(y, offline(v2, x), rtol=1e-5, atol=1e-5)
    server.control.load(NAME, version=1)
    assert server.control.ready_versions(NAME) == [1]
    version, y = served(server, x)
    assert version == "1"
    np.testing.assert_allclose(y, offline(v1, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(offline(v1, x), offline(v2, x))  # the roll back really changed the weights served
    server.control.unload(NAME)
    deadline = time.monotonic() + 10
    while http_status(f"{server.endpoints['http']}/v2/models/{NAME}/ready") == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http_status(f"{server.endpoints['http']}/v2/models/{NAME}/ready") == 400
    server.control.load(NAME)
    assert served(server, x)[0] == "2"


def test_rolling_back_and_forward_under_load_fails_no_request(versioned):
    """Three clients send requests without pause while v1 and v2 swap four times: every request succeeds, and each
    answer is exactly the offline output of the version it names, which was live at the time."""
    import threading

    server, v1, v2 = versioned
    x = batch(2, seed=4)
    expected = {"1": offline(v1, x), "2": offline(v2, x)}
    answers: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                version, y = served(server, x)
            except Exception as e:  # noqa: BLE001 - every failure is counted, whatever its kind
                errors.append(repr(e))
                continue
            if version not in expected or not np.allclose(y, expected[version], rtol=1e-5, atol=1e-5):
                errors.append(f"version {version!r} answered outputs that are not its own")
            answers.append(version)

    server.control.load(NAME)  # start from the latest (v2), whatever an earlier test left
    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        for version in (1, 2, 1, None):  # back, forward, back, forward to the latest
            time.sleep(0.5)
            server.control.load(NAME, version=version)
            assert server.control.ready_versions(NAME) == [version or 2]
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    assert errors == [] and len(answers) > 50, (errors[:3], len(answers))
    assert {"1", "2"} <= set(answers)  # both versions really served during the run


def test_control_refuses_unknown_versions_and_names(versioned):
    server, _, _ = versioned
    with pytest.raises(DeploykitError, match="no version 7"):
        server.control.load(NAME, version=7)
    with pytest.raises(DeploykitError, match="not allowed"):
        server.control.load("../etc")


def test_missing_repository_and_missing_server_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(DeploykitError, match="does not exist"):
        triton_mod.TritonServer(tmp_path / "nope").start()
    # Nothing on PATH and no environment holding nvidia-pytriton: the one acceptable fake is the lookup.
    monkeypatch.setattr(triton_mod.shutil, "which", lambda _: None)
    monkeypatch.setattr(triton_mod, "_candidate_envs", lambda: [tmp_path])
    with pytest.raises(DeploykitError, match="make setup"):
        triton_mod.find_triton()


def test_cli_serve_prints_endpoints_and_stops_on_sigterm_without_orphans(tmp_path):
    """Here also restricted on loopback: the key file is written 0600, the server's own status call uses it, and a
    caller without it cannot unload the model."""
    repo, key = tmp_path / "repo", tmp_path / "admin.key"
    write_triton_model(repo, NAME, export_tiny(tmp_path / "m.onnx"), portable_options())
    http, grpc, metrics = ports()
    cmd = [sys.executable, "-m", "deploykit", "serve", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
           "--metrics-port", str(metrics), "--restrict", "--admin-key-file", str(key)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while http_status(f"http://127.0.0.1:{http}/v2/models/{NAME}/ready") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.poll() is not None else "timeout"
            )
            time.sleep(0.2)
        time.sleep(0.5)  # the endpoint table is printed right after readiness
        unload = urllib.request.Request(f"http://127.0.0.1:{http}/v2/repository/models/{NAME}/unload", data=b"{}")
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(unload, timeout=10)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{http}" in out and f"127.0.0.1:{grpc}" in out and f":{metrics}/metrics" in out
    assert "READY" in out and f"Admin key written to {key}" in out and "DEPLOYKIT_KEY_FILE" in out
    assert http_status(f"http://127.0.0.1:{http}/v2/health/live") is None
    leftovers = subprocess.run(["pgrep", "-f", f"--http-port={http}"], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""


def test_cli_package_writes_a_version_an_archive_and_manifests(in_tmp):
    from typer.testing import CliRunner

    from deploykit.cli import app

    onnx = export_tiny(in_tmp / "m.onnx")
    runner = CliRunner()
    for expected_version in ("1", "2"):
        result = runner.invoke(app, ["package", str(onnx), "--name", "digits", "--torchserve"])
        assert result.exit_code == 0, result.output
        assert (in_tmp / "model_repo" / "digits" / expected_version / "model.onnx").is_file()
    config = (in_tmp / "model_repo" / "digits" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "EXECUTION_ENV_PATH" in config
    assert (in_tmp / "model_store" / "digits.mar").is_file()
    portable = runner.invoke(app, ["package", str(onnx), "--name", "digits", "--k8s"])  # the image cannot run it
    assert portable.exit_code == 2 and "--k8s serves the repository on the official Triton image" in portable.output
    assert not (in_tmp / "k8s.yaml").exists() and not (in_tmp / "model_repo" / "digits" / "3").exists()
    native = runner.invoke(app, ["package", str(onnx), "--name", "digits", "--flavour", "native", "--k8s"])
    assert native.exit_code == 0, native.output
    assert 'platform: "onnxruntime_onnx"' in (in_tmp / "model_repo" / "digits" / "config.pbtxt").read_text()
    assert "kind: HorizontalPodAutoscaler" in (in_tmp / "k8s.yaml").read_text()
    bad = runner.invoke(app, ["package", str(onnx), "--name", "../evil"])
    assert bad.exit_code == 2 and "not allowed" in bad.output
    assert not (in_tmp / "evil").exists()
    missing = runner.invoke(app, ["package", "nope.onnx"])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_cli_control_status_lists_models(triton):
    from typer.testing import CliRunner

    from deploykit.cli import app

    result = CliRunner().invoke(app, ["control", "status", "--url", triton.http_url])
    assert result.exit_code == 0 and "tiny" in result.output and "READY" in result.output
    down = CliRunner().invoke(app, ["control", "status", "--url", "http://127.0.0.1:1"])
    assert down.exit_code == 2 and "No server answers" in down.output


def test_the_dashboard_reads_only_metrics_a_real_triton_exports(triton, in_tmp):
    from prometheus_client.parser import text_string_to_metric_families
    from typer.testing import CliRunner

    from deploykit.cli import app
    from deploykit.package.monitoring import metric_names

    OipClient(triton.http_url, NAME).infer(np.zeros((2, *SAMPLE), np.float32))  # per-model series appear on use
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    exported = {family.name for family in text_string_to_metric_families(text)}  # Prometheus parses the text
    result = CliRunner().invoke(app, ["package", str(triton.onnx), "--name", "dash", "--monitoring"])
    assert result.exit_code == 0, result.output
    dashboard = json.loads((in_tmp / "monitoring/grafana-dashboard.json").read_text())
    used = metric_names(dashboard)
    assert len(used) >= 10 and used <= exported, sorted(used - exported)
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    scrape = yaml.safe_load((in_tmp / "monitoring/prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["127.0.0.1:8002"]
