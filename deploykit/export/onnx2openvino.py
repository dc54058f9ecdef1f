"""onnx2openvino: an ONNX model as OpenVINO IR (.xml + .bin), FP32 or INT8 through NNCF's post-training quantization.

The IR pair is written to a temporary folder and renamed into place weights first, graph last, so a crash never
leaves an .xml without its .bin.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_text
from deploykit.runtime.ov_rt import require_openvino

REPRODUCE_SCRIPT = "reproduce_openvino.py"


def ir_size_bytes(xml: Path) -> int:
    """An IR on disk: the graph (.xml) plus its weights (.bin)."""
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def _save_ir(model: Any, xml: Path) -> Path:
    ov = require_openvino()
    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{xml.stem}.", dir=xml.parent))
    try:
        # FP32 weights stay FP32: FP16 compression would change the outputs compared with the ONNX model.
        ov.save_model(model, str(tmp_dir / xml.name), compress_to_fp16=False)
        os.replace(tmp_dir / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(tmp_dir / xml.name, xml)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return xml


def read_onnx(onnx_path: Path) -> Any:
    """The ONNX model as an OpenVINO model (dynamic batch kept)."""
    ov = require_openvino()
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO's frontends raise their own exception types, with no common base
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeploykitError(f"OpenVINO could not convert {onnx_path} ({first}): check the ONNX file.") from exc


def convert_onnx(onnx_path: Path, xml: Path) -> Path:
    """ONNX -> FP32 IR at `xml` (its .bin beside it)."""
    return _save_ir(read_onnx(onnx_path), xml)


def quantize_nncf(
    onnx_path: Path,
    xml: Path,
    calibration: Sequence[np.ndarray],
    *,
    preset: str = "performance",
    validation: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    max_drop: float | None = None,
    task: dict[str, Any] | None = None,
) -> Path:
    """ONNX -> INT8 IR with NNCF PTQ on real calibration batches.

    With `validation` (batches of (x, targets)) and `max_drop` (points), NNCF's accuracy-controlled quantization
    reverts the layers that cost the most accuracy until the pipeline's metric (`task`, the settings of
    `sources.task.build_task`; top-1 without one) drops by at most `max_drop`.

    NNCF runs in a child process: even for an OpenVINO model it loads its torch function hooks (nncf.torch) into
    the process that calls it, where deploykit's own torch work (export, training, serving checks) goes on; the
    child leaves this process as it was, for a few seconds of start-up.
    """
    if validation is not None and max_drop is None:
        raise DeploykitError("Accuracy-controlled quantization needs max_drop: set max_accuracy_drop.")
    spawn = multiprocessing.get_context("spawn")  # a fork would carry this process's threads and state along
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        job = pool.submit(_quantize_here, onnx_path, xml, list(calibration), preset, validation, max_drop, task)
        return job.result()


def _quantize_here(
    onnx_path: Path,
    xml: Path,
    calibration: list[np.ndarray],
    preset: str,
    validation: Sequence[tuple[np.ndarray, np.ndarray]] | None,
    max_drop: float | None,
    task: dict[str, Any] | None,
) -> Path:
    import nncf

    model = read_onnx(onnx_path)
    data = nncf.Dataset(list(calibration))
    kwargs: dict[str, Any] = {
        "preset": nncf.QuantizationPreset(preset),  # performance: symmetric activations, what CPU kernels like
        "subset_size": len(calibration),  # NNCF counts dataset items (our batches), not samples
    }
    if validation is None:
        quantized = nncf.quantize(model, data, **kwargs)
    else:
        quantized = nncf.quantize_with_accuracy_control(
            model,
            data,
            nncf.Dataset(list(validation)),
            partial(_validation, task=task or {}),
            max_drop=max_drop / 100.0,
            drop_type=nncf.DropType.ABSOLUTE,
            **kwargs,
        )
    return _save_ir(quantized, xml)


def _validation(compiled: Any, batches: Any, task: dict[str, Any]) -> float:
    """NNCF's validation_fn: the pipeline's metric of a compiled model over (x, targets) batches."""
    from deploykit.sources.task import build_task

    output = compiled.output(0)
    metric = build_task(task).accumulator()
    for x, targets in batches:
        metric.update(np.asarray(compiled(x)[output]), targets)
    return metric.value()


_SCRIPT = '''\
"""Reproduce the OpenVINO IR files of this folder from the ONNX model in source/.

Needs deploykit with the openvino extra. INT8 files need calibration data, so this script rebuilds the FP32 IR
only; the INT8 IR's settings are in meta.json.
Usage: python {script} [OUTPUT.xml]    (default: {default_out} beside this script)
"""

import sys
from pathlib import Path

from deploykit.export.onnx2openvino import convert_onnx

HERE = Path(__file__).resolve().parent
output = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / {default_out!r}
print(convert_onnx(HERE / "source" / {onnx_name!r}, output))
'''


def write_reproduce_script(directory: Path, onnx_name: str, xml_name: str) -> Path:
    script = Path(directory) / REPRODUCE_SCRIPT
    stem = Path(xml_name).stem
    atomic_write_text(
        script, _SCRIPT.format(script=REPRODUCE_SCRIPT, default_out=f"{stem}.reproduced.xml", onnx_name=onnx_name)
    )
    return script

