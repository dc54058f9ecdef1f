"""Starting a real Triton Inference Server on a model repository, and explicit model control.

Triton comes from PATH when present (the official server image), else from the `nvidia-pytriton` wheel, which
carries a Triton 2.51 binary with only the python backend. That wheel pins numpy 1.x, so it lives in an
environment of its own (`.venv-triton`, made by `make setup`); the portable models run inside it too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError
from deploykit.package.names import validate_model_name
from deploykit.serve.access import KEY_ENV, KEY_FILE_ENV, ServerAccess, client_access
from deploykit.serve.engines import ENGINES
from deploykit.serve.process import ServedEndpoints, ServerProcess, client_host

TRITON_ENV_VAR = "DEPLOYKIT_TRITON_ENV"
_WHEEL_SERVER = "pytriton/tritonserver"


@dataclass(frozen=True)
class TritonInstall:
    """How to run one Triton binary: the binary, its backends folder and the environment it needs."""

    binary: Path
    source: str
    backend_dir: Path | None = None  # None: the binary's own default (/opt/tritonserver/backends in the image)
    env: dict[str, str] = field(default_factory=dict)
    python_env: Path | None = None  # the environment portable (python backend) models run in


def _candidate_envs() -> list[Path]:
    named = os.environ.get(TRITON_ENV_VAR)
    project = Path(__file__).resolve().parents[2]  # a source checkout keeps .venv-triton beside deploykit/
    found = [Path(named)] if named else []
    return [*found, Path.cwd() / ".venv-triton", project / ".venv-triton", Path(sys.prefix)]


def _wheel_server(env: Path) -> Path | None:
    hits = sorted(env.glob(f"lib/python3*/site-packages/{_WHEEL_SERVER}/bin/tritonserver"))
    return hits[0] if hits else None


def _python_libdir(env: Path) -> str:
    """The folder holding libpython of `env`'s interpreter: the backend stub links against it."""
    out = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _wheel_backends(server_root: Path, py_version: str) -> Path:
    """A backends folder for the wheel's binary: the python backend plus the stub built for `py_version`."""
    stub = server_root / "python_backend_stubs" / py_version / "triton_python_backend_stub"
    if not stub.is_file():
        raise DeploykitError(
            f"nvidia-pytriton has no python backend stub for Python {py_version}; use Python 3.8-3.13."
        )
    backends = server_root.parent.parent / "deploykit-triton-backends"
    python = backends / "python"
    if not (python / stub.name).exists():
        python.mkdir(parents=True, exist_ok=True)
        for src in (*sorted((server_root / "backends" / "python").glob("*.*")), stub):
            (python / src.name).unlink(missing_ok=True)
            (python / src.name).symlink_to(src)
    return backends


def find_triton() -> TritonInstall:
    """The `tritonserver` on PATH, else the one inside nvidia-pytriton in the first environment that has it."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(binary=Path(on_path), source=f"PATH ({on_path})")
    for env in _candidate_envs():
        binary = _wheel_server(env)
        if binary is None:
            continue
        server_root = binary.parent.parent
        py_version = binary.parents[4].name.removeprefix("python")  # lib/python3.11/site-packages/pytriton/...
        site = binary.parents[3]
        libs = [_python_libdir(env), str(site / "nvidia_pytriton.libs")]
        if os.environ.get("LD_LIBRARY_PATH"):
            libs.append(os.environ["LD_LIBRARY_PATH"])
        return TritonInstall(
            binary=binary,
            source=f"nvidia-pytriton in {env}",
            backend_dir=_wheel_backends(server_root, py_version),
            env={"LD_LIBRARY_PATH": os.pathsep.join(libs)},
            python_env=env.resolve(),
        )
    raise DeploykitError(
        "No Triton server found: run `make setup` (it builds .venv-triton with nvidia-pytriton), set "
        f"{TRITON_ENV_VAR} to an environment that has nvidia-pytriton, or put `tritonserver` on PATH."
    )


def _request(
    url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None, timeout: float = 120.0
) -> tuple[int, dict[str, Any]]:
    """(status, JSON reply) of a control call, with `headers` (the admin key)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return int(r.status), json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        if e.code == 403:  # Triton's answer to a restricted API called without its key
            raise DeploykitError(
                f"Triton refused {url} (403): it restricts this API to callers with its admin key; set "
                f"{KEY_FILE_ENV} (or {KEY_ENV}) to the key the server was started with."
            ) from None
        raw = e.read()
        try:
            return int(e.code), json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            return int(e.code), {"error": raw.decode(errors="replace")}
    except OSError as e:
        raise DeploykitError(f"No server answers at {url} ({e}): start one with `deploykit serve`.") from None


class TritonServer(ServedEndpoints):
    """One Triton process on `repo`, in explicit model-control mode so models can be loaded, unloaded and rolled back.

    Use as a context manager, or call `start()` and `stop()`. Binds `host` (127.0.0.1 by default).
    """

    def __init__(
        self,
        repo: Path,
        *,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        models: list[str] | None = None,
        log_path: Path | None = None,
        install: TritonInstall | None = None,
        access: ServerAccess | None = None,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.models = [validate_model_name(m) for m in models] if models else None
        self.log_path = Path(log_path) if log_path else self.repo.parent / "tritonserver.log"
        self.install = install
        self.access = access or ServerAccess()
        self.process: ServerProcess | None = None

    traits = ENGINES["triton"]

    @property
    def infer_url(self) -> str:
        return self.endpoints["http"]

    @property
    def grpc_url(self) -> str:
        return self.endpoints["grpc"]

    def failed_models(self) -> dict[str, str]:
        return self.control.failed_models()

    @property
    def endpoints(self) -> dict[str, str]:
        h = client_host(self.host)
        return {
            "http": f"http://{h}:{self.ports['http']}",
            "grpc": f"{h}:{self.ports['grpc']}",
            "metrics": f"http://{h}:{self.ports['metrics']}/metrics",
        }

    def argv(self, install: TritonInstall) -> list[str]:
        argv = [
            str(install.binary),
            f"--model-repository={self.repo}",
            "--model-control-mode=explicit",
            # One broken model fails alone; readiness then means "the server is up", and
            # model_states() tells which models did not load and why.
            "--exit-on-error=false",
            "--strict-readiness=false",
            f"--http-address={self.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            # P50/P90/P95/P99 of request latency as Prometheus summaries: what the SLO alert rules watch.
            "--metrics-config=summary_latencies=true",
            *self.access.triton_args(),
        ]
        if install.backend_dir is not None:
            argv.append(f"--backend-directory={install.backend_dir}")
        argv += [f"--load-model={m}" for m in (self.models or ["*"])]
        return argv

    def start(self, timeout: float = 120.0) -> TritonServer:
        if not self.repo.is_dir():
            raise DeploykitError(f"Model repository {self.repo} does not exist: build one with `deploykit package`.")
        install = self.install or find_triton()
        self.install = install
        self.log_path.unlink(missing_ok=True)
        env = {**os.environ, **install.env}
        self.process = ServerProcess(self.argv(install), self.log_path, env=env)
        self.process.wait_http(f"{self.endpoints['http']}/v2/health/ready", timeout, what="Triton server")
        self.process.wait_http(self.endpoints["metrics"], 10.0, what="Triton server")  # it starts after HTTP
        return self

    def stop(self) -> int | None:
        return self.process.stop() if self.process else None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def control(self) -> ModelControl:
        return ModelControl(self.endpoints["http"], self.repo, headers=self.access.headers())

    def client_env(self) -> dict[str, str]:
        """The environment deploykit's clients (locust, perf_analyzer, validate) need to call this server."""
        return self.access.client_env()


class ModelControl:
    """Explicit model control on a running Triton (its HTTP endpoint): load, unload, roll back, and model states.

    `repo` is the server's model repository when it is on this machine: it lets a version be checked before a
    load, and a model's config be read when the model is not loaded. `headers` carry the admin key (default: the
    one the environment names).
    """

    def __init__(self, url: str, repo: Path | None = None, headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.repo = repo
        self.headers = client_access().control_headers if headers is None else headers

    def model_states(self) -> list[dict[str, Any]]:
        """Every model version in the repository with its state (READY, UNAVAILABLE...) and, on failure, the reason."""
        status, body = _request(f"{self.url}/v2/repository/index", {}, headers=self.headers)
        if status != 200:
            raise DeploykitError(f"Triton's repository index answered {status}: {body.get('error', body)}.")
        return list(body) if isinstance(body, list) else []

    def failed_models(self) -> dict[str, str]:
        """Model name -> why it is not serving, for models that tried to load and failed."""
        return {
            s["name"]: s.get("reason", "") or "not ready"
            for s in self.model_states()
            if s.get("state") not in ("READY", None) and s.get("reason")
        }

    def _config(self, name: str, from_file: bool = False) -> dict[str, Any]:
        """The model's config as Triton runs it, or (`from_file`, or when it is not loaded) its config.pbtxt."""
        status, body = (0, {}) if from_file else _request(f"{self.url}/v2/models/{name}/config", headers=self.headers)
        if status == 200:
            return body
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        path = (self.repo or Path("-")) / name / "config.pbtxt"
        if not path.is_file():
            raise DeploykitError(
                f"Model '{name}' is not loaded and its config.pbtxt is not at {path}: package it first."
            )
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        return json_format.MessageToDict(cfg, preserving_proto_field_name=True)

    def load(self, name: str, version: int | None = None) -> None:
        """Load (or reload) `name`; with `version`, serve exactly that version (a roll back or forward)."""
        validate_model_name(name)
        body: dict[str, Any] = {}
        if version is not None:
            if self.repo is not None and not (self.repo / name / str(version)).is_dir():
                raise DeploykitError(f"Model '{name}' has no version {version} in {self.repo}.")
            config = self._config(name)
            config["version_policy"] = {"specific": {"versions": [version]}}
            body = {"parameters": {"config": json.dumps(config)}}
        elif self.repo is not None and (self.repo / name / "config.pbtxt").is_file():
            # Triton keeps a config given at load time across plain reloads: after a roll back, "load" alone would
            # stay on the old version. The repository's own config brings back its version policy (the latest).
            body = {"parameters": {"config": json.dumps(self._config(name, from_file=True))}}
        status, reply = _request(f"{self.url}/v2/repository/models/{name}/load", body, headers=self.headers)
        if status != 200:
            raise DeploykitError(f"Triton could not load model '{name}': {reply.get('error', reply)}.")

    def unload(self, name: str) -> None:
        validate_model_name(name)
        status, reply = _request(f"{self.url}/v2/repository/models/{name}/unload", {}, headers=self.headers)
        if status != 200:
            raise DeploykitError(f"Triton could not unload model '{name}': {reply.get('error', reply)}.")

    def ready_versions(self, name: str) -> list[int]:
        return sorted(
            int(s["version"]) for s in self.model_states() if s.get("name") == name and s.get("state") == "READY"
        )
