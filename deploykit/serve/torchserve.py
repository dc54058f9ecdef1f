"""A real TorchServe on a deploykit model store: prerequisites checked first, healthy only when every worker is READY."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from deploykit.errors import DeploykitError
from deploykit.package.torchserve_archive import read_store_models, write_config_properties
from deploykit.serve.engines import ENGINES
from deploykit.serve.process import ServedEndpoints, ServerProcess, client_host, free_port

MIN_JAVA = 11


class TorchServeServer(ServedEndpoints):
    """`with TorchServeServer(store, inference_port=...) as ts:` serves every .mar of `store` until the block ends."""

    def __init__(
        self,
        model_store: Path,
        *,
        host: str = "127.0.0.1",
        inference_port: int = 8080,
        management_port: int = 8081,
        metrics_port: int = 8082,
        log_dir: Path | None = None,
        grpc_inference_port: int | None = None,
        grpc_management_port: int | None = None,
    ) -> None:
        self.model_store = Path(model_store)
        self.host = host
        self.ports = {"inference": inference_port, "management": management_port, "metrics": metrics_port}
        # TorchServe always opens gRPC too; free ports by default so two servers on one machine never collide.
        for kind, port in (("grpc_inference", grpc_inference_port), ("grpc_management", grpc_management_port)):
            if port is None:
                free = iter(lambda: free_port(client_host(host)), None)
                port = next(p for p in free if p not in self.ports.values())
            self.ports[kind] = port
        if len(set(self.ports.values())) != len(self.ports):
            raise DeploykitError(f"TorchServe ports {self.ports} must all be different: choose distinct ones.")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        base = f"http://{client_host(host)}"
        self.endpoints = {
            "inference": f"{base}:{inference_port}",
            "management": f"{base}:{management_port}",
            "metrics": f"{base}:{metrics_port}/metrics",
        }
        self.models: list[str] = []
        self.process: ServerProcess | None = None
        self._tmp: Path | None = None

    traits = ENGINES["torchserve"]

    @property
    def infer_url(self) -> str:
        return self.endpoints["inference"]

    @property
    def grpc_url(self) -> None:
        return None  # its gRPC API is not deploykit's OIP one: load tests and checks use HTTP

    @property
    def log_path(self) -> Path:
        if self.process is not None:
            return self.process.log_path
        if self.log_dir is None:
            raise DeploykitError("TorchServe has not started, so it has no log yet: start it first.")
        return self.log_dir / "torchserve.log"

    def failed_models(self) -> dict[str, str]:
        """Models of the store without a READY worker, with TorchServe's reason."""
        log = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return {
            name: _load_failure(log, name)
            for name in self.models
            if not _ready_workers(f"{self.endpoints['management']}/models/{name}")
        }

    def start(self, timeout: float = 120) -> TorchServeServer:
        """Start TorchServe and return once /ping answers and every model has all its workers READY."""
        if self.process is not None and self.process.running:
            return self
        _check_java()
        if importlib.util.find_spec("yaml") is None:  # TorchServe's workers import it without declaring it
            raise DeploykitError("TorchServe's workers need PyYAML, which is not installed: run `pip install pyyaml`.")
        settings = read_store_models(self.model_store)
        config = write_config_properties(  # it also refuses a missing or empty model store
            self.model_store,
            host=self.host,
            models=settings,
            **{f"{kind}_port": port for kind, port in self.ports.items()},
        )
        self.models = list(settings)
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="deploykit-torchserve-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        # A private temp dir: the launcher keeps its pid file there and refuses to start when another TorchServe
        # on the machine wrote one; the workers' sockets (.ts.sock.9000, ...) and the unpacked .mar files live there.
        # It sits in the system temp folder, not the log folder: a socket path longer than 107 bytes cannot be bound,
        # and the workers then never come up.
        self._tmp = Path(tempfile.mkdtemp(prefix="deploykit-ts-"))
        env = dict(os.environ)
        env.pop("TS_CONFIG_FILE", None)  # it would override --ts-config
        env.update(
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            TMPDIR=str(self._tmp),
            TEMP=str(self._tmp),
            LOG_LOCATION=str(log_dir),
            METRICS_LOCATION=str(log_dir),
        )
        # `python -m ts.model_server` hands this interpreter (`--python`) to the workers: they share our packages.
        argv = [
            sys.executable,
            "-m",
            "ts.model_server",
            "--start",
            "--foreground",
            "--ncs",
            "--model-store",
            str(self.model_store.resolve()),
            "--ts-config",
            str(config.resolve()),
        ]
        self.process = ServerProcess(argv, log_dir / "torchserve.log", env=env, cwd=log_dir)
        deadline = time.monotonic() + timeout
        try:
            self.process.wait_http(f"{self.endpoints['inference']}/ping", timeout, what="TorchServe")
            for name in self.models:
                self._wait_model(name, int(settings[name]["workers"]), deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_model(self, name: str, workers: int, deadline: float) -> None:
        """Poll the management API until `name` has `workers` READY workers; a failed load raises with its reason."""
        assert self.process is not None
        url = f"{self.endpoints['management']}/models/{name}"
        while True:
            ready = _ready_workers(url)
            if ready is not None and ready >= workers:
                return
            log = self.process.log_path.read_text(errors="replace")
            if ready is None or f"Load model failed: {name}," in log:
                raise DeploykitError(
                    f"TorchServe could not load model {name!r} ({_load_failure(log, name)}): "
                    f"fix its archive; the full log is {self.process.log_path}."
                )
            if not self.process.running:
                raise DeploykitError(
                    f"TorchServe exited while loading model {name!r} (last lines: {self.process.log_tail(3)!r}): "
                    f"see {self.process.log_path} for why."
                )
            if time.monotonic() > deadline:
                raise DeploykitError(
                    f"TorchServe's workers for model {name!r} were not READY in time: see {self.process.log_path}, "
                    "or start with a longer timeout."
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop TorchServe's whole process group (launcher, Java frontend, Python workers) and drop its temp files."""
        if self.process is not None:
            self.process.stop()
            _wait_group_gone(self.process.proc.pid)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TorchServeServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _check_java() -> None:
    java_home = os.environ.get("JAVA_HOME")  # TorchServe's launcher prefers $JAVA_HOME/bin/java, as here
    java = str(Path(java_home, "bin", "java")) if java_home else shutil.which("java")
    fix = f"install Java {MIN_JAVA} or newer (e.g. `apt-get install openjdk-17-jre-headless`) and put it on PATH"
    if java is None or not Path(java).is_file():
        raise DeploykitError(f"TorchServe needs Java but no `java` was found on PATH or in JAVA_HOME: {fix}.")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeploykitError(f"TorchServe needs Java but `{java} -version` failed ({exc}): {fix}.") from exc
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    # Java 8 and older call themselves "1.8"; newer ones start with their major version.
    major = None if found is None else int(found[2] or 0) if found[1] == "1" else int(found[1])
    if major is None or major < MIN_JAVA:
        raise DeploykitError(
            f"TorchServe needs Java {MIN_JAVA}+ but {java} is {found[0] if found else 'unknown'}: {fix}."
        )


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Return once no process of the group is left: Java, orphaned by the launcher, is reaped by init a moment later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _ready_workers(url: str) -> int | None:
    """How many workers of the model at management `url` are READY; None when TorchServe does not know the model."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            described = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        return 0
    except OSError:
        return 0
    return sum(w.get("status") == "READY" for entry in described for w in entry.get("workers", []))


def _load_failure(log: str, name: str) -> str:
    """The last line a worker of `name` printed that is not part of a traceback: the exception that killed it."""
    worker = re.compile(rf"W-\d+-{re.escape(name)}_\S*-stdout MODEL_LOG - (\S.*)$")
    said = [m[1] for line in log.splitlines() if (m := worker.search(line))]
    errors = [s for s in said if s != "Backend worker process died." and not s.startswith("Traceback")]
    if errors:
        return errors[-1]
    registered = [line.split(" - ", 1)[-1] for line in log.splitlines() if "ERROR" in line and name in line]
    return registered[-1] if registered else "no reason in the log"
