"""A real TorchServe on a deploykit model store: prerequisites checked first, healthy once every worker is READY."""

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
from deploykit.serve.access import TORCHSERVE_KEY_FILE_ENV, torchserve_keys
from deploykit.serve.engines import ENGINES
from deploykit.serve.process import ServedEndpoints, ServerProcess, client_host, free_port, http_status

MIN_JAVA = 11
# TorchServe's working directory, under the log dir, mode 0700: it writes key_file.json there, with the umask's mode
# until it narrows it to 0600.
KEY_DIR = "keys"
KEY_FILE = "key_file.json"


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

    @property
    def key_file(self) -> Path:
        """TorchServe's key_file.json (mode 0600): new keys at each start, written into its working directory."""
        return self.log_path.parent / KEY_DIR / KEY_FILE

    def client_env(self) -> dict[str, str]:
        """The environment deploykit's clients (and locust, run as a child) read TorchServe's keys from."""
        return {TORCHSERVE_KEY_FILE_ENV: str(self.key_file)}

    def _control_headers(self) -> dict[str, str]:
        # Read at each call: TorchServe rewrites the file when a key is renewed through its /token API.
        return {"Authorization": f"Bearer {torchserve_keys(self.key_file)['management']}"}

    def failed_models(self) -> dict[str, str]:
        """Models of the store without a READY worker, with TorchServe's reason."""
        log = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        headers = self._control_headers()
        return {
            name: _load_failure(log, name)
            for name in self.models
            if not _ready_workers(f"{self.endpoints['management']}/models/{name}", headers)
        }

    def start(self, timeout: float = 120) -> TorchServeServer:
        """Start TorchServe and return once it wrote its keys, /ping answers and every model has all its workers
        READY."""
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
        home = _private_dir(log_dir / KEY_DIR)
        (home / KEY_FILE).unlink(missing_ok=True)  # a previous run's: waiting for the file must see this run's keys
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
        self.process = ServerProcess(argv, log_dir / "torchserve.log", env=env, cwd=home)
        deadline = time.monotonic() + timeout
        try:
            keys = self._wait_keys(deadline)
            self._wait_ping({"Authorization": f"Bearer {keys['inference']}"}, deadline)
            for name in self.models:
                self._wait_model(name, int(settings[name]["workers"]), deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_keys(self, deadline: float) -> dict[str, str]:
        """TorchServe's keys, once it has written them; the file is made private if TorchServe did not."""
        assert self.process is not None
        while True:
            try:
                keys = torchserve_keys(self.key_file)  # it creates the file empty, then writes it: read until whole
                break
            except DeploykitError:
                self._check_alive("writing its key file", deadline)
            time.sleep(0.1)
        if self.key_file.stat().st_mode & 0o077:
            self.key_file.chmod(0o600)
        return keys

    def _wait_ping(self, headers: dict[str, str], deadline: float) -> None:
        url = f"{self.endpoints['inference']}/ping"
        while http_status(url, headers=headers) != 200:
            self._check_alive(f"answering {url}", deadline)
            time.sleep(0.2)

    def _check_alive(self, step: str, deadline: float) -> None:
        """One sentence when TorchServe exited, or time ran out, before `step` (e.g. "answering /ping") was done."""
        assert self.process is not None
        if not self.process.running:
            raise DeploykitError(
                f"TorchServe exited with code {self.process.proc.returncode} before {step} "
                f"(last lines: {self.process.log_tail(5)!r}): see {self.process.log_path} for why."
            )
        if time.monotonic() > deadline:
            raise DeploykitError(
                f"TorchServe took too long {step}: see {self.process.log_path}, or start with a longer timeout."
            )

    def _wait_model(self, name: str, workers: int, deadline: float) -> None:
        """Poll the management API until `name` has `workers` READY workers; a failed load raises with its reason."""
        assert self.process is not None
        url = f"{self.endpoints['management']}/models/{name}"
        headers = self._control_headers()
        while True:
            ready = _ready_workers(url, headers)
            if ready is not None and ready >= workers:
                return
            log = self.process.log_path.read_text(errors="replace")
            if ready is None or f"Load model failed: {name}," in log:
                raise DeploykitError(
                    f"TorchServe could not load model {name!r} ({_load_failure(log, name)}): "
                    f"fix its archive; the full log is {self.process.log_path}."
                )
            self._check_alive(f"getting model {name!r}'s workers READY", deadline)
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop TorchServe's whole process group (launcher, Java frontend, Python workers) and drop its temp files."""
        if self.process is not None:
            self.process.stop()
            _wait_group_gone(self.process.proc.pid)
            self.key_file.unlink(missing_ok=True)  # its keys die with it, as `torchserve --stop` removes them too
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


def _private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter (mkdir's mode is cut by the umask, and the dir may exist)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _ready_workers(url: str, headers: dict[str, str]) -> int | None:
    """How many workers of the model at management `url` are READY; None when TorchServe does not know the model."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
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
