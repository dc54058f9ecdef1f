"""Pipeline-file settings for the model (the `model:` section)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """A zoo architecture and its options; num_classes/in_channels default to the dataset's."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("resnet18", description="A name from `deploykit models`.")
    num_classes: int | None = Field(None, ge=1, description="Defaults to the dataset's number of classes.")
    in_channels: int | None = Field(None, ge=1, description="Defaults to the dataset's channels.")
    options: dict[str, Any] = Field(default_factory=dict, description="Architecture options: stem, width_mult, depth_mult, dropout, phi.")
