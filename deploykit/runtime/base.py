"""The Session interface every runtime implements, and the TensorRT availability guard."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeploykitError

TENSORRT_MISSING = (
    "TensorRT is not installed: install the `gpu` extra (pip install 'deploykit[gpu]') "
    "on a machine with an NVIDIA GPU and CUDA."
)
NO_GPU = (
    "TensorRT needs an NVIDIA GPU and none is visible (torch.cuda.is_available() is False): "
    "run this stage on a GPU machine."
)


class Session(ABC):
    """A loaded model that maps float32 images [N, C, H, W] to float32 logits [N, K]."""

    name: str  # e.g. "torch-fp32", "ort-int8", "trt-fp16"
    precision: str  # the file's: "fp32" | "int8" | "fp16"
    path: Path | None

    @property
    def execution_precision(self) -> str:
        """The precision the runtime computes in, as it reports it after compiling: the file's unless the runtime
        says otherwise (OpenVINO may run an FP32 file in BF16)."""
        return self.precision

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for one batch."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.path or ''}>"


def as_input(x: np.ndarray) -> np.ndarray:
    """The batch as the contiguous float32 array every runtime expects."""
    return np.ascontiguousarray(x, dtype=np.float32)


def require_tensorrt() -> Any:
    """The `tensorrt` module, or a DeploykitError saying what is missing (the package or a GPU)."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the package is there but its CUDA libraries are not
        raise DeploykitError(TENSORRT_MISSING) from None
    import torch

    if not torch.cuda.is_available():
        raise DeploykitError(NO_GPU)
    return tensorrt
