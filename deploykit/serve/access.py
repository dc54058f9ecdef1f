"""Who may call a server: the admin key that guards its control APIs, and gRPC TLS.

Server side, `ServerAccess` turns `deploykit serve`'s flags into Triton's own options (`--http-restricted-api`,
`--grpc-restricted-protocol`, `--grpc-use-ssl...`), after checking every file before the server starts. Client side,
`client_access()` is what every deploykit client sends: the key named by the environment (`DEPLOYKIT_KEY`, or
`DEPLOYKIT_KEY_FILE`; TorchServe's `key_file.json` in `DEPLOYKIT_TORCHSERVE_KEY_FILE`) and the CA to trust for gRPC
TLS. The environment is the channel on purpose: locust and perf_analyzer run as child processes, and the locustfile
also runs on its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_bytes

HEADER = "deploykit-key"  # the HTTP header Triton checks; lower case, as gRPC metadata keys must be
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"  # Triton 2.51 looks for the gRPC key under this prefixed name
KEY_ENV = "DEPLOYKIT_KEY"
KEY_FILE_ENV = "DEPLOYKIT_KEY_FILE"
# TorchServe's own key_file.json: a variable of its own, so a shell (or a test session) can hold both servers' keys.
TORCHSERVE_KEY_FILE_ENV = "DEPLOYKIT_TORCHSERVE_KEY_FILE"
TLS_CA_ENV = "DEPLOYKIT_GRPC_TLS_CA"  # clients: the CA that signed the server's certificate
TLS_CERT_ENV = "DEPLOYKIT_GRPC_TLS_CERT"  # clients, mutual TLS: their own certificate and key
TLS_KEY_ENV = "DEPLOYKIT_GRPC_TLS_KEY"
# Triton's API groups. Control: what changes or reveals the server's state. Inference, health and metadata stay
# open unless inference is restricted too; health always stays open, for load balancers' and Kubernetes' probes.
CONTROL_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
INFERENCE_APIS = ("inference", "metadata")
_KEY_CHARS = re.compile(r"^[A-Za-z0-9._~+/-]{16,512}$")  # header-safe, and free of Triton's flag separators : = ,


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: only this machine can reach a server bound there."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_key(key: str, source: str) -> str:
    key = key.strip()
    if not _KEY_CHARS.match(key):
        raise DeploykitError(
            f"The key in {source} is not 16-512 characters of A-Z a-z 0-9 . _ ~ + / -: "
            "those are the characters a header can carry; make one with `deploykit serve --admin-key-file NEW`."
        )
    return key


def read_key_file(path: Path) -> str:
    """The key in `path`, refusing a missing or unreadable file or one other users can read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DeploykitError(f"The key file {path} cannot be read ({e.__class__.__name__}): check the path.") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DeploykitError(f"The key file {path} is readable by other users: run `chmod 600 {path}`.")
    return check_key(text, str(path))


def write_new_key(path: Path) -> str:
    """A fresh random key written to `path` with mode 0600 (never visible to others, even while written)."""
    key = secrets.token_urlsafe(32)
    atomic_write_bytes(path, key.encode(), mode=0o600)  # no newline: `kubectl --from-file` keeps every byte
    return key


@dataclass(frozen=True)
class GrpcTls:
    """The server's certificate and key, and (mutual TLS) the CA its clients' certificates must be signed by."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """One sentence for a cert that does not load, does not match its key, or is outside its dates."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert = _load(self.cert, "certificate", x509.load_pem_x509_certificate)
        key = _load(self.key, "private key", lambda data: serialization.load_pem_private_key(data, password=None))
        if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
            raise DeploykitError(
                f"The TLS certificate {self.cert} does not match the key {self.key}: give the key it was made for."
            )
        now = dt.datetime.now(dt.timezone.utc)
        if cert.not_valid_after_utc <= now:
            raise DeploykitError(f"The TLS certificate {self.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}.")
        if cert.not_valid_before_utc > cert.not_valid_after_utc or cert.not_valid_before_utc > now:
            raise DeploykitError(
                f"The TLS certificate {self.cert} is not valid yet (from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                "UTC): check the dates it was made with."
            )
        if self.client_ca is not None:
            _load(self.client_ca, "CA certificate", x509.load_pem_x509_certificate)

    def triton_args(self) -> list[str]:
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.client_ca is not None:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.client_ca}"]
        return args


def _load(path: Path, what: str, parse: Any) -> Any:
    try:
        return parse(Path(path).read_bytes())
    except OSError as e:
        raise DeploykitError(f"The TLS {what} {path} cannot be read ({type(e).__name__}): check the path.") from None
    except (ValueError, TypeError) as e:
        raise DeploykitError(f"The TLS {what} {path} is not a PEM {what} ({e}): give the PEM file.") from None


def _public_bytes(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class ServerAccess:
    """What a Triton server enforces: the key on its control APIs (and inference), and gRPC TLS."""

    key: str | None = None
    key_file: Path | None = None
    restrict_inference: bool = False
    tls: GrpcTls | None = None

    @property
    def restricted_apis(self) -> tuple[str, ...]:
        if self.key is None:
            return ()
        return CONTROL_APIS + (INFERENCE_APIS if self.restrict_inference else ())

    def headers(self) -> dict[str, str]:
        return {HEADER: self.key} if self.key else {}

    def client_env(self) -> dict[str, str]:
        if self.key is None:
            return {}
        return {KEY_FILE_ENV: str(self.key_file)} if self.key_file else {KEY_ENV: self.key}

    def triton_args(self) -> list[str]:
        args = []
        if self.key is not None:
            apis = ",".join(self.restricted_apis)
            args += [f"--http-restricted-api={apis}:{HEADER}={self.key}",
                     f"--grpc-restricted-protocol={apis}:{HEADER}={self.key}"]  # fmt: skip
        return args + (self.tls.triton_args() if self.tls else [])


def server_access(
    host: str,
    *,
    key_file: Path | None = None,
    restrict: bool = False,
    restrict_inference: bool = False,
    insecure: bool = False,
    tls: GrpcTls | None = None,
    default_key_file: Path | None = None,
) -> tuple[ServerAccess, str | None]:
    """The access a server on `host` gets and a line to print (a new key's path, or the --insecure warning).

    A non-loopback bind is always restricted unless `insecure`; a loopback one only when asked (`restrict`, a key
    file, `restrict_inference`, or a key in the environment). A key file that does not exist yet is created.
    """
    if insecure and (key_file or restrict or restrict_inference):
        raise DeploykitError("--insecure turns access control off: drop it, or drop the key and restrict options.")
    if tls is not None:
        tls.check()
    env_key = os.environ.get(KEY_ENV)
    wanted = bool(key_file or restrict or restrict_inference or env_key) or not is_loopback(host)
    if insecure and not is_loopback(host):
        return ServerAccess(tls=tls), f"--insecure: model load/unload on {host} is open to anyone who reaches the port."
    if insecure or not wanted:
        return ServerAccess(tls=tls), None
    if key_file is None and env_key:
        return ServerAccess(check_key(env_key, f"${KEY_ENV}"), None, restrict_inference, tls), None
    path = Path(key_file or default_key_file or "deploykit-admin.key")
    if path.exists():
        return ServerAccess(read_key_file(path), path, restrict_inference, tls), None
    key = write_new_key(path)
    note = f"Admin key written to {path} (mode 0600): clients send it as the {HEADER!r} header ({KEY_FILE_ENV}={path})."
    return ServerAccess(key, path, restrict_inference, tls), note


@dataclass(frozen=True)
class ClientAccess:
    """What deploykit's clients send: headers for inference and for control calls, and gRPC TLS files."""

    inference_headers: dict[str, str] = field(default_factory=dict)
    control_headers: dict[str, str] = field(default_factory=dict)
    grpc_headers: dict[str, str] = field(default_factory=dict)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def grpc_client(self, url: str) -> Any:
        """A tritonclient gRPC client for `url`, over TLS when a CA is given."""
        import tritonclient.grpc as grpcclient

        if self.tls_ca is None:
            return grpcclient.InferenceServerClient(url)
        return grpcclient.InferenceServerClient(
            url, ssl=True, root_certificates=str(self.tls_ca),
            private_key=str(self.tls_key) if self.tls_key else None,
            certificate_chain=str(self.tls_cert) if self.tls_cert else None,
        )  # fmt: skip


def client_access(engine: str = "triton") -> ClientAccess:
    """The credentials the environment names, as `engine` takes them (Triton: one header; TorchServe: bearer
    tokens from its key_file.json, the inference key for predictions and the management key for control)."""
    tls = {name: Path(os.environ[var]) if os.environ.get(var) else None
           for name, var in (("tls_ca", TLS_CA_ENV), ("tls_cert", TLS_CERT_ENV), ("tls_key", TLS_KEY_ENV))}  # fmt: skip
    if engine == "torchserve":
        path = os.environ.get(TORCHSERVE_KEY_FILE_ENV)
        if not path:
            return ClientAccess(**tls)
        keys = torchserve_keys(Path(path))
        return ClientAccess({"Authorization": f"Bearer {keys['inference']}"},
                            {"Authorization": f"Bearer {keys['management']}"}, **tls)  # fmt: skip (no gRPC here)
    key, path = os.environ.get(KEY_ENV), os.environ.get(KEY_FILE_ENV)
    if not key and not path:
        return ClientAccess(**tls)
    value = check_key(key, f"${KEY_ENV}") if key else read_key_file(Path(path))
    return ClientAccess({HEADER: value}, {HEADER: value}, {GRPC_HEADER: value}, **tls)


def torchserve_keys(path: Path) -> dict[str, str]:
    """The inference and management keys of TorchServe's key_file.json (it writes one at each start)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return {kind: str(raw[kind]["key"]) for kind in ("inference", "management")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DeploykitError(
            f"{path} is not TorchServe's key_file.json ({e.__class__.__name__}): give the file TorchServe wrote "
            "when it started (`deploykit serve --engine torchserve` prints its path)."
        ) from None


@contextlib.contextmanager
def client_environment(env: dict[str, str]) -> Iterator[None]:
    """Run the block with `env` (a server's client_env()) in os.environ, for this process's clients and the load
    generators it starts, and put the environment back afterwards."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
