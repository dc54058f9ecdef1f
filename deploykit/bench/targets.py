"""Which artifacts of a run can be benchmarked: every model upstream stages published, labelled and sized."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError
from deploykit.pipeline.context import StageRecord

# Artifact role -> (format, precision). Other TensorRT engines are read as trt_<precision>.
ROLES: dict[str, tuple[str, str]] = {
    "checkpoint": ("torch", "fp32"),
    "onnx": ("onnx", "fp32"),
    "onnx_int8": ("onnx", "int8"),
    "trt_fp16": ("tensorrt", "fp16"),
    "trt_int8": ("tensorrt", "int8"),
}


@dataclass
class Target:
    """One model file to benchmark, as upstream published it."""

    stage: str
    role: str
    format: str  # torch, onnx or tensorrt
    precision: str
    path: Path  # what runtime.open_artifact takes: a model directory for torch, the file otherwise
    size_bytes: int
    params: int | None
    macs: int | None
    source: str | None = None  # key of the torch model this artifact was converted from (the newest one before it)

    @property
    def label(self) -> str:
        return f"{self.stage} ({self.format} {self.precision})"

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.role}"

    def describe(self) -> dict[str, Any]:
        return {
            "artifact": self.label,
            "key": self.key,
            "stage": self.stage,
            "role": self.role,
            "format": self.format,
            "precision": self.precision,
            "size_bytes": self.size_bytes,
            "params": self.params,
            "macs": self.macs,
            "source": self.source,
        }


def _kind(role: str) -> tuple[str, str] | None:
    if role in ROLES:
        return ROLES[role]
    precision = role.removeprefix("trt_")
    if role.startswith("trt_") and precision.isalnum():  # not trt_fp16_meta, trt_int8_calibration (side files)
        return "tensorrt", precision
    return None


def onnx_size_bytes(path: Path) -> int:
    """The .onnx file plus every external-data file its tensors point to (weights may live beside it)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def _counts(metrics: dict[str, Any]) -> tuple[int | None, int | None]:
    """Params and MACs a stage recorded for its model: train's `params`, prune's `params_after`, distill's student."""

    def first(name: str) -> int | None:
        keys = (name, f"{name}_after", f"student_{name}")
        return next((metrics[k] for k in keys if metrics.get(k) is not None), None)

    return first("params"), first("macs")


def discover(upstream: list[StageRecord], include: list[str] | None = None) -> list[Target]:
    """Every model artifact upstream, in pipeline order; `include` limits the roles."""
    targets: list[Target] = []
    last_torch: StageRecord | None = None  # the model a later export/quantize/TensorRT stage converted
    for record in upstream:
        for role, entry in record.meta.get("artifacts", {}).items():
            kind = _kind(role)
            if kind is None or (include is not None and role not in include):
                continue
            params, macs = _counts(record.meta.get("metrics", {}))
            if kind[0] == "torch":
                targets.append(Target(record.name, role, *kind, record.directory, entry["bytes"], params, macs))
                continue
            file = record.directory / entry["path"]
            size = onnx_size_bytes(file) if kind[0] == "onnx" else entry["bytes"]
            source = last_torch.name + "/checkpoint" if last_torch else None
            if params is None and last_torch is not None:  # conversion keeps the parameters and the MACs
                params, macs = _counts(last_torch.meta.get("metrics", {}))
            targets.append(Target(record.name, role, *kind, file, size, params, macs, source))
        if record.artifact("checkpoint") is not None:
            last_torch = record
    return targets


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here (its library or an NVIDIA GPU is missing), or None when it can."""
    from deploykit.runtime import require_tensorrt

    try:
        require_tensorrt()
    except DeploykitError as exc:
        return str(exc)
    return None


def unavailable_reason(target: Target) -> str | None:
    """Why `target` cannot run on this machine, or None."""
    return tensorrt_unavailable() if target.format == "tensorrt" else None
