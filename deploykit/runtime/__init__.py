"""One small interface over torch / ONNX Runtime / OpenVINO / TensorRT: `Session.run(x) -> logits`.

Benchmarks, quantization, export parity checks and serving checks all take a Session, so they never
care which runtime sits behind it. `open_artifact` picks the runtime from what a path holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from deploykit.errors import DeploykitError
from deploykit.runtime.base import NO_GPU, TENSORRT_MISSING, Session, require_tensorrt
from deploykit.runtime.ort_rt import onnx_precision, ort_session
from deploykit.runtime.ov_rt import IR_SUFFIX, ov_session
from deploykit.runtime.torch_rt import torch_session
from deploykit.runtime.trt_rt import engine_metadata_path, trt_session

if TYPE_CHECKING:
    from deploykit.sources.task import Task

__all__ = [
    "NO_GPU",
    "TENSORRT_MISSING",
    "Session",
    "engine_metadata_path",
    "evaluate_accuracy",
    "onnx_precision",
    "open_artifact",
    "ort_session",
    "ov_session",
    "require_tensorrt",
    "torch_session",
    "trt_session",
]

_ENGINE_SUFFIXES = (".plan", ".engine")
RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt")


def open_artifact(
    path: Path, threads: int | None = None, runtime: str | None = None, precision: str | None = None
) -> Session:
    """A Session for a model directory (torch), a .onnx file (ONNX Runtime, or OpenVINO with
    runtime='openvino'), an OpenVINO IR .xml, or a .plan/.engine file (TensorRT). `precision` (OpenVINO only)
    asks for the float layers' precision, bf16 on CPUs that have it; None keeps the file's."""
    path = Path(path)
    if runtime == "openvino" or path.suffix == IR_SUFFIX:
        return ov_session(path, threads, precision or "fp32")
    if precision not in (None, "fp32"):
        raise DeploykitError(
            f"{path.name} runs on {runtime or 'its default runtime'}, which deploykit runs in its file's precision "
            f"only: ask for {precision} on OpenVINO."
        )
    if path.is_dir() and (path / "model.json").is_file():
        from deploykit.train import load_model

        model, _ = load_model(path)
        session = torch_session(model, threads)
        session.path = path
        return session
    if path.suffix == ".onnx":
        return ort_session(path, threads)
    if path.suffix in _ENGINE_SUFFIXES:
        return trt_session(path)
    raise DeploykitError(
        f"Cannot open {path} as a model: pass a .onnx file, an OpenVINO .xml, a .plan/.engine TensorRT engine "
        "or a directory holding model.json and model.pt."
    )


def _labelled_batches(dataset: Dataset, batch_size: int, n: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    from deploykit.data import plain_item

    for start in range(0, n, batch_size):
        items = [plain_item(dataset, k, augment=False) for k in range(start, min(start + batch_size, n))]
        yield torch.stack([x for x, _ in items]).numpy(), torch.stack([torch.as_tensor(y) for _, y in items])


def evaluate_accuracy(
    session: Session, dataset: Dataset, batch_size: int = 64, limit: int | None = None, task: Task | None = None
) -> float:
    """The pipeline's metric (`task`'s; top-1 without one) of `session` over the first `limit` (default: all)
    samples of a dataset split."""
    from deploykit.sources.task import TOP1_CLASSIFICATION

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:
        raise DeploykitError(
            "Cannot measure accuracy on an empty dataset: use a split with samples and a limit of at least 1."
        )
    metric = (task or TOP1_CLASSIFICATION).accumulator()
    for x, y in _labelled_batches(dataset, batch_size, n):
        metric.update(session.run(x), y)
    return metric.value()
