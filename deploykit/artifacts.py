"""The artifact contract between stages: roles, what a stage produced, and which model is the deployable one.

Every stage publishes its files under roles (`Role`), the standard stats of each model it made
(`ModelStats`), and, when it judged models against each other, its pick (`Pick`). Consumers never read
another stage's metric names: they call `latest()` for the newest file of a role and `deployable()` for
the model to serve, report and judge, so the deploy stage, the benchmark table, the report and the SLO
verdict always name the same file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from deploykit.errors import DeploykitError


class Role(str, Enum):
    """Names under which stages publish files; plugins may publish other names too."""

    CHECKPOINT = "checkpoint"  # a PyTorch model folder (model.pt + model.json)
    ARCH = "arch"
    HISTORY = "history"
    ONNX = "onnx"  # FP32 ONNX
    ONNX_INT8 = "onnx_int8"  # QDQ ONNX
    ONNX_FP16 = "onnx_fp16"  # FP16 weights and arithmetic, FP32 inputs and outputs (for GPU runtimes)
    OPENVINO = "openvino"  # FP32 OpenVINO IR (.xml; its .bin is published as openvino_weights)
    OPENVINO_INT8 = "openvino_int8"
    TRT_FP16 = "trt_fp16"
    TRT_INT8 = "trt_int8"
    BENCHMARK = "benchmark"

    __str__ = str.__str__  # f"{Role.ONNX}" is "onnx", as in meta.json


# Roles that hold a model: (format, precision). Other TensorRT engines are read as trt_<precision>.
MODEL_ROLES: dict[str, tuple[str, str]] = {
    Role.CHECKPOINT: ("torch", "fp32"),
    Role.ONNX: ("onnx", "fp32"),
    Role.ONNX_INT8: ("onnx", "int8"),
    Role.ONNX_FP16: ("onnx", "fp16"),
    Role.OPENVINO: ("openvino", "fp32"),
    Role.OPENVINO_INT8: ("openvino", "int8"),
    Role.TRT_FP16: ("tensorrt", "fp16"),
    Role.TRT_INT8: ("tensorrt", "int8"),
}


# The runtime a model format runs on unless a pick names another (OpenVINO also runs ONNX files).
DEFAULT_RUNTIME = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


def model_kind(role: str) -> tuple[str, str] | None:
    """(format, precision) of a role that holds a model, else None."""
    if role in MODEL_ROLES:
        return MODEL_ROLES[role]
    precision = role.removeprefix("trt_")
    if role.startswith("trt_") and precision.isalnum():  # not trt_fp16_meta, trt_int8_calibration (side files)
        return "tensorrt", precision
    return None


@dataclass
class ModelStats:
    """What every stage publishes about each model it writes; None where the stage could not know."""

    params: int | None = None
    macs: int | None = None  # multiply-accumulates of one sample
    bytes: int | None = None  # on disk, external data included
    accuracy: float | None = None  # top-1 on the validation split


@dataclass
class Pick:
    """A stage's judgement of which earlier (or its own) model to deploy, on which runtime, and why."""

    stage: str
    role: str
    reason: str
    runtime: str | None = None  # None: the format's default runtime
    precision: str | None = None  # the precision to run in when not the file's (bf16 for an FP32 file on OpenVINO)


@dataclass
class StageResult:
    """What a stage produced: artifact roles mapped to file names inside its output folder, and metrics."""

    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    models: dict[str, ModelStats] = field(default_factory=dict)  # role -> stats, for every model role written
    deployable: Pick | None = None

    def meta_fields(self) -> dict[str, Any]:
        """The contract's part of meta.json."""
        return {
            "models": {str(role): asdict(stats) for role, stats in self.models.items()},
            "deployable": asdict(self.deployable) if self.deployable else None,
        }


@dataclass
class StageRecord:
    """A finished stage as later stages see it: its folder and its meta.json content."""

    name: str
    type: str
    directory: Path
    meta: dict[str, Any]

    def artifact(self, role: str) -> Path | None:
        entry = self.meta.get("artifacts", {}).get(str(role))
        return self.directory / entry["path"] if entry else None

    def sha256(self, role: str) -> str | None:
        entry = self.meta.get("artifacts", {}).get(str(role))
        return entry.get("sha256") if entry else None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics", {})

    def stats(self, role: str) -> ModelStats:
        return ModelStats(**(self.meta.get("models") or {}).get(str(role), {}))


@dataclass(frozen=True)
class ArtifactRef:
    """One file of the run (a model, usually), named by the stage and role that published it."""

    stage: str
    role: str
    path: Path
    sha256: str
    why: str = ""
    runtime: str | None = None  # None: the format's default runtime
    exec_precision: str | None = None  # asked of the runtime when not the file's: bf16 for an FP32 file on OpenVINO

    @property
    def format(self) -> str:
        return (model_kind(self.role) or ("unknown", "unknown"))[0]

    @property
    def precision(self) -> str:
        return (model_kind(self.role) or ("unknown", "unknown"))[1]

    @property
    def runs_on(self) -> str:
        return self.runtime or DEFAULT_RUNTIME.get(self.format, "unknown")

    @property
    def _other_runtime(self) -> bool:
        return self.runs_on != DEFAULT_RUNTIME.get(self.format)

    @property
    def key(self) -> str:
        runtime = f"@{self.runs_on}" if self._other_runtime else ""
        return f"{self.stage}/{self.role}{runtime}" + (f":{self.exec_precision}" if self.exec_precision else "")

    @property
    def label(self) -> str:
        runtime = f" on {self.runs_on}" if self._other_runtime else ""
        return f"{self.stage} ({self.format} {self.precision}){runtime}" + (
            f" in {self.exec_precision}" if self.exec_precision else ""
        )


def _ref(record: StageRecord, role: str, why: str) -> ArtifactRef:
    return ArtifactRef(record.name, str(role), record.artifact(role), record.sha256(role), why)  # type: ignore[arg-type]


def latest(upstream: list[StageRecord], role: str) -> ArtifactRef | None:
    """The newest published file of `role`, or None."""
    for record in reversed(upstream):
        if record.artifact(role) is not None:
            return _ref(record, role, f"the newest '{role}' artifact")
    return None


def require(upstream: list[StageRecord], role: str, stage: str, why: str = "") -> ArtifactRef:
    """The newest file of `role`; a pipeline without one fails with a sentence naming what to add."""
    found = latest(upstream, role)
    if found is None:
        raise DeploykitError(
            f"Stage '{stage}' needs a '{role}' artifact from an earlier stage{why}: add such a stage before it."
        )
    return found


def deployable(upstream: list[StageRecord]) -> ArtifactRef | None:
    """The one model the run deploys, reports and judges.

    The newest stage that picked one decides (quantize's accuracy and latency guard). Without a pick, the
    newest ONNX model (what a server runs), else the newest PyTorch checkpoint.
    """
    by_name = {r.name: r for r in upstream}
    for record in reversed(upstream):
        pick = record.meta.get("deployable")
        if pick:
            chosen = by_name.get(pick["stage"])
            if chosen is None or chosen.artifact(pick["role"]) is None:
                raise DeploykitError(
                    f"Stage '{record.name}' picked {pick['stage']}/{pick['role']} to deploy, but that artifact is "
                    f"not in this run: re-run the pipeline with --force {record.name}."
                )
            why = f"picked by the {record.name} stage: {pick['reason']}"
            return replace(
                _ref(chosen, pick["role"], why), runtime=pick.get("runtime"), exec_precision=pick.get("precision")
            )
    newest_onnx = next(  # in a stage that wrote both, INT8
        (
            _ref(r, role, "the newest ONNX model (no stage picked one)")
            for r in reversed(upstream)
            for role in (Role.ONNX_INT8, Role.ONNX)
            if r.artifact(role) is not None
        ),
        None,
    )
    if newest_onnx is not None:
        return newest_onnx
    found = latest(upstream, Role.CHECKPOINT)
    return replace(found, why="the newest PyTorch model") if found else None
