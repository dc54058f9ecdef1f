"""The pipeline's task: what its targets are, the metric every model is judged by, and the loss it trains with.

`task: classification` (the default) judges by top-1 and trains with the train stage's loss (cross-entropy).
A user metric (`metric: my_metrics.py:miou`) is a function of the model's outputs and the targets over the whole
validation split, returning a float where higher is better. Like top-1 it is read as a fraction: accuracy budgets
(`max_accuracy_drop`) are in points, 100 x the metric's difference. A user loss (`loss: my_losses.py:dice`),
a function of a batch's outputs and targets returning a scalar tensor, replaces the train stage's loss in every
stage that trains (train, prune's fine-tune, distill, QAT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import Tensor

from deploykit.errors import DeploykitError
from deploykit.usercode import base_dir, describe_ref, load_callable, resolve_ref, source_sha256

TOP1 = "top-1"


class MetricRef(BaseModel):
    """A user metric: `function` (a reference) and the `name` shown wherever the metric is."""

    model_config = ConfigDict(extra="forbid")
    function: str = Field(
        ..., description="'my_metrics.py:miou' or 'mypkg.metrics:miou': f(outputs, targets) -> float."
    )
    name: str | None = Field(None, description="Shown in logs, tables and the report; defaults to the function's name.")

    @field_validator("function")
    @classmethod
    def _resolve(cls, v: str, info: ValidationInfo) -> str:
        return resolve_ref(v, base_dir(info), "metric")

    @property
    def label(self) -> str:
        return self.name or self.function.rpartition(":")[2]


class TaskSettings(BaseModel):
    """The pipeline file's `task`, `metric` and `loss` keys."""

    task: Literal["classification", "custom"] = Field(
        "classification",
        description="classification: targets are class indices, judged by top-1 unless metric says otherwise; "
        "custom: any targets (masks, boxes, values), judged by `metric`.",
    )
    metric: MetricRef | None = Field(
        None, description="Your metric, 'file.py:function' or {function, name}: higher is better, read as a fraction."
    )
    loss: str | None = Field(
        None, description="Your training loss, 'file.py:function': f(outputs, targets) -> scalar tensor."
    )

    @field_validator("metric", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        return {"function": v} if isinstance(v, str) else v

    @field_validator("loss")
    @classmethod
    def _resolve_loss(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else resolve_ref(v, base_dir(info), "loss")

    @property
    def metric_name(self) -> str:
        """The name every table and log gives the pipeline's metric."""
        return self.metric.label if self.metric else TOP1

    def task_key(self) -> dict[str, Any]:
        """The task's part of every stage key; empty for the default, so existing pipelines keep their keys."""
        key: dict[str, Any] = {}
        if self.task != "classification":
            key["task"] = self.task
        if self.metric is not None:
            key["metric"] = {**_ref_key(self.metric.function), "name": self.metric.label}
        if self.loss is not None:
            key["loss"] = _ref_key(self.loss)
        return key

    def check_task(self) -> None:
        if self.task == "custom" and self.metric is None:
            raise ValueError("task custom needs a metric: name your function, e.g. metric: my_metrics.py:miou")

    def task_json(self) -> dict[str, Any]:
        """What a worker process needs to rebuild the task (references are absolute already)."""
        return {
            "task": self.task,
            "metric": self.metric.model_dump() if self.metric else None,
            "loss": self.loss,
        }


def _ref_key(ref: str) -> dict[str, str]:
    return {"function": describe_ref(ref), "sha256": source_sha256(ref)}


# ---- the task at run time -----------------------------------------------------------------------------------


@dataclass
class Task:
    """The metric and loss of a run, resolved to functions."""

    kind: str  # classification | custom
    metric_name: str
    user_metric: Callable[[Tensor, Tensor], Any] | None = None  # None: top-1
    user_loss: Callable[[Tensor, Tensor], Tensor] | None = None  # None: the train stage's own loss

    @property
    def classes(self) -> bool:
        """Targets are class indices (top-1, MixUp, per-class stratified splits make sense)."""
        return self.kind == "classification"

    def accumulator(self) -> MetricAccumulator:
        return MetricAccumulator(self)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The user loss on one batch, checked to be a scalar tensor."""
        assert self.user_loss is not None
        value = self.user_loss(outputs, targets)
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise DeploykitError(f"The loss function returned {shape}, not a scalar tensor: return loss.mean().")
        return value


class MetricAccumulator:
    """Batches of (outputs, targets) in, the metric out. Top-1 counts as it goes; a user metric sees the whole
    split at once (mIoU, F1 and AUC are not means of per-batch values)."""

    def __init__(self, task: Task) -> None:
        self.task, self.correct, self.count = task, 0, 0
        self.outputs: list[Tensor] = []
        self.targets: list[Tensor] = []

    def update(self, outputs: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> None:
        outputs, targets = torch.as_tensor(outputs), torch.as_tensor(targets)
        if self.task.user_metric is None:
            self.correct += int((outputs.argmax(dim=1) == targets).sum())
            self.count += len(targets)
        else:
            self.outputs.append(outputs.detach().float().cpu())
            self.targets.append(targets.detach().cpu())

    def value(self) -> float:
        if self.task.user_metric is None:
            if self.count == 0:
                raise DeploykitError("Cannot measure top-1 on no samples: use a validation split with samples.")
            return self.correct / self.count
        if not self.outputs:
            raise DeploykitError(
                f"Cannot measure {self.task.metric_name} on no samples: use a validation split with samples."
            )
        return call_metric(self.task, torch.cat(self.outputs), torch.cat(self.targets))


def call_metric(task: Task, outputs: Tensor, targets: Tensor) -> float:
    """The user metric on a whole split; anything but a finite number is one sentence."""
    assert task.user_metric is not None
    try:
        value = task.user_metric(outputs, targets)
    except Exception as exc:
        raise DeploykitError(
            f"The metric {task.metric_name!r} raised {type(exc).__name__} ({exc}) on outputs {list(outputs.shape)} "
            f"and targets {list(targets.shape)}: fix the function."
        ) from exc
    try:
        number = float(value.item() if isinstance(value, (Tensor, np.ndarray)) else value)
    except (TypeError, ValueError, RuntimeError):
        raise DeploykitError(
            f"The metric {task.metric_name!r} returned {type(value).__name__} {value!r:.60}, not a number: "
            "return a float."
        ) from None
    if not math.isfinite(number):
        raise DeploykitError(
            f"The metric {task.metric_name!r} returned {number} on outputs {list(outputs.shape)}: it must return a "
            "finite number (guard its divisions, e.g. classes absent from a split)."
        )
    return number


TOP1_CLASSIFICATION = Task("classification", TOP1)  # the task of a pipeline that names none


def task_of(bundle: Any) -> Task:
    """A DataBundle's task; top-1 classification for a bundle built without one (tests, scripts)."""
    return getattr(bundle, "task", None) or TOP1_CLASSIFICATION


def build_task(settings: dict[str, Any] | TaskSettings) -> Task:
    """The run-time task of a pipeline's settings (or their task_json form, in a worker process)."""
    s = settings if isinstance(settings, TaskSettings) else TaskSettings.model_validate(settings)
    metric = loss = None
    name = TOP1
    if s.metric is not None:
        metric, name = load_callable(s.metric.function, "metric"), s.metric.label
    if s.loss is not None:
        loss = load_callable(s.loss, "loss")
    return Task(kind=s.task, metric_name=name, user_metric=metric, user_loss=loss)
