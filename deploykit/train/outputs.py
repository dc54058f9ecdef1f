"""What every stage that writes a PyTorch model publishes: the checkpoint, its stats, and the fit's history."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from deploykit.artifacts import ModelStats, Role, StageResult
from deploykit.files import atomic_write_text

if TYPE_CHECKING:
    from torch import nn

    from deploykit.train.loop import FitResult

HISTORY_FILE = "history.csv"


def history_csv(history: list[dict]) -> str:
    if not history:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def publish_model(
    model: nn.Module,
    arch: dict,
    out_dir: Path,
    input_shape: tuple[int, ...],
    accuracy: float | None,
    fit: FitResult | None = None,
) -> StageResult:
    """Save `model` as the stage's checkpoint with its standard stats; with a fit, also history.csv, the
    per-epoch history and the training diagnostics. The stage adds its own metrics to the result."""
    from deploykit.train.checkpoint import ARCH_FILE, CHECKPOINT_FILE, save_model
    from deploykit.zoo import count_macs, count_params

    save_model(model, arch, out_dir)
    result = StageResult(artifacts={Role.CHECKPOINT: CHECKPOINT_FILE, Role.ARCH: ARCH_FILE})
    result.models[Role.CHECKPOINT] = ModelStats(
        params=count_params(model),
        macs=count_macs(model, (1, *input_shape)),
        bytes=(out_dir / CHECKPOINT_FILE).stat().st_size,
        accuracy=accuracy,
    )
    if fit is not None:
        atomic_write_text(out_dir / HISTORY_FILE, history_csv(fit.history))
        result.artifacts[Role.HISTORY] = HISTORY_FILE
        result.metrics |= {"history": fit.history, "diagnostics": fit.diagnostics}
    return result
