"""Access control on a real Triton: the admin key on the control APIs (HTTP and gRPC), inference left open or
restricted, gRPC over TLS with a test CA, and one sentence for every bad key or certificate before a server starts."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from servers import triton_with_tiny

from deploykit.errors import DeploykitError
from deploykit.serve.access import (
    GRPC_HEADER,
    HEADER,
    KEY_ENV,
    KEY_FILE_ENV,
    TLS_CA_ENV,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    GrpcTls,
    ServerAccess,
    client_access,
    read_key_file,
    server_access,
)

KEY = "test-key-0123456789abcdef"


def _call(url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


# --- the key: where it comes from, and what is refused before a server starts -------------------------------------


def test_loopback_stays_open_unless_asked_and_any_other_address_gets_a_new_private_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert server_access("127.0.0.1") == (ServerAccess(), None)
    path = tmp_path / "admin.key"
    access, note = server_access("0.0.0.0", default_key_file=path)
    assert access.key and access.key_file == path and str(path) in note
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_key_file(path) == access.key
    again, note = server_access("0.0.0.0", default_key_file=path)
    assert again.key == access.key and note is None  # an existing key is reused, never replaced
    assert "control" not in access.restricted_apis and "inference" not in access.restricted_apis
    assert set(access.restricted_apis) >= {"model-repository", "model-config", "shared-memory", "trace", "logging"}
    inference, _ = server_access("127.0.0.1", key_file=path, restrict_inference=True)
    assert {"inference", "metadata"} <= set(inference.restricted_apis) and "health" not in inference.restricted_apis
    open_, warning = server_access("0.0.0.0", insecure=True)
    assert open_.key is None and "open to anyone" in warning
    monkeypatch.setenv(KEY_ENV, KEY)
    assert server_access("127.0.0.1")[0].key == KEY  # a key in the environment restricts loopback too


@pytest.mark.parametrize(
    "content, mode, match",
    [
        (KEY, 0o644, "readable by other users"),
        ("short", 0o600, "16-512 characters"),
        ("has a space but is long enough", 0o600, "16-512 characters"),
        ("colon:and=equals,0123456789", 0o600, "16-512 characters"),  # Triton's flag separators
    ],
)
def test_a_bad_key_file_gets_one_sentence(tmp_path, content, mode, match):
    path = tmp_path / "admin.key"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(DeploykitError, match=match):
        server_access("0.0.0.0", key_file=path)


def test_a_missing_client_key_file_and_contradicting_options_get_one_sentence(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "nowhere.key"))
    with pytest.raises(DeploykitError, match="nowhere.key cannot be read"):
        client_access()
    with pytest.raises(DeploykitError, match="--insecure turns access control off"):
        server_access("0.0.0.0", insecure=True, restrict=True)


# --- certificates made here, with the cryptography package ----------------------------------------------------------


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(subject: str, key, issuer=None, issuer_key=None, days=(-1, 30), ca=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A test CA, a server certificate it signed for 127.0.0.1, and bad variants, as PEM files."""
    pytest.importorskip("cryptography", reason="the cryptography package makes the test certificates")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("pki")
    ca_key, server_key, other_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _certificate("deploykit test CA", ca_key, ca=True)
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "cert": _certificate("127.0.0.1", server_key, ca, ca_key).public_bytes(serialization.Encoding.PEM),
        "key": _pem_key(server_key),
        "other_key": _pem_key(other_key),
        "client_cert": _certificate("client", client_key, ca, ca_key).public_bytes(serialization.Encoding.PEM),
        "client_key": _pem_key(client_key),
        "expired": _certificate("127.0.0.1", server_key, ca, ca_key, days=(-30, -1)).public_bytes(
            serialization.Encoding.PEM
        ),
        "future": _certificate("127.0.0.1", server_key, ca, ca_key, days=(5, 30)).public_bytes(
            serialization.Encoding.PEM
        ),
    }
    for name, data in files.items():
        (folder / f"{name}.pem").write_bytes(data)
    return {name: folder / f"{name}.pem" for name in files}


@pytest.mark.parametrize(
    "cert, key, match",
    [
        ("cert", "other_key", "does not match the key"),
        ("expired", "key", "expired on"),
        ("future", "key", "not valid yet"),
        ("key", "key", "is not a PEM certificate"),
        ("missing", "key", "cannot be read"),
    ],
)
def test_a_bad_certificate_gets_one_sentence_before_the_server_starts(pki, tmp_path, cert, key, match):
    tls = GrpcTls(pki.get(cert, tmp_path / "missing.pem"), pki[key])
    with pytest.raises(DeploykitError, match=match):
        server_access("127.0.0.1", tls=tls)


# --- a real Triton ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_without_the_key_the_control_apis_are_refused_and_the_model_keeps_serving(tmp_path, monkeypatch):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from deploykit.serve.oip import OipClient
    from deploykit.serve.triton import ModelControl

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    with triton_with_tiny(tmp_path, access=ServerAccess(key=KEY)) as served:
        url, model = served.http_url, served.model
        refused = {
            "repository index": _call(f"{url}/v2/repository/index", b"{}"),
            "unload": _call(f"{url}/v2/repository/models/{model}/unload", b"{}"),
            "load": _call(f"{url}/v2/repository/models/{model}/load", b"{}"),
            "config": _call(f"{url}/v2/models/{model}/config"),
            "statistics": _call(f"{url}/v2/models/stats"),
        }
        assert refused == dict.fromkeys(refused, 403)
        with pytest.raises(DeploykitError, match=f"admin key; set {KEY_FILE_ENV}"):
            ModelControl(url).model_states()
        with grpcclient.InferenceServerClient(served.grpc_url) as grpc:
            with pytest.raises(InferenceServerException, match=GRPC_HEADER):
                grpc.unload_model(model)
            assert [m.name for m in grpc.get_model_repository_index(headers={GRPC_HEADER: KEY}).models] == [model]
        # Inference, metadata and health stay open, and the model is still there after the refused unload.
        x = np.ones((2, 3, 8, 8), np.float32)
        assert OipClient(url, model).infer(x).shape[0] == 2
        assert _call(f"{url}/v2/health/ready") == 200 and _call(f"{url}/v2/models/{model}/ready") == 200
        monkeypatch.setenv(KEY_ENV, KEY)  # every deploykit client now sends it
        control = ModelControl(url)
        assert [s["state"] for s in control.model_states()] == ["READY"]
        control.unload(model)
        assert _call(f"{url}/v2/models/{model}/ready") == 400
        control.load(model)
        assert OipClient(url, model).infer(x).shape[0] == 2


@pytest.mark.slow
def test_restricted_inference_needs_the_key_and_grpc_tls_refuses_plain_text(tmp_path, monkeypatch, pki):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from deploykit.serve.oip import OipClient

    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)
    access = ServerAccess(key=KEY, restrict_inference=True, tls=GrpcTls(pki["cert"], pki["key"]))
    x = np.ones((1, 3, 8, 8), np.float32)
    with triton_with_tiny(tmp_path, access=access) as served:
        url, model = served.http_url, served.model
        assert _call(f"{url}/v2/models/{model}") == 403
        with pytest.raises(DeploykitError, match="wants a key"):
            OipClient(url, model).metadata()
        assert _call(f"{url}/v2/health/live") == 200  # probes never need the key
        monkeypatch.setenv(KEY_ENV, KEY)
        monkeypatch.setenv(TLS_CA_ENV, str(pki["ca"]))
        assert OipClient(url, model).infer(x).shape == (1, 5)
        creds = client_access()
        assert creds.inference_headers == {HEADER: KEY}
        with creds.grpc_client(served.grpc_url) as tls_client:  # TLS, trusting the test CA
            inputs = [grpcclient.InferInput("input", list(x.shape), "FP32")]
            inputs[0].set_data_from_numpy(x)
            out = tls_client.infer(model, inputs, headers=creds.grpc_headers).as_numpy("logits")
            assert out.shape == (1, 5) and np.isfinite(out).all()
            with pytest.raises(InferenceServerException, match=GRPC_HEADER):
                tls_client.infer(model, inputs)  # over TLS, but without the key
        with grpcclient.InferenceServerClient(served.grpc_url) as plain:
            with pytest.raises(InferenceServerException):
                plain.is_server_live(headers=creds.grpc_headers)  # plain text to a TLS port: refused


@pytest.mark.slow
def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(tmp_path, monkeypatch, pki):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    monkeypatch.setenv(TLS_CA_ENV, str(pki["ca"]))
    access = ServerAccess(tls=GrpcTls(pki["cert"], pki["key"], client_ca=pki["ca"]))
    with triton_with_tiny(tmp_path, access=access) as served:
        with client_access().grpc_client(served.grpc_url) as anonymous:  # trusts the server, shows no certificate
            with pytest.raises(Exception):
                anonymous.is_server_live()
        monkeypatch.setenv(TLS_CERT_ENV, str(pki["client_cert"]))
        monkeypatch.setenv(TLS_KEY_ENV, str(pki["client_key"]))
        with client_access().grpc_client(served.grpc_url) as known:
            assert known.is_server_live() and known.is_model_ready(served.model)
