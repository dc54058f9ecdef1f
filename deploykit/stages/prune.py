"""The `prune` stage: the newest upstream model pruned (structured or unstructured), BatchNorm re-estimated,
fine-tuned, and measured before and after (accuracy, parameters, MACs, file size, CPU latency)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploykit.artifacts import StageResult
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, by_method, register
from deploykit.train.config import OptimizerConfig, TrainConfig

if TYPE_CHECKING:
    from torch import nn

_GOALS = ("pruning_ratio", "target_macs_ratio", "target_params_ratio")
_UNSTRUCTURED_NOTE = (
    "Unstructured pruning zeroes weights but keeps them: the dense file still stores every zero and dense CPU "
    "kernels still multiply by them, so file size, MACs and latency do not shrink (compare the before/after "
    "numbers); only a sparse format or sparse kernels could gain from it."
)


class FinetuneConfig(TrainConfig):
    """Fine-tuning after pruning: the train stage's settings with short, gentle defaults."""

    epochs: int = Field(3, ge=0, description="Fine-tuning epochs; 0 skips fine-tuning.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(lr=0.01), description="Optimizer; a tenth of training's lr by default."
    )


class PruneSettings(BaseModel):
    """What both methods share: BatchNorm re-estimation, fine-tuning and the latency measurement."""

    model_config = ConfigDict(extra="forbid")
    bn_recalibration_batches: int = Field(20, ge=0, description="Training batches to re-estimate BatchNorm statistics after pruning; 0 skips it.")
    latency_runs: int = Field(50, ge=1, description="Timed batch-1 CPU runs per model (one thread, median) for the latency metrics.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="Fine-tuning after pruning (fit on the pipeline's data).")


class StructuredSettings(PruneSettings):
    """Remove whole channels (DepGraph) to a ratio or a MACs/parameter budget."""

    method: Literal["structured"] = Field("structured", description="structured removes whole channels (smaller, faster).")
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = Field(
        "l2", description="structured: channel score: weight L1/L2 norm, BatchNorm scale, or first-order Taylor (gradients of a few batches)."
    )
    pruning_ratio: float | None = Field(None, gt=0.0, lt=1.0, description="structured: fraction of each prunable layer's channels to remove.")
    target_macs_ratio: float | None = Field(
        None, gt=0.0, lt=1.0, description="structured: keep at most this fraction of the MACs (0.5 when no ratio or target is set)."
    )
    target_params_ratio: float | None = Field(None, gt=0.0, lt=1.0, description="structured: keep at most this fraction of the parameters.")
    round_to: int = Field(8, ge=1, description="structured: kept channel counts are multiples of this (SIMD-friendly widths).")
    iterative_steps: int = Field(1, ge=1, description="structured: reach the ratio or target in this many steps, re-scoring channels in between.")
    taylor_batches: int = Field(4, ge=1, description="structured, taylor: training batches whose gradients score the channels.")
    ignored_layers: list[str] = Field(
        default_factory=list,
        description="structured: module names (e.g. head, blocks.3.se) that keep all their output channels.",
    )

    @model_validator(mode="after")
    def _one_goal(self) -> StructuredSettings:
        goals = [name for name in _GOALS if getattr(self, name) is not None]
        if len(goals) > 1:
            raise ValueError(f"set only one of {', '.join(_GOALS)}, not {' and '.join(goals)}")
        if not goals:
            self.target_macs_ratio = 0.5
        return self


class UnstructuredSettings(PruneSettings):
    """Zero single weights, smallest |w| first; dense CPU kernels gain nothing from it."""

    method: Literal["unstructured"] = Field(
        "unstructured",
        description="unstructured zeroes single weights (neither smaller nor faster on dense CPU kernels).",
    )
    sparsity: float = Field(0.5, gt=0.0, lt=1.0, description="unstructured: fraction of all Conv2d/Linear weights zeroed, smallest |w| across the model first.")


@register("prune")
class PruneStage(Stage):
    """Prune the newest upstream model (structured channels or unstructured weights), then re-estimate BatchNorm and fine-tune."""

    Config = by_method(StructuredSettings, UnstructuredSettings)
    distributed = True  # fine-tuning runs fit(), which is data-parallel under torchrun: every rank must run it

    def needs_torch_model(self) -> bool:
        return True

    def run(self, ctx: StageContext) -> StageResult:
        import torch

        from deploykit.compress import prune as pruning
        from deploykit.data import make_loader
        from deploykit.train import fit, load_model
        from deploykit.train.loop import evaluate
        from deploykit.train.outputs import publish_model
        from deploykit.zoo import count_macs, count_params

        cfg, bundle = self.config, ctx.data()
        checkpoint = ctx.find("checkpoint", required_by=" to prune").path
        model, arch = load_model(checkpoint.parent)
        original = copy.deepcopy(model)
        shape = (1, *bundle.input_shape)
        val_loader = make_loader(bundle.val, cfg.finetune.batch_size, shuffle=False)

        def accuracy(m: nn.Module) -> float:
            return evaluate(m, val_loader, torch.device("cpu"), task=bundle.task)[1]

        def train_batches(n: int) -> list:
            loader = make_loader(bundle.train, cfg.finetune.batch_size, shuffle=True, seed=cfg.finetune.seed)
            return [(x, y) for x, y, *_ in itertools.islice(loader, n)]

        acc = {"before": accuracy(model)}
        model, pruned = _PRUNERS[type(cfg)](self, model, shape, bundle.num_classes, train_batches)
        metrics: dict = {"method": cfg.method, **pruned}
        acc["pruned"] = accuracy(model)
        if cfg.bn_recalibration_batches:
            n = cfg.bn_recalibration_batches
            pruning.recalibrate_batchnorm(model, train_batches(n), n)
            acc["bn_recalibrated"] = accuracy(model)
        result = None
        if cfg.finetune.epochs:
            mixup = ctx.pipeline.data.augment.mixup_alpha
            model, result = fit(model, bundle, cfg.finetune, ctx.work_dir, ctx.reporter, mixup_alpha=mixup)
            acc["finetuned"] = accuracy(model)
        pruning.remove_masks(model)  # unstructured: the zeros become plain weights
        published = publish_model(model, arch, ctx.out_dir, bundle.input_shape, acc[list(acc)[-1]], result)

        latency = pruning.cpu_latency_ms({"before": original, "after": model}, shape, cfg.latency_runs)
        before_after = {
            "params": (count_params(original), count_params(model)),
            "macs": (count_macs(original, shape), count_macs(model, shape)),
            "file_bytes": (checkpoint.stat().st_size, (ctx.out_dir / "model.pt").stat().st_size),
            "latency_ms": (latency["before"], latency["after"]),
        }
        for name, (before, after) in before_after.items():
            metrics |= {f"{name}_before": before, f"{name}_after": after, f"{name}_ratio": after / before}
        metrics |= {f"val_acc_{when}": value for when, value in acc.items()}
        metrics |= {"val_acc": list(acc.values())[-1], "latency_threads": 1}
        metrics["weight_sparsity"] = pruning.weight_sparsity(model)
        if result is not None:
            metrics["finetune"] = result.metrics
        published.metrics = metrics | published.metrics
        return published

    # -- one pruner per method (_PRUNERS): the pruned model and the metrics only this method has ----------------

    def _prune_structured(
        self, model: nn.Module, shape: tuple[int, ...], num_classes: int | None, train_batches: Callable[[int], list]
    ) -> tuple[nn.Module, dict[str, Any]]:
        """DepGraph pruning to the configured ratio or budget; the metrics hold each step's channel ratio.

        The layers making the model's output are found by tracing it, not from num_classes (None for a model that
        does not classify), so any output keeps its shape.
        """
        import torch

        from deploykit.compress.prune import Budget, prune_structured, taylor_gradients
        from deploykit.zoo import count_macs, count_params

        cfg = self.config
        budget = None
        if cfg.target_macs_ratio is not None:
            def macs(m: nn.Module) -> int:
                return count_macs(m, shape)

            budget = Budget(macs, cfg.target_macs_ratio * macs(model), "MACs")
        elif cfg.target_params_ratio is not None:
            budget = Budget(count_params, cfg.target_params_ratio * count_params(model), "parameters")
        gradients = taylor_gradients(train_batches(cfg.taylor_batches)) if cfg.importance == "taylor" else None
        model, ratios = prune_structured(
            model,
            torch.zeros(shape),
            importance=cfg.importance,
            round_to=cfg.round_to,
            steps=cfg.iterative_steps,
            ratio=cfg.pruning_ratio,
            budget=budget,
            gradients=gradients,
            ignored_layers=cfg.ignored_layers,
        )
        return model, {"channel_ratios": ratios}

    def _prune_unstructured(
        self, model: nn.Module, shape: tuple[int, ...], num_classes: int | None, train_batches: Callable[[int], list]
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Masks on the smallest weights, in place (fine-tuning keeps them at zero)."""
        from deploykit.compress.prune import prune_unstructured

        prune_unstructured(model, self.config.sparsity)
        return model, {"sparsity_target": self.config.sparsity, "note": _UNSTRUCTURED_NOTE}


_PRUNERS: dict[type[PruneSettings], Callable[..., tuple[nn.Module, dict[str, Any]]]] = {
    StructuredSettings: PruneStage._prune_structured,
    UnstructuredSettings: PruneStage._prune_unstructured,
}
