"""Real servers for tests: a tiny ONNX model, a portable Triton repository, Triton and TorchServe on free ports."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from deploykit.package.torchserve_archive import write_torchserve_archive
from deploykit.package.triton_repo import TritonModelOptions, write_triton_model
from deploykit.serve.access import ServerAccess
from deploykit.serve.process import free_ports_on
from deploykit.serve.server import Server, free_ports, make_server
from deploykit.serve.triton import TritonServer, find_triton

SAMPLE = (3, 8, 8)
CLASSES = 5
NAME = "tiny"


def export_tiny(path: Path, seed: int = 0) -> Path:
    """A small conv net as ONNX with deploykit's conventions: input [batch, 3, 8, 8] -> logits [batch, 5]."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, CLASSES),
    ).eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and the fastest for a 5-layer net
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.randn(1, *SAMPLE),),
            path,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
            external_data=False,
        )
    return path


def ports(n: int = 3) -> list[int]:
    return free_ports_on(n)


def portable_options(**fields) -> TritonModelOptions:
    return TritonModelOptions(flavour="portable", execution_env=str(find_triton().python_env), threads=1, **fields)


@dataclass
class Served:
    """A running server as tests use it."""

    server: Server
    http_url: str
    grpc_url: str | None
    metrics_url: str
    model: str
    onnx: Path


def start_triton(repo: Path, **kwargs) -> TritonServer:
    http, grpc, metrics = ports()
    return TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, **kwargs).start()


@contextmanager
def serving(server: Server, onnx: Path) -> Iterator[Served]:
    """Start `server` (serving the tiny model) and stop it after the block, whatever its engine."""
    server.start()
    try:
        yield Served(server, server.infer_url, server.grpc_url, server.metrics_url, NAME, onnx)
    finally:
        server.stop()


@contextmanager
def triton_with_tiny(tmp: Path, access: ServerAccess | None = None, **options) -> Iterator[Served]:
    onnx = export_tiny(tmp / "tiny.onnx")
    write_triton_model(tmp / "repo", NAME, onnx, portable_options(**options))
    server = make_server("triton", tmp / "repo", ports=free_ports("triton"), log_dir=tmp, access=access)
    with serving(server, onnx) as served:
        yield served


@contextmanager
def torchserve_with_tiny(tmp: Path) -> Iterator[Served]:
    from deploykit.serve.access import client_environment

    onnx = export_tiny(tmp / "tiny.onnx")
    write_torchserve_archive(onnx, tmp / "store", NAME, batch_size=4, max_batch_delay_ms=5, threads=1)
    server = make_server("torchserve", tmp / "store", ports=free_ports("torchserve"), log_dir=tmp / "logs")
    # Its token authorization is on: clients (and locust, their child) find its keys as users' do, in the environment.
    with client_environment(server.client_env()), serving(server, onnx) as served:
        yield served
