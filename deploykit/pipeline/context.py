"""What a running stage sees: its settings' pipeline, its folders, earlier stages' outputs, progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.artifacts import ArtifactRef, ModelStats, StageRecord, require
from deploykit.progress import Reporter

if TYPE_CHECKING:
    from torch import nn

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
        """The pipeline's dataset with its task (metric and loss), built once per run."""
        if "bundle" not in self._data:
            from deploykit.data import build_datasets
            from deploykit.sources.task import build_task

            bundle = build_datasets(self.pipeline.data)
            bundle.task = build_task(self.pipeline)
            self._data["bundle"] = bundle
        return self._data["bundle"]

    def arch(self) -> dict[str, Any]:
        """The pipeline's model as a rebuildable description (zoo: with the dataset's classes and channels)."""
        bundle = self.data()
        return self.pipeline.model.arch(bundle.num_classes, bundle.in_channels)

    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape, channels first. deploykit's own image datasets say it without being built (a latency
        pipeline on 224 px synthetic data never generates a sample it does not need); a user's data must be read."""
        from deploykit.data.config import BUILTIN_DATASETS

        data = self.pipeline.data
        if data.dataset in BUILTIN_DATASETS:
            channels = getattr(self.pipeline.model, "in_channels", None) or data.channels
            return (channels, data.image_size, data.image_size)
        return tuple(self.data().input_shape)

    def new_model(self, seed: int | None) -> nn.Module:
        """A freshly initialised model of the pipeline's source. The first one in a run must map a batch of the
        dataset's inputs to a batch of outputs, so a user model that does not fit the data fails here, not mid-epoch."""
        from deploykit.data import sample_batch
        from deploykit.sources.model import build_model, check_forward

        model = build_model(self.arch(), seed)
        if not self._data.get("model_checked"):
            check_forward(model, sample_batch(self.data(), 2, "train")[0], self.pipeline.model.label())
            self._data["model_checked"] = True
        return model
