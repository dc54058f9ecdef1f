"""Converters, named source-to-destination (torch2onnx, onnx2trt), and the parity checks that validate them."""

from __future__ import annotations

import shutil
from pathlib import Path

from deploykit.export.onnx2trt import build_engine
from deploykit.export.parity import check_parity, real_batches
from deploykit.export.torch2onnx import export_onnx, write_reproduce_script
from deploykit.pipeline.artifacts import atomic_path

__all__ = ["build_engine", "check_parity", "copy_source", "export_onnx", "real_batches", "write_reproduce_script"]


def copy_source(src: Path, dst: Path) -> Path:
    """Copy an upstream file beside an exported artifact (atomically), so its reproduce script is self-contained."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)
