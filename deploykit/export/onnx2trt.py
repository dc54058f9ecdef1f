"""ONNX -> TensorRT: a serialized engine for one precision and batch range, with its metadata beside it.

Written against TensorRT's documented Python API (Builder, OnnxParser, BuilderConfig, optimisation
profiles, timing cache, IInt8EntropyCalibrator2). INT8 comes either from a QDQ ONNX (explicit
quantization: the scales are in the graph) or from an FP32 ONNX calibrated on real samples.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_bytes, atomic_write_json, sha256_file
from deploykit.runtime import engine_metadata_path, onnx_precision, require_tensorrt

PRECISIONS = ("fp32", "fp16", "int8")


def calibration_cache_path(plan: Path) -> Path:
    """Where the INT8 calibration cache of an engine lives: model.int8.plan -> model.int8.calib."""
    return Path(plan).with_suffix(".calib")


def _entropy_calibrator(trt: Any, samples: np.ndarray | None, batch: int, cache: Path) -> Any:
    """An IInt8EntropyCalibrator2 feeding `samples` in batches of `batch` (the profile's opt batch).

    With `samples` None it only replays `cache`; TensorRT then skips calibration altogether.
    """
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()  # TensorRT requires the base initialiser to be called explicitly
            self.batches: list[np.ndarray] = []
            if samples is not None:
                n = max(1, len(samples) // batch) * batch  # whole batches; a short set is repeated to one batch
                pool = np.ascontiguousarray(samples[np.arange(n) % len(samples)], dtype=np.float32)
                self.batches = list(pool.reshape(n // batch, batch, *samples.shape[1:]))
                self.device = torch.empty(self.batches[0].shape, dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if not self.batches:
                return None  # no more data: calibration ends
            self.device.copy_(torch.from_numpy(self.batches.pop(0)))
            torch.cuda.synchronize()
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            atomic_write_bytes(cache, bytes(data))

    return Calibrator()


def _network_flags(trt: Any) -> int:
    # TensorRT 10 networks are always explicit-batch and the flag is deprecated; 8.x needs it set.
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    input_shape: tuple[int, int, int],
    calibration: np.ndarray | None = None,
    workspace_mb: int = 2048,
    timing_cache: Path | None = None,
    calibration_cache: Path | None = None,
) -> dict[str, Any]:
    """Build and write a TensorRT engine from `onnx_path`; returns the metadata also written beside it.

    timing_cache defaults to timing.cache beside the engine (reused and updated across builds);
    calibration_cache (INT8 from an FP32 ONNX) defaults to <engine>.calib and, when present, replaces
    calibration samples.
    """
    trt = require_tensorrt()  # first: without TensorRT and a GPU nothing below can work
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if precision not in PRECISIONS:
        raise DeploykitError(f"Unknown TensorRT precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise DeploykitError(
            f"The batch profile min={min_batch}, opt={opt_batch}, max={max_batch} is invalid: "
            "use 1 <= min <= opt <= max."
        )
    if not onnx_path.is_file():
        raise DeploykitError(f"The ONNX model {onnx_path} does not exist: run the export stage first.")
    explicit = onnx_precision(onnx_path) == "int8"  # a QDQ graph carries its own scales
    timing_cache = Path(timing_cache) if timing_cache else plan_path.parent / "timing.cache"
    calibration_cache = Path(calibration_cache) if calibration_cache else calibration_cache_path(plan_path)
    calibrated = precision == "int8" and not explicit
    if calibrated and calibration is None and not calibration_cache.is_file():
        raise DeploykitError(
            f"An INT8 engine from the FP32 model {onnx_path} needs calibration samples: pass real inputs "
            "(calibration=...) or build from the INT8 QDQ model of the quantize stage."
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weights are found
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DeploykitError(
            f"TensorRT cannot parse {onnx_path} ({errors}): replace the unsupported operator or try another opset."
        )
    input_name = network.get_input(0).name

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    shapes = {"min": (min_batch, *input_shape), "opt": (opt_batch, *input_shape), "max": (max_batch, *input_shape)}
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines keep FP16 for layers without INT8 kernels
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if calibrated:
            config.int8_calibrator = _entropy_calibrator(trt, calibration, opt_batch, calibration_cache)
            config.set_calibration_profile(profile)  # calibration runs at the profile's opt shape
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise DeploykitError(
            f"TensorRT could not build a {precision} engine from {onnx_path} (its log above says why): "
            "raise workspace_mb, narrow the batch profile or replace the failing layer."
        )
    atomic_write_bytes(plan_path, bytes(serialized))
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))

    import torch

    meta = {
        "precision": precision,
        "quantization": "explicit (QDQ)" if explicit else ("entropy calibration" if calibrated else None),
        "calibration_samples": None if not calibrated or calibration is None else len(calibration),
        "input": input_name,
        "profile": {k: list(v) for k, v in shapes.items()},
        "workspace_mb": workspace_mb,
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "engine_bytes": plan_path.stat().st_size,
        "build_seconds": round(seconds, 3),
    }
    atomic_write_json(engine_metadata_path(plan_path), meta)
    return meta
