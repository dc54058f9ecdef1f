"""The `distill` stage: a student (the newest upstream model, e.g. a pruned one, or a fresh zoo model) trained
to match an earlier stage's model, optionally beside a baseline trained without it."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploykit.artifacts import StageRecord, StageResult
from deploykit.data.config import AugmentConfig
from deploykit.errors import DeploykitError
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register
from deploykit.train.config import LossConfig, TrainConfig
from deploykit.zoo.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

    from deploykit.data import DataBundle


class DistillConfig(BaseModel):
    """Train a student on alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy."""

    model_config = ConfigDict(extra="forbid")
    teacher: str | None = Field(None, description="Name of the earlier stage whose checkpoint teaches; default: the first train stage.")
    student: Literal["upstream"] | ModelConfig = Field(
        "upstream", description="'upstream': the newest earlier checkpoint (e.g. the pruned model); or a model section (name, options) for a fresh zoo student."
    )
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the distillation term; 1 - alpha weighs cross-entropy with the labels.")
    temperature: float = Field(4.0, gt=0.0, description="Softmax temperature of teacher and student in the distillation term.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings for the student (its loss is the distillation loss).")
    baseline: bool = Field(False, description="Also train the same student (same init and settings) without the teacher, to show what distillation bought.")

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.train.loss != LossConfig():
            raise ValueError("train.loss does not apply to distill, whose loss is the distillation loss: remove it")
        if isinstance(self.student, ModelConfig):
            _check_student(self.student)
        return self


def _check_student(student: ModelConfig) -> None:
    """Build the student on the meta device: a bad name or option fails before the teacher trains for hours."""
    import torch

    from deploykit.zoo import get_model

    with torch.device("meta"):  # class counts do not affect which options are valid
        get_model(student.name, student.num_classes or 2, student.in_channels or 3, **student.options)


def augmented(aug: AugmentConfig) -> bool:
    """Whether a training sample can differ between epochs, so that cached teacher logits would be stale."""
    return aug.random_crop or aug.hflip or aug.cutout_size > 0 or aug.mixup_alpha > 0


@register("distill")
class DistillStage(Stage):
    """Distil an earlier stage's model (the teacher) into a student, optionally against a no-teacher baseline."""

    Config = DistillConfig

    def needs_torch_model(self) -> bool:
        return True
    distributed = True  # runs fit(), which is data-parallel under torchrun: every rank must run it

    def run(self, ctx: StageContext) -> StageResult:
        import torch

        from deploykit.compress.distill import DistillationLoss, WithTeacherLogits, teacher_logits
        from deploykit.data import make_loader
        from deploykit.sources.task import task_of
        from deploykit.train import fit, load_model
        from deploykit.train.loop import evaluate
        from deploykit.train.outputs import publish_model
        from deploykit.zoo import count_macs, count_params

        cfg, bundle = self.config, ctx.data()
        teacher_record = self._teacher_record(ctx)
        teacher, teacher_arch = load_model(teacher_record.artifact("checkpoint").parent)
        student, student_arch, student_source = self._student(ctx, teacher_record, bundle)
        if student_arch.get("num_classes") != teacher_arch.get("num_classes"):
            raise DeploykitError(
                f"The student has {student_arch['num_classes']} classes but teacher '{teacher_record.name}' has "
                f"{teacher_arch['num_classes']}: give the student model num_classes {teacher_arch['num_classes']}."
            )
        val_loader = make_loader(bundle.val, cfg.train.batch_size, shuffle=False)

        def accuracy(m: nn.Module) -> float:
            return evaluate(m, val_loader, torch.device("cpu"), task=bundle.task)[1]

        shape = (1, *bundle.input_shape)
        metrics: dict = {
            "teacher": teacher_record.name,
            "student": student_source,
            "teacher_val_acc": accuracy(teacher),
            "student_val_acc_before": accuracy(student),
            "teacher_params": count_params(teacher),
            "student_params": count_params(student),
            "teacher_macs": count_macs(teacher, shape),
            "student_macs": count_macs(student, shape),
        }
        mixup = ctx.pipeline.data.augment.mixup_alpha
        baseline_init = copy.deepcopy(student) if cfg.baseline else None
        task = task_of(bundle)
        hard = task.loss if task.user_loss else torch.nn.functional.cross_entropy
        kd_bundle, criterion = bundle, DistillationLoss(cfg.alpha, cfg.temperature, teacher, hard)
        metrics["cached"] = not augmented(ctx.pipeline.data.augment)
        if metrics["cached"]:  # one teacher pass instead of one per epoch
            start = time.perf_counter()
            logits = teacher_logits(teacher, bundle.train, cfg.train.batch_size)
            metrics["teacher_cache_s"] = time.perf_counter() - start
            kd_bundle = dataclasses.replace(bundle, train=WithTeacherLogits(bundle.train, logits))
            criterion = DistillationLoss(cfg.alpha, cfg.temperature, hard=hard)
        student, kd = fit(
            student, kd_bundle, cfg.train, ctx.work_dir / "kd", ctx.reporter, mixup_alpha=mixup, criterion=criterion
        )
        metrics |= {"kd_val_acc": kd.metrics["val_acc"], "val_acc": kd.metrics["val_acc"]}
        metrics["train_time_s"] = kd.metrics["train_time_s"]
        if baseline_init is not None:
            _, base = fit(baseline_init, bundle, cfg.train, ctx.work_dir / "baseline", ctx.reporter, mixup_alpha=mixup)
            metrics |= {
                "baseline_val_acc": base.metrics["val_acc"],
                "kd_gain": kd.metrics["val_acc"] - base.metrics["val_acc"],
                "baseline_train_time_s": base.metrics["train_time_s"],
                "baseline_history": base.history,
            }
        result = publish_model(student, student_arch, ctx.out_dir, bundle.input_shape, kd.metrics["val_acc"], kd)
        result.metrics = metrics | {"fit": kd.metrics} | result.metrics
        return result

    def _teacher_record(self, ctx: StageContext) -> StageRecord:
        """The configured teacher stage, or the first train stage, holding a checkpoint."""
        names = ", ".join(r.name for r in ctx.upstream) or "none"
        wanted = self.config.teacher
        if wanted is None:
            record = next((r for r in ctx.upstream if r.type == "train"), None)
            if record is None:
                raise DeploykitError(
                    f"Stage '{ctx.name}' found no train stage before it to use as teacher (earlier stages: {names}): "
                    "add one or set teacher to a stage name."
                )
        else:
            record = next((r for r in ctx.upstream if r.name == wanted), None)
            if record is None:
                raise DeploykitError(
                    f"The teacher '{wanted}' of stage '{ctx.name}' is not an earlier stage: choose one of {names}."
                )
        if record.artifact("checkpoint") is None:
            raise DeploykitError(
                f"The teacher stage '{record.name}' of stage '{ctx.name}' wrote no model checkpoint: "
                f"choose one that did ({names})."
            )
        return record

    def _student(self, ctx: StageContext, teacher: StageRecord, bundle: DataBundle) -> tuple[nn.Module, dict, str]:
        """The student model, its description for save_model, and where it came from (stage or model name)."""
        from deploykit.train import load_model
        from deploykit.zoo import build_model

        spec = self.config.student
        if spec == "upstream":
            found = ctx.find("checkpoint", required_by=" as its student")
            if found.stage == teacher.name:
                raise DeploykitError(
                    f"Stage '{ctx.name}' would distil '{teacher.name}' into itself: put a prune stage before it or set "
                    "student to a model section (name, options)."
                )
            model, arch = load_model(found.path.parent)
            return model, arch, found.stage
        arch = {
            "name": spec.name,
            "num_classes": spec.num_classes or bundle.num_classes,
            "in_channels": spec.in_channels or bundle.in_channels,
            "options": dict(spec.options),
        }
        # a reproducible initialisation, shared with the baseline
        return build_model(arch, seed=self.config.train.seed), arch, spec.name
