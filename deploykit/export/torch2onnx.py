"""torch -> ONNX: the dynamo exporter with a dynamic batch, one checked file, and a script that reproduces it."""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_text

_log = logging.getLogger(__name__)

MIN_OPSET = 18  # the dynamo exporter's oldest opset
# A single ONNX file is one protobuf, capped at 2 GiB; past ~1.8 GiB of weights they go to a .data file beside it.
_SINGLE_FILE_MAX_BYTES = int(1.8 * 2**30)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _first_line(exc: BaseException) -> str:
    """The line of an exporter error that says what went wrong (its summary when it has one)."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if "## Exception summary" in lines:  # torch.onnx puts the cause under this heading, after generic advice
        lines = lines[lines.index("## Exception summary") + 1 :]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def onnx_opset(path: Path) -> int:
    """The default-domain opset an ONNX file was written with."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(
    model: nn.Module, input_shape: tuple[int, int, int], path: Path, *, opset: int = 18, dynamic_batch: bool = True
) -> Path:
    """Export `model` (moved to CPU, eval mode) to `path`: input "input" [N, C, H, W], output "logits" [N, K].

    The file appears only once export and onnx.checker both succeeded. Weights stay inside the file unless
    the model is too big for one protobuf; then they go to `<name>.data` beside it.
    """
    if opset < MIN_OPSET:
        raise DeploykitError(f"ONNX opset {opset} is too old for the dynamo exporter: use opset {MIN_OPSET} or newer.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 1, which would pin the batch.
    example = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    arg = next(iter(inspect.signature(model.forward).parameters))
    dynamic_shapes = {arg: {0: torch.export.Dim("batch")}} if dynamic_batch else None
    weight_bytes = _weight_bytes(model)
    external = weight_bytes > _SINGLE_FILE_MAX_BYTES
    if external:
        _log.warning(
            "%s has %.1f GiB of weights: writing them to %s.data beside the ONNX file.",
            type(model).__name__, weight_bytes / 2**30, path.name,
        )

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_dir / path.name  # same name, so an external-data reference stays valid after the move
        try:
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=True,
                opset_version=opset,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes,
                external_data=external,
                verbose=False,
            )
        except Exception as exc:  # torch.export, dynamo and onnxscript each raise their own error types
            raise DeploykitError(
                f"Exporting {type(model).__name__} to ONNX failed ({_first_line(exc)}): replace the unsupported "
                "layer or data-dependent Python code in its forward, or try another opset."
            ) from exc
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise DeploykitError(
                f"The ONNX export of {type(model).__name__} fails onnx.checker ({_first_line(exc)}): try another opset."
            ) from exc
        # Weights first, the graph last: model.onnx never appears without its data.
        for produced in sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name):
            os.replace(produced, path.parent / produced.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


_SCRIPT = '''\
"""Reproduce {onnx_name}: rebuild {description} from {checkpoint_dir}/ and export it again.

Written by deploykit {deploykit} (torch {torch}, onnx {onnx}). Needs deploykit installed.
Usage: python {script} [OUTPUT.onnx]    (default: {default_out} beside this script)
"""

import sys
from pathlib import Path

from deploykit.export.torch2onnx import export_onnx
from deploykit.train import load_model

HERE = Path(__file__).resolve().parent

model, _ = load_model(HERE / {checkpoint_dir!r})  # model.json rebuilds the layers, model.pt holds only tensors
output = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / {default_out!r}
export_onnx(model, {input_shape!r}, output, opset={opset!r})
print(output)
'''

REPRODUCE_SCRIPT = "reproduce_export.py"


def write_reproduce_script(
    path: Path, arch: dict, checkpoint_rel: str, input_shape: tuple[int, int, int], opset: int
) -> Path:
    """Write reproduce_export.py beside the ONNX file `path`.

    `checkpoint_rel` is model.pt relative to `path`'s folder; the model.json describing `arch` must sit beside it.
    """
    import deploykit
    from deploykit.sources.model import describe_arch

    path = Path(path)
    script = path.parent / REPRODUCE_SCRIPT
    text = _SCRIPT.format(
        onnx_name=path.name,
        description=describe_arch(arch),
        checkpoint_dir=Path(checkpoint_rel).parent.as_posix(),
        deploykit=deploykit.__version__,
        torch=torch.__version__,
        onnx=onnx.__version__,
        script=script.name,
        default_out=f"{path.stem}.reproduced{path.suffix}",
        input_shape=tuple(input_shape),
        opset=opset,
    )
    atomic_write_text(script, text)
    return script


def onnx_size_bytes(path: Path) -> int:
    """The .onnx file plus every external-data file its tensors point to (weights may live beside it)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files = {
        entry.value
        for tensor in model.graph.initializer
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())
