"""What a running stage sees: its settings' pipeline, its folders, earlier stages' outputs, progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import DeploykitError
from deploykit.pipeline.progress import Reporter

if TYPE_CHECKING:
    from deploykit.config import PipelineBase
    from deploykit.data import DataBundle


@dataclass
class StageRecord:
    """A finished stage as later stages see it: its folder and its meta.json content."""

    name: str
    type: str
    directory: Path
    meta: dict[str, Any]

    def artifact(self, role: str) -> Path | None:
        entry = self.meta.get("artifacts", {}).get(role)
        return self.directory / entry["path"] if entry else None


@dataclass
class StageContext:
    pipeline: PipelineBase
    name: str
    out_dir: Path  # write artifacts here; it becomes runs/<run>/<name>/ only when run() returns
    work_dir: Path  # survives a crash: in-stage checkpoints for resuming
    upstream: list[StageRecord]
    reporter: Reporter
    _data: dict[str, Any] = field(default_factory=dict)  # shared across the stages of one run

    def find(self, role: str, required_by: str = "") -> tuple[StageRecord, Path]:
        """The newest earlier artifact of a role (e.g. 'checkpoint', 'onnx')."""
        for record in reversed(self.upstream):
            path = record.artifact(role)
            if path is not None:
                return record, path
        raise DeploykitError(
            f"Stage '{self.name}' needs a '{role}' artifact from an earlier stage{required_by}: add such a stage before it."
        )

    def data(self) -> DataBundle:
        """The pipeline's dataset, built once per run."""
        if "bundle" not in self._data:
            from deploykit.data import build_datasets

            self._data["bundle"] = build_datasets(self.pipeline.data)
        return self._data["bundle"]

    def arch(self) -> dict[str, Any]:
        """The pipeline's model as a rebuildable description, with dataset defaults filled in."""
        m = self.pipeline.model
        return {
            "name": m.name,
            "num_classes": m.num_classes or self.data().num_classes,
            "in_channels": m.in_channels or self.data().in_channels,
            "options": dict(m.options),
        }
