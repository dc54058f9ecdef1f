"""The `model:` section: a zoo architecture, the user's own factory, or an ONNX file made elsewhere.

Each source is a small class that can describe itself for the cache key (`key`), say whether it gives a PyTorch
model (`torch`), and, for the PyTorch ones, describe the model as an `arch` dict that `build_model` rebuilds in
any process: the zoo's {name, num_classes, in_channels, options} as before, or {factory, kwargs, sha256}.
Checkpoints store that dict beside a tensors-only state_dict, never a pickle.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.files import sha256_file
from deploykit.usercode import base_dir, describe_ref, load_ref, resolve_ref, source_sha256
from deploykit.zoo.config import ModelConfig


class ZooSource(ModelConfig):
    """`name:` a zoo architecture with its options (as every pipeline before model sources)."""

    kind: ClassVar[str] = "zoo"  # which key the file gave: name, factory or onnx

    @property
    def torch(self) -> bool:
        return True

    def key(self) -> dict[str, Any]:
        return self.model_dump(mode="json")  # unchanged, so the stage keys of existing pipelines stay the same

    def arch(self, num_classes: int | None, in_channels: int | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_classes": self.num_classes or num_classes,
            "in_channels": self.in_channels or in_channels,
            "options": dict(self.options),
        }

    def label(self) -> str:
        return self.name


class FactorySource(BaseModel):
    """`factory:` your own function (or class) that returns an nn.Module, called with `kwargs`."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "factory"  # which key the file gave: name, factory or onnx
    factory: str = Field(
        ...,
        description="'my_models.py:build' (a path relative to the pipeline file) or 'mypkg.models:build': "
        "a function or class returning an nn.Module. Importing it runs that file.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments the factory is called with.")

    @field_validator("factory")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        return resolve_ref(v, base_dir(info), "model.factory")

    @property
    def torch(self) -> bool:
        return True

    def key(self) -> dict[str, Any]:
        return {"factory": describe_ref(self.factory), "kwargs": self.kwargs, "sha256": source_sha256(self.factory)}

    def arch(self, num_classes: int | None, in_channels: int | None) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs), "sha256": source_sha256(self.factory)}

    def label(self) -> str:
        return describe_ref(self.factory)


class OnnxSource(BaseModel):
    """`onnx:` a model exported by another tool; only the stages that need no PyTorch model can follow."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "onnx"  # which key the file gave: name, factory or onnx
    onnx: Path = Field(
        ..., description="An .onnx file (relative to the pipeline file); external data beside it is read too."
    )
    input_layout: Literal["auto", "NCHW", "NHWC"] = Field(
        "auto", description="The input's layout; auto reads it from the graph (a last dim of 1 or 3 means NHWC)."
    )

    @field_validator("onnx")
    @classmethod
    def _exists(cls, v: Path, info: ValidationInfo) -> Path:
        path = (base_dir(info) / v).resolve() if not v.is_absolute() else v
        if not path.is_file():
            raise ValueError(f"the ONNX file {path} does not exist: give the path of a .onnx file")
        return path

    @property
    def torch(self) -> bool:
        return False

    def key(self) -> dict[str, Any]:
        return {"onnx": self.onnx.name, "sha256": sha256_file(self.onnx), "input_layout": self.input_layout}

    def arch(self, num_classes: int | None, in_channels: int | None) -> dict[str, Any]:
        raise DeploykitError(
            f"The model is the ONNX file {self.onnx.name}: a PyTorch model cannot be built from it; "
            "use model: factory (your own PyTorch code) for stages that train or prune."
        )

    def label(self) -> str:
        return self.onnx.name


def _source_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "onnx" if "onnx" in value else "factory" if "factory" in value else "zoo"
    return getattr(value, "kind", "zoo")


ModelSource = Annotated[
    Union[  # noqa: UP007
        Annotated[ZooSource, Tag("zoo")], Annotated[FactorySource, Tag("factory")], Annotated[OnnxSource, Tag("onnx")]
    ],
    Discriminator(_source_kind),
]
SOURCE_TAGS = ("zoo", "factory", "onnx")


# ---- building ---------------------------------------------------------------------------------------------------


def build_model(arch: dict[str, Any], seed: int | None = None) -> nn.Module:
    """The model an arch dict describes (zoo or factory), freshly initialised; with a seed, from that seed alone."""
    if "factory" not in arch:
        from deploykit.zoo import build_model as build_zoo_model

        return build_zoo_model(arch, seed)
    if seed is not None:
        torch.manual_seed(seed)
    what = f"model.factory {describe_ref(arch['factory'])!r}"
    made = load_ref(arch["factory"], "model.factory")
    # A module instance handed to deploykit.optimize is a template: every build is a fresh copy of it.
    factory = (lambda: copy.deepcopy(made)) if isinstance(made, nn.Module) else made
    try:
        model = factory(**arch.get("kwargs", {}))
    except Exception as exc:
        raise DeploykitError(f"{what} raised {type(exc).__name__} ({exc}): fix the factory or its kwargs.") from exc
    if not isinstance(model, nn.Module):
        raise DeploykitError(f"{what} returned a {type(model).__name__}, not a torch.nn.Module: return the model.")
    return model


def describe_arch(arch: dict[str, Any]) -> str:
    """An arch dict as a call, for scripts and reports: resnet18(num_classes=10, ...) or model.py:build(width=32)."""
    if "factory" in arch:
        args = arch.get("kwargs", {})
        return f"{describe_ref(arch['factory'])}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
    args = {"num_classes": arch["num_classes"], "in_channels": arch["in_channels"], **arch.get("options", {})}
    return f"{arch['name']}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def check_forward(model: nn.Module, x: torch.Tensor, label: str) -> torch.Tensor:
    """The model's eval-mode outputs on a batch of the dataset's inputs; a failure names both shapes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise DeploykitError(
            f"The model {label} fails on a batch of the dataset's inputs of shape {list(x.shape)} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}): make its forward "
            "accept that shape, or change the data section (image_size, channels)."
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise DeploykitError(
            f"The model {label} returns a {type(out).__name__} for a batch of inputs {list(x.shape)}: its forward must "
            "return one tensor (wrap it to return the main output)."
        )
    if out.shape[:1] != x.shape[:1]:
        raise DeploykitError(
            f"The model {label} maps inputs {list(x.shape)} to outputs {list(out.shape)}: the first dimension must "
            "stay the batch."
        )
    return out
