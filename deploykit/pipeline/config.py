"""What a pipeline file holds besides its stages: the run's name, data and model sections, and safe names.

The stage list is added by `deploykit.pipeline.loader`, which builds it from the stage registry.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deploykit.data.config import DataConfig
from deploykit.zoo.config import ModelConfig

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_safe_name(value: str, what: str) -> str:
    """Names that become folder names: letters, digits, '.', '_' and '-', no path tricks."""
    if not SAFE_NAME.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-' (it names a folder)")
    return value


class PipelineBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="Run name; outputs go to <runs_dir>/<name>/.")
    description: str = Field("", description="Free text shown in the report.")
    runs_dir: Path = Field(Path("runs"), description="Where runs are written (relative to the working directory).")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)

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
        _check_model(self.model, self.data)
        return self


def _check_model(model: ModelConfig, data: DataConfig) -> None:
    """Build the model on the meta device: a bad name or option fails now, in microseconds."""
    import torch

    from deploykit.zoo import get_model

    with torch.device("meta"):
        get_model(model.name, model.num_classes or data.num_classes, model.in_channels or data.channels, **model.options)
