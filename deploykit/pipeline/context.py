"""What a running stage sees: its settings' pipeline, its folders, earlier stages' outputs, progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.artifacts import ArtifactRef, ModelStats, StageRecord, require
from deploykit.progress import Reporter

if TYPE_CHECKING:
    from deploykit.data import DataBundle
    from deploykit.pipeline.config import PipelineBase


@dataclass
class StageContext:
    pipeline: PipelineBase
    name: str
    out_dir: Path  # write artifacts here; it becomes runs/<run>/<name>/ only when run() returns
    work_dir: Path  # survives a crash: in-stage checkpoints for resuming
    upstream: list[StageRecord]
    reporter: Reporter
    _data: dict[str, Any] = field(default_factory=dict)  # shared across the stages of one run

    def find(self, role: str, required_by: str = "") -> ArtifactRef:
        """The newest earlier artifact of a role (e.g. 'checkpoint', 'onnx'); fails with what to add if none."""
        return require(self.upstream, role, self.name, required_by)

    def stats(self, ref: ArtifactRef) -> ModelStats:
        """The standard stats the stage that wrote `ref` published for it."""
        return next(r for r in self.upstream if r.name == ref.stage).stats(ref.role)

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
