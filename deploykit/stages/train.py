"""The `train` stage: the pipeline's zoo model trained on its dataset."""

from __future__ import annotations

from deploykit.artifacts import StageResult
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register
from deploykit.train.config import TrainConfig


@register("train")
class TrainStage(Stage):
    """Train the pipeline's model (optimizers, schedules, SWA, early stopping, transfer learning, DDP)."""

    Config = TrainConfig
    distributed = True

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.train import fit
        from deploykit.train.outputs import publish_model
        from deploykit.zoo import get_model

        bundle, arch = ctx.data(), ctx.arch()
        model = get_model(arch["name"], arch["num_classes"], arch["in_channels"], **arch["options"])
        mixup = ctx.pipeline.data.augment.mixup_alpha
        model, fitted = fit(model, bundle, self.config, ctx.work_dir, ctx.reporter, mixup_alpha=mixup)
        result = publish_model(model, arch, ctx.out_dir, bundle.input_shape, fitted.metrics["val_acc"], fitted)
        result.metrics = {**fitted.metrics, **result.metrics}
        return result
