"""The `load` stage: the pipeline's model as a checkpoint, untrained or from your own weights."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deploykit.artifacts import StageResult
from deploykit.errors import DeploykitError
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register


class LoadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: Path | None = Field(
        None, description="A state_dict file (.pt/.pth, loaded with weights_only=True), e.g. pretrained weights; none: seeded random init."
    )
    strict: bool = Field(True, description="Every key and shape of the file must match the model.")
    seed: int = Field(0, description="Seed of the random initialisation when no weights are given.")

    @field_validator("weights")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"weights file '{v}' does not exist: give the path of a saved state_dict")
        return v


@register("load")
class LoadStage(Stage):
    """Save the pipeline's model as a checkpoint without training (latency studies, pretrained weights)."""

    Config = LoadConfig

    def needs_torch_model(self) -> bool:
        return True

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.train.checkpoint import load_torch, state_dict_from
        from deploykit.train.outputs import publish_model

        cfg, arch = self.config, ctx.arch()
        model = ctx.new_model(seed=cfg.seed)
        if cfg.weights is not None:
            state = state_dict_from(load_torch(cfg.weights, "weights file"), cfg.weights, "weights file")
            state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
            try:
                result = model.load_state_dict(state, strict=cfg.strict)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[-1].strip()
                raise DeploykitError(
                    f"Weights file '{cfg.weights}' does not fit {ctx.pipeline.model.label()} ({first}): check the "
                    "model and its options, or set strict: false to skip mismatched keys."
                ) from None
            metrics_skipped = len(result.missing_keys) + len(result.unexpected_keys)
        # Accuracy unknown: the weights were never evaluated here, and random ones say nothing.
        result = publish_model(model.eval(), arch, ctx.out_dir, ctx.data().input_shape, accuracy=None)
        result.metrics["weights"] = str(cfg.weights) if cfg.weights else "random"
        if cfg.weights is not None:
            result.metrics["skipped_keys"] = metrics_skipped
        return result
