"""The `train` stage: the pipeline's zoo model trained on its dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from deploykit.artifacts import StageResult
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register
from deploykit.train.config import TrainConfig


class TrainStageConfig(TrainConfig):
    """The training stage: TrainConfig, plus the family recipe it may start from."""

    recipe: Literal["none", "auto"] = Field(
        "none",
        description="auto: every training field left unset (optimizer, schedule, loss, grad_clip_norm, epochs) "
        "comes from the model family's small-image recipe, or for a model of your own the generic one "
        "(deploykit/train/recipes.py).",
    )


@register("train")
class TrainStage(Stage):
    """Train the pipeline's model (optimizers, schedules, SWA, early stopping, transfer learning, DDP)."""

    Config = TrainStageConfig

    def needs_torch_model(self) -> bool:
        return True
    distributed = True

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.train import fit
        from deploykit.train.outputs import publish_model
        from deploykit.train.recipes import GENERIC, apply_recipe
        from deploykit.zoo import model_family

        bundle, arch = ctx.data(), ctx.arch()
        model = ctx.new_model(seed=self.config.seed)
        mixup = ctx.pipeline.data.augment.mixup_alpha
        cfg, taken = self.config, {}
        if cfg.recipe == "auto":
            family = model_family(arch["name"]) if "name" in arch else GENERIC  # a user's own model has no zoo family
            cfg, taken = apply_recipe(cfg, family)
            ctx.reporter.log(
                f"recipe auto ({family}): {', '.join(f'{k}={v}' for k, v in taken.items()) or 'nothing unset'}"
            )
        model, fitted = fit(model, bundle, cfg, ctx.work_dir, ctx.reporter, mixup_alpha=mixup)
        result = publish_model(model, arch, ctx.out_dir, bundle.input_shape, fitted.metrics["val_acc"], fitted)
        result.metrics = {**fitted.metrics, **result.metrics, **({"recipe": taken} if cfg.recipe == "auto" else {})}
        return result
