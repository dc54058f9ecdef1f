"""The `train` stage: the pipeline's zoo model trained on its dataset."""

from __future__ import annotations

import csv
import io

from deploykit.pipeline.artifacts import atomic_write_text
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, StageResult, register
from deploykit.train.config import TrainConfig


@register("train")
class TrainStage(Stage):
    """Train the pipeline's model (optimizers, schedules, SWA, early stopping, transfer learning, DDP)."""

    Config = TrainConfig
    distributed = True

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.train import fit, save_model
        from deploykit.zoo import count_macs, count_params, get_model

        bundle, arch = ctx.data(), ctx.arch()
        model = get_model(arch["name"], arch["num_classes"], arch["in_channels"], **arch["options"])
        model, result = fit(model, bundle, self.config, ctx.work_dir, ctx.reporter, mixup_alpha=ctx.pipeline.data.augment.mixup_alpha)
        save_model(model, arch, ctx.out_dir)
        atomic_write_text(ctx.out_dir / "history.csv", history_csv(result.history))
        size = bundle.image_size
        metrics = {
            **result.metrics,
            "params": count_params(model),
            "macs": count_macs(model, (1, bundle.in_channels, size, size)),
            "diagnostics": result.diagnostics,
            "history": result.history,
        }
        return StageResult(artifacts={"checkpoint": "model.pt", "arch": "model.json", "history": "history.csv"}, metrics=metrics)


def history_csv(history: list[dict]) -> str:
    if not history:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()
