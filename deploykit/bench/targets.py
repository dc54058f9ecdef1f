"""Which artifacts of a run can be benchmarked: every model upstream stages published, labelled and sized."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deploykit.artifacts import ArtifactRef, StageRecord, model_kind
from deploykit.errors import DeploykitError


@dataclass(frozen=True, kw_only=True)
class Target(ArtifactRef):
    """One model file to benchmark, with the size and counts its stage published."""

    size_bytes: int
    params: int | None
    macs: int | None

    @property
    def model_path(self) -> Path:
        """What runtime.open_artifact takes: the model directory for torch, the file otherwise."""
        return self.path.parent if self.format == "torch" else self.path

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
            "runs_on": self.runs_on,
            "precision_hint": self.exec_precision,  # asked of the runtime; the row's execution_precision is its answer
        }


def discover(
    upstream: list[StageRecord],
    include: list[str] | None = None,
    onnx_runtimes: tuple[str, ...] = ("onnxruntime",),
    bf16: bool = False,
) -> list[Target]:
    """Every model artifact upstream, in pipeline order, with the stats its stage published; `include` limits the
    roles. ONNX files appear once per runtime in `onnx_runtimes` (OpenVINO runs them as they are). With `bf16`,
    whatever OpenVINO runs appears once more with its float layers in BF16 (the caller knows the CPU has it)."""
    targets: list[Target] = []
    for record in upstream:
        for role, entry in record.meta.get("artifacts", {}).items():
            kind = model_kind(role)
            if kind is None or (include is not None and role not in include):
                continue
            stats = record.stats(role)
            for runtime in onnx_runtimes if kind[0] == "onnx" else (None,):
                target = Target(
                    stage=record.name, role=role, path=record.directory / entry["path"], sha256=entry["sha256"],
                    runtime=runtime, size_bytes=stats.bytes or entry["bytes"], params=stats.params, macs=stats.macs,
                )  # fmt: skip
                targets.append(target)
                if bf16 and target.runs_on == "openvino" and kind[1] in ("fp32", "int8"):
                    targets.append(replace(target, exec_precision="bf16"))
    return targets


def _unavailable(require: Callable[[], Any]) -> str | None:
    try:
        require()
    except DeploykitError as exc:
        return str(exc)
    return None


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here (its library or an NVIDIA GPU is missing), or None when it can."""
    from deploykit.runtime import require_tensorrt

    return _unavailable(require_tensorrt)


def openvino_unavailable() -> str | None:
    """Why OpenVINO cannot run here (not installed), or None when it can."""
    from deploykit.runtime.ov_rt import require_openvino

    return _unavailable(require_openvino)


def unavailable_reason(target: Target) -> str | None:
    """Why `target` cannot run on this machine, or None."""
    if target.runs_on == "tensorrt":
        return tensorrt_unavailable()
    if target.format == "onnx" and target.precision == "fp16":
        # On a CPU its timing would be a conversion's, not FP16 arithmetic's: no truthful row to give.
        return (
            "FP16 ONNX is for GPU runtimes (TensorRT, ONNX Runtime's CUDA provider); this benchmark times CPU "
            "runtimes, where FP16 is converted, not computed"
        )
    return openvino_unavailable() if target.runs_on == "openvino" else None
