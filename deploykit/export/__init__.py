"""Converters, named source-to-destination (torch2onnx, onnx2trt), and the parity checks that validate them."""

from __future__ import annotations

from deploykit.export.onnx2trt import build_engine
from deploykit.export.parity import check_parity, real_batches
from deploykit.export.torch2onnx import export_onnx, write_reproduce_script

__all__ = ["build_engine", "check_parity", "export_onnx", "real_batches", "write_reproduce_script"]

