"""The reference model zoo: torchvision-compatible classifiers built by name, with MAC and parameter counts."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deploykit.errors import DeploykitError
from deploykit.zoo import efficientnet, inception, mobilenet, resnet
from deploykit.zoo.common import ModelSpec, ZooModel
from deploykit.zoo.efficientnet import compound_scaling

__all__ = [
    "ZooModel",
    "build_model",
    "compound_scaling",
    "count_macs",
    "count_params",
    "default_resolution",
    "get_model",
    "list_models",
    "model_table",
]

_MODELS: dict[str, ModelSpec] = {**resnet.MODELS, **inception.MODELS, **efficientnet.MODELS, **mobilenet.MODELS}
_ALIASES: dict[str, str] = {**inception.ALIASES}


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but `width_mult: true` in a pipeline file is a mistake, not 1.0.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Option -> (is the value valid, what a valid value looks like).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stem": (lambda v: v in ("imagenet", "cifar"), "'imagenet' or 'cifar'"),
    "width_mult": (lambda v: _is_number(v) and v > 0, "a number greater than 0"),
    "depth_mult": (lambda v: _is_number(v) and v > 0, "a number greater than 0"),
    "dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "stochastic_depth": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "phi": (_is_number, "a finite number"),
    "zero_init_residual": (lambda v: isinstance(v, bool), "true or false"),
}


def list_models() -> list[str]:
    """Every model name `get_model` accepts (aliases aside), in zoo order."""
    return list(_MODELS)


def _spec(name: str) -> tuple[str, ModelSpec]:
    canonical = _ALIASES.get(name, name)
    if canonical in _MODELS:
        return canonical, _MODELS[canonical]
    close = difflib.get_close_matches(name, [*_MODELS, *_ALIASES], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DeploykitError(
        f"Unknown model '{name}'{hint}: choose one of {', '.join(_MODELS)} (see `deploykit models`)."
    )


def model_family(name: str) -> str:
    """The family of a zoo model (resnet, inception, efficientnet, mobilenet)."""
    return _spec(name)[1].family


def _check_options(name: str, spec: ModelSpec, options: dict[str, Any]) -> None:
    for option, value in options.items():
        if option not in spec.options:
            close = difflib.get_close_matches(option, spec.options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DeploykitError(
                f"Unknown option '{option}' for {name}{hint}: {spec.family} models accept {', '.join(spec.options)}."
            )
        valid, expected = _CHECKS[option]
        if not valid(value):
            raise DeploykitError(f"Option {option}={value!r} for {name} is invalid: use {expected}.")


def get_model(name: str, num_classes: int = 1000, in_channels: int = 3, **options: Any) -> ZooModel:
    """Build a freshly initialised zoo model; options are validated against the model's family."""
    canonical, spec = _spec(name)
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DeploykitError(f"{label}={value!r} for {canonical} is invalid: use a whole number of at least 1.")
    _check_options(canonical, spec, options)
    return spec.build(num_classes=num_classes, in_channels=in_channels, **options)


def build_model(arch: dict[str, Any], seed: int | None = None) -> ZooModel:
    """The model an arch description (name, num_classes, in_channels, options) names.

    With a seed, the initialisation is a function of it alone: a stage that builds its model before seeding
    the global generator trains a different network in every process, so no run could be reproduced.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return get_model(arch["name"], arch["num_classes"], arch["in_channels"], **arch.get("options", {}))


def default_resolution(name: str) -> int:
    """The input side the model was published (and pretrained) at."""
    return _spec(name)[1].resolution


def count_params(model: nn.Module) -> int:
    """Number of parameters, shared ones counted once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward at `input_shape` (batch included).

    Counts what FlopCounterMode counts (convs and matmuls, FLOPs/2); elementwise ops, norms and pools are free.
    Works on the meta device, where it costs no compute.
    """
    modes = {module: module.training for module in model.modules()}
    reference = next(model.parameters(), torch.zeros(()))  # the input follows the model's device and dtype
    x = torch.zeros(input_shape, dtype=reference.dtype, device=reference.device)
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        for module, training in modes.items():
            module.training = training
    return counter.get_total_flops() // 2


def model_table(image_size: int = 224, num_classes: int = 1000, in_channels: int = 3) -> list[dict[str, Any]]:
    """One row per model: name, family, params, macs (batch 1 at image_size), default_resolution."""
    rows = []
    for name, spec in _MODELS.items():
        # Shapes are all the counts need, so build on the meta device: no memory, no compute.
        with torch.device("meta"):
            model = get_model(name, num_classes=num_classes, in_channels=in_channels)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "params": count_params(model),
                "macs": count_macs(model, (1, in_channels, image_size, image_size)),
                "default_resolution": spec.resolution,
            }
        )
    return rows
