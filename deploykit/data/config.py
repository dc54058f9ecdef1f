"""Pipeline-file settings for the dataset (the `data:` section)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """Training-time augmentation; validation data is never augmented."""

    model_config = ConfigDict(extra="forbid")
    random_crop: bool = Field(False, description="Random crop after zero-padding by `crop_padding` pixels.")
    crop_padding: int = Field(4, ge=0, description="Padding in pixels for the random crop.")
    hflip: bool = Field(False, description="Random horizontal flip with probability 0.5.")
    cutout_size: int = Field(0, ge=0, description="Side of the square CutOut mask in pixels; 0 disables CutOut.")
    mixup_alpha: float = Field(0.0, ge=0.0, description="Beta(alpha, alpha) for MixUp on whole batches; 0 disables it.")


class DataConfig(BaseModel):
    """Which dataset, at what size, split how."""

    model_config = ConfigDict(extra="forbid")
    dataset: Literal["digits", "shapes", "imagefolder", "synthetic"] = Field(
        "digits", description="digits (scikit-learn, offline), shapes (procedural), imagefolder (your folders), synthetic (random, latency only)."
    )
    root: Path | None = Field(None, description="imagefolder only: a directory with one sub-folder of PNG/JPEG images per class.")
    image_size: int = Field(32, ge=8, le=1024, description="Images are resized to image_size x image_size.")
    channels: Literal[1, 3] = Field(3, description="Input channels fed to the model (grey images are repeated to 3).")
    num_classes: int = Field(10, ge=2, description="shapes and synthetic only: number of classes.")
    num_samples: int = Field(2000, ge=10, description="shapes and synthetic only: total number of samples generated.")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction of samples held out for validation (seeded split).")
    seed: int = Field(0, description="Seed for generation and the train/val split.")
    normalize: bool = Field(True, description="Normalise with the per-channel mean/std of the training split.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
