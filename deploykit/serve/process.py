"""A server child process: its own process group (so no orphans survive it), a log file, and health waits."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from deploykit.errors import DeploykitError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    return free_ports_on(1, host)[0]


def free_ports_on(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different TCP ports nothing listens on right now. Each socket stays bound until all are picked:
    ports picked one after another can repeat (Triton then refused to start, its HTTP and gRPC on one port)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]


def http_status(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> int | None:
    """The HTTP status a GET of `url` (with `headers`) answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):
        return None


def client_host(host: str) -> str:
    """The address a local client uses for a server bound to `host` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class ServerProcess:
    """Runs `argv` in a new session with output to `log_path`; `stop()` ends the whole process group."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float, ok: int = 200, what: str = "server") -> None:
        """Poll `url` until it answers `ok`; raise with the log's tail if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise DeploykitError(
                    f"The {what} exited with code {self.proc.returncode} before {url} answered; "
                    f"see {self.log_path} (last lines: {self.log_tail(5)!r})."
                )
            if http_status(url) == ok:
                return
            time.sleep(0.2)
        self.stop()
        raise DeploykitError(
            f"The {what} did not answer {ok} at {url} within {timeout:g} s; see {self.log_path} for why."
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, then SIGKILL what is left after `timeout` seconds; returns the exit code."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        _signal_group(self.proc.pid, signal.SIGKILL)  # children that outlived the leader (backend stubs, workers)
        return self.proc.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ServedEndpoints:
    """What every server class shares: `endpoints` (with a "metrics" entry) and the `process` it runs in."""

    endpoints: dict[str, str]
    process: ServerProcess | None

    @property
    def metrics_url(self) -> str:
        return self.endpoints["metrics"]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

