"""Training: fit() and the model files it produces.

The names below load on first use, so reading `deploykit.train.config` (as pipeline validation does) does
not pull in torch and the data and zoo packages.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deploykit.train.checkpoint import load_model, save_model
    from deploykit.train.loop import FitResult, fit

__all__ = ["FitResult", "fit", "load_model", "save_model"]

_HOMES = {"fit": "loop", "FitResult": "loop", "save_model": "checkpoint", "load_model": "checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"deploykit.train.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'deploykit.train' has no attribute {name!r}")
