"""Every deploykit client against a Triton whose APIs, inference included, want a key, and whose gRPC is TLS only:
validate (its checks and a locust load), the bad-input corpus, locust's gRPC users and perf_analyzer over both
protocols take the key (and the CA) from the environment, as a user's shell would give them.

One server for the whole file; each run is as short as its tool allows (locust: 2 s, perf_analyzer: 500 ms windows).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json

import numpy as np
import pytest
from servers import SAMPLE, triton_with_tiny

from deploykit.errors import DeploykitError
from deploykit.loadtest import perf_analyzer as pa
from deploykit.loadtest.runner import run_locust
from deploykit.serve.access import KEY_ENV, KEY_FILE_ENV, TLS_CA_ENV, GrpcTls, ServerAccess, client_access
from deploykit.serve.oip import OipClient, infer_body
from deploykit.validate import validate_server

KEY = "restricted-test-key-0123456789"
FAST = {"measurement_interval_ms": 500, "stability_percentage": 50.0, "max_trials": 10, "timeout_s": 60.0}


def self_signed(tmp) -> GrpcTls:
    """A certificate for 127.0.0.1 that is its own CA (what the clients are told to trust)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp / "key.pem").write_bytes(pem)
    return GrpcTls(tmp / "cert.pem", tmp / "key.pem")


@pytest.fixture(scope="module")
def restricted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restricted")
    tls = self_signed(tmp)
    with triton_with_tiny(tmp, access=ServerAccess(key=KEY, restrict_inference=True, tls=tls)) as served:
        served.ca = tls.cert
        yield served


@pytest.fixture
def no_key(restricted, monkeypatch):
    """A client environment that trusts the server's CA but holds no key."""
    for var in (KEY_ENV, KEY_FILE_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(TLS_CA_ENV, str(restricted.ca))
    return restricted


@pytest.fixture
def keyed(no_key, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return no_key


def _grpc_infer(served) -> None:
    import tritonclient.grpc as grpcclient

    access = client_access()
    inp = grpcclient.InferInput("input", [1, *SAMPLE], "FP32")
    inp.set_data_from_numpy(np.zeros((1, *SAMPLE), np.float32))
    with access.grpc_client(served.grpc_url) as client:
        client.infer(served.model, [inp], headers=access.grpc_headers)


def test_without_the_key_every_client_is_refused(no_key, tmp_path):
    body = json.dumps(infer_body(np.zeros((1, *SAMPLE), np.float32))).encode()
    status, text = OipClient(no_key.http_url, no_key.model).post_infer(body)
    assert status == 403 and "deploykit-key" in text
    with pytest.raises(DeploykitError, match="the server wants a key: set DEPLOYKIT_KEY_FILE"):
        run_locust(no_key.http_url, no_key.model, users=1, spawn_rate=1, duration_s=2, workdir=tmp_path)
    with pytest.raises(Exception, match="expecting header 'triton-grpc-protocol-deploykit-key'"):
        _grpc_infer(no_key)
    with pytest.raises(DeploykitError, match="code 99 .*expecting header 'deploykit-key'"):
        pa.run_perf_analyzer(no_key.http_url, no_key.model, concurrency=[1], out_dir=tmp_path / "pa", **FAST)


def test_validate_with_the_key_passes_every_check_and_a_locust_load(keyed, tmp_path):
    samples = np.random.default_rng(0).standard_normal((8, *SAMPLE)).astype(np.float32)
    _grpc_infer(keyed)  # TLS and the key: the gRPC path works before validate relies on it
    result = validate_server(
        keyed.http_url, keyed.model, out_dir=tmp_path, model_path=keyed.onnx, samples=samples,
        grpc_url=keyed.grpc_url, users=1, duration_s=2,
    )  # fmt: skip
    checks = {c["name"]: c for c in result["checks"]}
    assert result["passed"], [c for c in result["checks"] if c["status"] == "fail"]
    for name in ("outputs equal offline (grpc)", "outputs valid (http)", "outputs valid (grpc)", "error rate"):
        assert checks[name]["status"] == "pass", checks[name]
    top = result["loadtest"]["levels"][-1]
    assert top["requests"] > 0 and top["failures"] == 0


def test_the_bad_input_corpus_reaches_the_model_past_the_key_and_tls(keyed):
    from deploykit.validate.fuzz import REFUSED, _grpc_sends, _http_sends

    # two cases only (the whole corpus holds two requests that kill Triton 2.51): the model's own refusal of
    # NaN input proves each request got past the key check, over TLS for gRPC
    http = _http_sends(keyed.http_url, keyed.model, [1, *SAMPLE], timeout=30)["http json: NaN data"]()
    grpc = _grpc_sends(keyed.grpc_url, keyed.model, [1, *SAMPLE], timeout=30)["grpc: NaN tensor"]()
    for result, detail in (http, grpc):
        assert result == REFUSED and "finite" in detail, detail


def test_locust_grpc_users_send_the_key_over_tls(keyed, tmp_path):
    r = run_locust(
        keyed.http_url, keyed.model, users=1, spawn_rate=1, duration_s=2, protocol="grpc", grpc_url=keyed.grpc_url,
        workdir=tmp_path,
    )  # fmt: skip
    assert r.requests > 0 and r.failures == 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_sends_the_key_and_never_shows_it(keyed, protocol, tmp_path):
    try:
        pa.find_perf_analyzer()
    except DeploykitError as e:
        pytest.skip(f"perf_analyzer cannot run here: {e}")
    rows, _ = pa.run_settled(  # retried, looser, on a neighbour's bursts of load
        keyed.http_url, keyed.model, protocol=protocol, grpc_url=keyed.grpc_url, concurrency=[1], out_dir=tmp_path,
        **FAST,
    )  # fmt: skip
    assert rows[0]["throughput_rps"] > 0
    log = (tmp_path / pa.LOG_NAME).read_text()
    header = "triton-grpc-protocol-deploykit-key" if protocol == "grpc" else "deploykit-key"
    assert KEY not in log and f"-H {header}:***" in log
    if protocol == "grpc":
        assert f"--ssl-grpc-root-certifications-file={keyed.ca}" in log
