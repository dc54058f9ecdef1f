"""What a pipeline file holds besides its stages: the run's name, data and model sections, and safe names.

The stage list is added by `deploykit.pipeline.loader`, which builds it from the stage registry.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ConfigDict, Field, field_validator, model_validator

from deploykit.data.config import DataConfig
from deploykit.sources.model import ModelSource, ZooSource
from deploykit.sources.task import TaskSettings
from deploykit.usercode import OBJECT_PREFIX

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_safe_name(value: str, what: str) -> str:
    """Names that become folder names: letters, digits, '.', '_' and '-', no path tricks."""
    if not SAFE_NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-' (it names a folder)")
    return value


class PipelineBase(TaskSettings):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="Run name; outputs go to <runs_dir>/<name>/.")
    description: str = Field("", description="Free text shown in the report.")
    runs_dir: Path = Field(Path("runs"), description="Where runs are written (relative to the working directory).")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSource = Field(
        default_factory=ZooSource,
        description="The model: {name: resnet18, options} from the zoo, {factory: my_models.py:build, kwargs} your "
        "own PyTorch code, or {onnx: model.onnx} a file exported elsewhere.",
    )

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        return check_safe_name(v, "run name")

    @field_validator("runs_dir")
    @classmethod
    def _inside(cls, v: Path) -> Path:
        # An absolute path is the user's explicit choice; a relative one must not climb out of the working directory.
        if not v.is_absolute() and not (Path.cwd() / v).resolve().is_relative_to(Path.cwd().resolve()):
            raise ValueError("it leads outside the working directory: use a folder inside it, or an absolute path")
        return v

    @model_validator(mode="after")
    def _check(self) -> PipelineBase:
        stages = getattr(self, "stages", [])
        names = [s.stage_name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage name {dupes[0]!r} is used twice; give one of them another `name:`")
        if self.data.dataset == "imagefolder":
            if self.data.root is None:
                raise ValueError("data.root is required for the imagefolder dataset")
            if not self.data.root.is_dir():
                raise ValueError(f"data.root {str(self.data.root)!r} is not a directory with one sub-folder per class")
        self.check_task()
        if self.task != "classification" and self.data.augment.mixup_alpha:
            raise ValueError(
                "data.augment.mixup_alpha mixes class labels: set it to 0 for a task that is not classification"
            )
        _check_model(self.model, self.data)
        return self

    def in_process_objects(self) -> bool:
        """True when a model, data, metric or loss was handed to deploykit.optimize as a Python object: other
        processes (isolated benchmark workers) cannot rebuild it."""
        refs = [
            getattr(self.model, "factory", ""),
            self.data.factory or "",
            self.metric.function if self.metric else "",
            self.loss or "",
        ]
        return any(ref.startswith(OBJECT_PREFIX) for ref in refs)

    def key(self) -> dict:
        """The pipeline's part of every stage key: data, model and (when not the default) the task."""
        return {"data": self.data.key(), "model": self.model.key(), **self.task_key()}


def _check_model(model: ModelSource, data: DataConfig) -> None:
    """Fail now, not hours in: a zoo model is built on the meta device (microseconds), a factory imported (not
    called: that needs the data's shapes, checked when a stage first builds the model), an ONNX file inspected."""
    if model.kind == "zoo":
        import torch

        from deploykit.zoo import get_model

        with torch.device("meta"):
            classes, channels = model.num_classes or data.num_classes, model.in_channels or data.channels
            get_model(model.name, classes, channels, **model.options)
    elif model.kind == "factory":
        from deploykit.usercode import load_callable

        load_callable(model.factory, "model.factory")
    elif model.kind == "onnx":
        from deploykit.export.onnx_import import inspect_onnx

        inspect_onnx(model.onnx, model.input_layout)
