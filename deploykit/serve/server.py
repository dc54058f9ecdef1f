"""Every server behind one protocol: where it takes requests and metrics, start/stop, and which models failed.

Callers hold a `Server` and ask it; `make_server` is the one place that knows which class serves which engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from deploykit.errors import DeploykitError
from deploykit.serve.access import ServerAccess
from deploykit.serve.engines import EngineTraits, engine_traits
from deploykit.serve.process import free_ports_on


class Server(Protocol):
    """A running (or startable) inference server on one model repository or store."""

    traits: EngineTraits

    @property
    def infer_url(self) -> str: ...  # HTTP base URL of inference, health and metadata

    @property
    def grpc_url(self) -> str | None: ...  # host:port of gRPC inference, None when the engine has none here

    @property
    def metrics_url(self) -> str: ...  # Prometheus text endpoint

    @property
    def log_path(self) -> Path: ...

    @property
    def running(self) -> bool: ...

    @property
    def endpoints(self) -> dict[str, str]: ...  # every endpoint by name, for people to read

    def start(self, timeout: float = 120.0) -> Server: ...

    def stop(self) -> object: ...

    def failed_models(self) -> dict[str, str]: ...  # model -> why it is not serving

    def client_env(self) -> dict[str, str]: ...  # what deploykit's clients need in their environment to call it


def free_ports(engine: str) -> dict[str, int]:
    """A free port for every endpoint of `engine`: two servers on one machine never collide."""
    kinds = list(engine_traits(engine).ports)
    return dict(zip(kinds, free_ports_on(len(kinds))))


def make_server(
    engine: str,
    repo: Path,
    *,
    host: str = "127.0.0.1",
    ports: dict[str, int] | None = None,
    models: list[str] | None = None,
    log_dir: Path | None = None,
    access: ServerAccess | None = None,
) -> Server:
    """A server of `engine` on `repo` (a Triton model repository or a TorchServe model store), not started.

    `ports` are keyed as the engine's traits name them (missing ones take the engine's defaults); `models` limits
    what Triton loads (TorchServe serves its whole store); logs go into `log_dir` (default: beside `repo`).
    `access`: Triton's admin key and gRPC TLS (TorchServe keeps its own token authorization, always on).
    """
    traits = engine_traits(engine)
    unknown = set(ports or {}) - set(traits.ports)
    if unknown:
        raise DeploykitError(f"{engine} has no {', '.join(sorted(unknown))} port: it has {', '.join(traits.ports)}.")
    port = {**traits.ports, **(ports or {})}
    if engine == "torchserve":
        from deploykit.serve.torchserve import TorchServeServer

        if models:
            raise DeploykitError("TorchServe serves every archive in its model store: drop --model, or use Triton.")
        return TorchServeServer(
            repo, host=host, inference_port=port["inference"], management_port=port["management"],
            metrics_port=port["metrics"], log_dir=log_dir,
        )  # fmt: skip
    from deploykit.serve.triton import TritonServer

    return TritonServer(
        repo, host=host, http_port=port["http"], grpc_port=port["grpc"], metrics_port=port["metrics"],
        models=models, log_path=log_dir / "tritonserver.log" if log_dir else None, access=access,
    )  # fmt: skip
