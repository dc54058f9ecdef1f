"""Pipeline-file settings for the dataset (the `data:` section)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from deploykit.errors import DeploykitError
from deploykit.files import sha256_file
from deploykit.usercode import base_dir, describe_ref, resolve_ref, source_sha256

BUILTIN_DATASETS = ("digits", "shapes", "imagefolder", "synthetic")
# Fields added after pipelines were first cached: model_dump (and so key()) leaves them out while at their
# defaults, so the stage keys and run.json of every existing pipeline stay what they were.
_LATER_FIELDS: dict[str, Any] = {"layout": "NCHW", "factory": None, "kwargs": {}}


class AugmentConfig(BaseModel):
    """Training-time augmentation; validation data is never augmented."""

    model_config = ConfigDict(extra="forbid")
    random_crop: bool = Field(
        False, description="Random crop after padding by `crop_padding` pixels of the mean colour (0 once normalised)."
    )
    crop_padding: int = Field(4, ge=0, description="Padding in pixels for the random crop.")
    hflip: bool = Field(False, description="Random horizontal flip with probability 0.5.")
    cutout_size: int = Field(0, ge=0, description="Side of the square CutOut mask in pixels; 0 disables CutOut.")
    mixup_alpha: float = Field(0.0, ge=0.0, description="Beta(alpha, alpha) for MixUp on whole batches; 0 disables it.")

    def spatial(self) -> list[str]:
        """The per-image augmentations that are on (they need [C, H, W] images whose targets do not move)."""
        on = {"random_crop": self.random_crop, "hflip": self.hflip, "cutout_size": self.cutout_size > 0}
        return [name for name, enabled in on.items() if enabled]


class NormalizeStats(BaseModel):
    """Per-channel statistics given in the pipeline file instead of measured on the training split."""

    model_config = ConfigDict(extra="forbid")
    mean: list[float] = Field(..., min_length=1, description="One mean per input channel (dim 0 of a sample).")
    std: list[float] = Field(..., min_length=1, description="One standard deviation per input channel, each > 0.")

    @model_validator(mode="after")
    def _check(self) -> NormalizeStats:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"normalize gives {len(self.mean)} means but {len(self.std)} stds; give one of each per channel"
            )
        if not all(math.isfinite(v) for v in self.mean + self.std) or min(self.std) <= 0:
            raise ValueError("normalize needs finite means and stds greater than 0")
        return self


class DataConfig(BaseModel):
    """Which dataset, at what size, split how."""

    model_config = ConfigDict(extra="forbid")
    dataset: Literal["digits", "shapes", "imagefolder", "synthetic", "arrays", "python"] = Field(
        "digits",
        description="digits (scikit-learn, offline), shapes (procedural), imagefolder (your folders), synthetic "
        "(random, latency only), arrays (your .npz file), python (your function returning train and val datasets).",
    )
    root: Path | None = Field(
        None,
        description="imagefolder: a directory with one sub-folder of PNG/JPEG images per class. arrays: an .npz file "
        "(relative to the pipeline file) with x_train, y_train, x_val, y_val or x, y (and optionally class_names).",
    )
    layout: Literal["NCHW", "NHWC"] = Field(
        "NCHW", description="arrays only: the layout of 4-D x; NHWC is transposed to channels first."
    )
    factory: str | None = Field(
        None,
        description="python only: 'my_data.py:build' (relative to the pipeline file) or 'mypkg.data:build', a function "
        "returning (train, val): two Datasets of (input, target) pairs. Importing it runs that file.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="python only: keyword arguments for the factory.")
    image_size: int = Field(
        32, ge=8, le=1024,
        description="Images are resized to image_size x image_size (built-in datasets; arrays and python keep "
        "the data's own shape).",
    )
    channels: Literal[1, 3] = Field(
        3,
        description="Input channels fed to the model, grey images repeated to 3 (built-in datasets; arrays and python "
        "take the channels from the data).",
    )
    num_classes: int = Field(10, ge=2, description="shapes and synthetic only: number of classes.")
    num_samples: int = Field(2000, ge=10, description="shapes and synthetic only: total number of samples generated.")
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="Fraction of samples held out for validation (seeded split; unused where the data brings a "
        "val split).",
    )
    seed: int = Field(0, description="Seed for generation and the train/val split.")
    normalize: bool | NormalizeStats = Field(
        True,
        description="true: the training split's per-channel mean/std; false: none (uint8 is still scaled to [0, 1]); "
        "{mean: [...], std: [...]}: these values, one per channel (dim 0 of a sample).",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("root")
    @classmethod
    def _resolve_root(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        # Only the arrays file is resolved: imagefolder roots stay as written, and so do their cache keys.
        if v is None or info.data.get("dataset") != "arrays":
            return v
        path = v.expanduser()
        path = (base_dir(info) / path).resolve() if not path.is_absolute() else path
        if not path.is_file():
            raise ValueError(f"the arrays file {path} does not exist: give the path of an .npz file (relative paths "
                             "start at the pipeline file's folder)")
        return path

    @field_validator("factory")
    @classmethod
    def _resolve_factory(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else resolve_ref(v, base_dir(info), "data.factory")

    @model_validator(mode="after")
    def _fields_fit_the_dataset(self) -> DataConfig:
        if self.dataset == "arrays" and self.root is None:
            raise ValueError("data.root is required for the arrays dataset: give the path of an .npz file")
        if self.dataset == "python" and self.factory is None:
            raise ValueError("data.factory is required for the python dataset: give 'my_data.py:function'")
        if self.factory is not None and self.dataset != "python":
            raise ValueError("data.factory applies to the python dataset only: set dataset: python or remove factory")
        if self.kwargs and self.dataset != "python":
            raise ValueError("data.kwargs applies to the python dataset only: set dataset: python or remove kwargs")
        if self.layout != "NCHW" and self.dataset != "arrays":
            raise ValueError("data.layout applies to the arrays dataset only: remove it")
        if self.dataset == "python" and self.augment.spatial():
            raise ValueError(
                f"data.augment {', '.join(self.augment.spatial())} cannot apply to the python dataset, whose items "
                "deploykit does not know the layout of: augment inside your Dataset and turn these off"
            )
        return self

    @model_serializer(mode="wrap")
    def _drop_later_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name, default in _LATER_FIELDS.items():
            if name in data and data[name] == default:
                del data[name]
        return data

    def key(self) -> dict[str, Any]:
        """What the cache keys hash: for built-in datasets exactly the model_dump of before arrays/python existed;
        for arrays and python the file's name and sha256 rather than its absolute path, so edits re-run stages.

        model_dump keeps the absolute paths (a worker process rebuilds the config from it); key() is for hashing.
        """
        data = self.model_dump(mode="json")
        if self.dataset == "arrays" and self.root is not None:
            data["root"] = self.root.name
            data["sha256"] = _file_sha256(self.root)
        if self.dataset == "python" and self.factory is not None:
            data["factory"] = describe_ref(self.factory)
            data["sha256"] = source_sha256(self.factory)
        return data


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: every stage key asks again


def _file_sha256(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        raise DeploykitError(
            f"The arrays file {path} is gone: restore it or set data.root to another .npz file."
        ) from None
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = sha256_file(path)
    return _HASHES[memo]
