"""Which artifacts of a run can be benchmarked: every model upstream stages published, labelled and sized."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.artifacts import StageRecord, model_kind
from deploykit.errors import DeploykitError


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
    sha256: str

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
            "sha256": self.sha256,
        }


def discover(upstream: list[StageRecord], include: list[str] | None = None) -> list[Target]:
    """Every model artifact upstream, in pipeline order, with the stats its stage published; `include` limits the roles."""
    targets: list[Target] = []
    for record in upstream:
        for role, entry in record.meta.get("artifacts", {}).items():
            kind = model_kind(role)
            if kind is None or (include is not None and role not in include):
                continue
            stats = record.stats(role)
            path = record.directory if kind[0] == "torch" else record.directory / entry["path"]
            size = stats.bytes or entry["bytes"]
            targets.append(Target(record.name, role, *kind, path, size, stats.params, stats.macs, entry["sha256"]))
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
