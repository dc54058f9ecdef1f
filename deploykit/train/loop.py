"""The training loop: fit() a model on a DataBundle as a TrainConfig says, resumably and data-parallel under torchrun.

Per epoch: train (MixUp, accumulation, clipping, autocast, gradient checks), validate, step the schedules,
early-stop or average (SWA), then checkpoint everything to work_dir/last.pt so a killed run picks up at the
next epoch with the same result as an uninterrupted one. (Augmentations that keep their own generator inside
the dataset restart it in a new process, so with those a resumed run is equivalent but not bit-identical.)

Under torchrun every rank trains on its shard (DistributedSampler). After each epoch rank 0's BatchNorm
statistics are copied to all ranks, and every rank validates on the whole validation set: identical weights
give identical metrics, so no validation collectives are needed; the early-stopping decision is still
broadcast from rank 0 so all ranks leave the loop together. SWA's BatchNorm pass also walks the whole
training split on every rank. Only rank 0 writes last.pt and logs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn
from torch.utils.data import DataLoader

from deploykit.data import DataBundle, clean_subset, make_loader, mixup_batch
from deploykit.errors import DeploykitError
from deploykit.progress import Reporter, silent
from deploykit.sources.task import TOP1_CLASSIFICATION, Task, call_metric, task_of
from deploykit.train import distributed as ddp
from deploykit.train.checkpoint import load_torch, rng_state, save_torch, set_rng_state
from deploykit.train.config import EarlyStoppingConfig, SWAConfig, TrainConfig
from deploykit.train.diagnostics import GradientMonitor, TrainingDiverged, classify_curves, val_loss_spike
from deploykit.train.losses import build_loss
from deploykit.train.optim import build_optimizer
from deploykit.train.precision import training_precision
from deploykit.train.schedules import build_schedule
from deploykit.train.transfer import TransferPlan, apply_transfer, train_mode

LAST_CHECKPOINT = "last.pt"
_CHECKPOINT_FORMAT = 3  # 2: history rows hold train_eval_loss/acc; 3: and the epoch's time split (data_s ... eval_s)
_MIN_CLEAN_TRAIN, _MAX_CLEAN_TRAIN = 256, 2048  # training samples evaluated as val is, each epoch

# criterion(logits, x, target, extras) -> scalar loss. `extras` are the items a training sample holds after
# (x, y), batched and on the training device; target is y, or MixUp's soft labels.
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


@dataclass
class FitResult:
    """What a training run produced besides the model.

    history: one dict per epoch (epoch from 1, train_loss and train_acc as trained (regularized, augmented, train
        mode), train_eval_loss and train_eval_acc (a fixed part of the train split evaluated like val), val_loss,
        val_acc, lr, epoch_time_s).
    metrics: val_acc/val_loss of the returned model; best_epoch/best_val_acc by the early-stopping monitor
      (val_acc without early stopping); epochs_run, optimizer_steps, world_size, stopped_early, train_time_s,
      swa (+ swa_epochs_averaged), resumed_from_epoch (epochs already done when this call started, else None),
      and transfer's load report when used.
    diagnostics: "gradients" (exploding/vanishing flags), "grad_clip" (pre-clip norms), "curves" (classify_curves).
    """

    history: list[dict]
    metrics: dict
    diagnostics: dict


def fit(
    model: nn.Module,
    bundle: DataBundle,
    cfg: TrainConfig,
    work_dir: Path,
    reporter: Reporter | None = None,
    mixup_alpha: float = 0.0,
    criterion: Criterion | None = None,
) -> tuple[nn.Module, FitResult]:
    """Train `model` and return it on CPU in eval mode (the best or SWA-averaged weights where configured).

    `criterion` replaces cfg.loss for the training loss (knowledge distillation uses it); validation stays plain
    cross-entropy and top-1. With MixUp it receives the mixed x and soft targets; MixUp cannot mix the extras
    of a dataset that yields more than (x, y), so that combination is refused.
    Resumes from work_dir/last.pt when it exists. Raises TrainingDiverged on a NaN/Inf loss.
    """
    with _torch_settings(cfg):
        return _Trainer(model, bundle, cfg, Path(work_dir), reporter or silent(), mixup_alpha, criterion).run()


class EarlyStopper:
    """Counts epochs without an improvement of the monitored metric larger than min_delta."""

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.cfg = cfg
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0

    def update(self, metrics: dict[str, float], epoch: int) -> bool:
        """Record an epoch's metrics; True when they are the best so far."""
        value = metrics[self.cfg.monitor]
        sign = 1.0 if self.cfg.monitor == "val_loss" else -1.0  # lower loss, higher accuracy is better
        if self.best is None or sign * (self.best - value) > self.cfg.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.cfg.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


class _Swa:
    """Stochastic weight averaging: from `start` on, SWALR drives the lr and each epoch's weights join the average."""

    def __init__(
        self, cfg: SWAConfig, model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int, base_lr: float
    ) -> None:
        self.start = cfg.start_epoch if cfg.start_epoch is not None else int(0.75 * epochs)
        if self.start >= epochs:
            raise DeploykitError(
                f"swa.start_epoch={self.start} is not before the end of the {epochs}-epoch run, so nothing would be "
                "averaged: lower swa.start_epoch or raise train.epochs."
            )
        self.model = AveragedModel(model)
        self._optimizer, self._lr, self._anneal = optimizer, cfg.lr or base_lr / 2, cfg.anneal_epochs
        self.scheduler: SWALR | None = None

    def begin_epoch(self) -> None:
        # Built at the first averaged epoch, not before: SWALR sets the lr as soon as it exists.
        if self.scheduler is None:
            self.scheduler = SWALR(self._optimizer, swa_lr=self._lr, anneal_epochs=self._anneal)

    def end_epoch(self, model: nn.Module) -> None:
        self.model.update_parameters(model)
        self.scheduler.step()

    @property
    def n_averaged(self) -> int:
        return int(self.model.n_averaged)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if state["scheduler"] is not None:
            self.begin_epoch()
            self.scheduler.load_state_dict(state["scheduler"])


class _Trainer:
    """One fit() call; holds the run's state so that checkpointing and resuming see all of it in one place."""

    def __init__(
        self,
        model: nn.Module,
        bundle: DataBundle,
        cfg: TrainConfig,
        work_dir: Path,
        reporter: Reporter,
        mixup_alpha: float,
        criterion: Criterion | None,
    ) -> None:
        self.cfg, self.bundle, self.work_dir, self.mixup_alpha = cfg, bundle, work_dir, mixup_alpha
        self.device = _pick_device(cfg.device)
        self.info = ddp.init_from_env(self.device.type)
        if self.info.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.info.local_rank)
        self.reporter = reporter if self.info.is_main else silent()
        self.precision, self.precision_why = training_precision(cfg.precision, self.device.type)
        _check_inputs(model, bundle, cfg, self.device, self.precision)
        _seed_everything(cfg)

        self.plan = apply_transfer(model, cfg.transfer) if cfg.transfer else TransferPlan()
        if cfg.activation_checkpointing:
            model.activation_checkpointing = True
        self.memory_format = _memory_format(cfg.memory_format, model)
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.drop_last = _drop_last(model, len(bundle.train), cfg.batch_size, self.info.world_size)
        self.num_batches = len(self._train_loader(0))
        if self.num_batches == 0:
            raise DeploykitError(
                f"The training split ({len(bundle.train)} samples) gives no batch of {cfg.batch_size}: "
                "lower train.batch_size or add data."
            )
        self.task = task_of(bundle)
        loss_fn = self.task.loss if self.task.user_loss else build_loss(cfg.loss, bundle.num_classes)
        self.criterion: Criterion = criterion or (lambda logits, x, target, extras: loss_fn(logits, target))
        if cfg.time_budget_s:  # before the schedule, which is built for the epochs that will run
            self.cfg = cfg = cfg.model_copy(update={"epochs": self._budget_epochs(cfg.time_budget_s)})
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.plan.lr_mults)
        steps_per_epoch = math.ceil(self.num_batches / cfg.accumulate_steps)
        self.schedule = build_schedule(self.optimizer, cfg.schedule, cfg.epochs, steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.swa = _Swa(cfg.swa, self.model, self.optimizer, cfg.epochs, cfg.optimizer.lr) if cfg.swa else None
        self.stopper = EarlyStopper(cfg.early_stopping) if cfg.early_stopping else None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.monitor = GradientMonitor(cfg.diagnostics, self.reporter.log)
        self.clip = {"max_norm": cfg.grad_clip_norm, "max_pre_clip_norm": 0.0, "clipped_steps": 0}
        self.history: list[dict] = []
        self.step = 0  # optimizer steps so far
        self.start_epoch = 0
        self.stopped_early = False
        self.resumed_from: int | None = None
        self._resume()
        ddp.barrier(self.info)  # no rank may write last.pt before every rank has read it
        self.net: nn.Module = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.info.distributed
            else self.model
        )
        self.val_loader = make_loader(bundle.val, cfg.batch_size, shuffle=False)
        # The train split as the val split is seen (eval mode, no augmentation, plain cross-entropy), so that the
        # diagnosis compares like with like; as many samples as val has, within bounds, to keep it cheap.
        clean = clean_subset(bundle.train, _clean_train_size(bundle))
        self.train_eval_loader = make_loader(clean, cfg.batch_size, shuffle=False)

    # -- the run -------------------------------------------------------------------------------------------

    def run(self) -> tuple[nn.Module, FitResult]:
        epochs = self.cfg.epochs
        for epoch in range(self.start_epoch, epochs):
            if self.stopped_early:
                break
            start = time.perf_counter()
            averaging = self.swa is not None and epoch >= self.swa.start
            if averaging:
                self.swa.begin_epoch()
            train_loss, train_acc, times = self._train_epoch(epoch, step_schedule=not averaging)
            lr = self.schedule.lr
            eval_start = time.perf_counter()
            val_loss, val_acc = evaluate(
                self.model, self.val_loader, self.device, self._autocast, self.task, self.memory_format
            )
            train_eval_loss, train_eval_acc = evaluate(
                self.model, self.train_eval_loader, self.device, self._autocast, self.task, self.memory_format
            )
            times["eval_s"] = time.perf_counter() - eval_start
            if averaging:
                self.swa.end_epoch(self.model)
            else:
                self.schedule.step_epoch(val_loss)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "train_eval_loss": train_eval_loss,
                "train_eval_acc": train_eval_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": lr,
                "epoch_time_s": time.perf_counter() - start,
                **{k: round(v, 3) for k, v in times.items()},
            }
            self.history.append(row)
            self._early_stopping(row, epoch)
            if self.info.is_main:
                self._save(epoch)
            self.reporter.log(
                f"epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f} acc {train_acc:.2%} | "
                f"val loss {val_loss:.4f} acc {val_acc:.2%} | lr {lr:.3g} | {row['epoch_time_s']:.1f}s"
            )
            spike = val_loss_spike(self.history[-2:], epochs, self._chance_loss() if epoch == 0 else None)
            if spike is not None:  # said as it happens: the user may stop the run and fix the warm-up
                fixes = "; or ".join(spike["solutions"])
                self.reporter.log(f"[yellow]warning:[/yellow] {spike['evidence']} Try: {fixes}.")
        return self._finish()

    def _train_loader(self, epoch: int) -> DataLoader:
        train, batch_size, seed = self.bundle.train, self.cfg.batch_size, self.cfg.seed
        if hasattr(train, "set_epoch"):  # augmentations depend on (seed, epoch, sample): a resume replays them
            train.set_epoch(epoch)
        if self.info.distributed:
            loader = make_loader(train, batch_size, shuffle=True, seed=seed, distributed=True, drop_last=self.drop_last)
            loader.sampler.set_epoch(epoch)  # the sampler shuffles by (seed, epoch)
            return loader
        # A fresh generator per epoch makes the order a function of (seed, epoch), so a resumed run replays it.
        return make_loader(train, batch_size, shuffle=True, seed=seed + epoch, drop_last=self.drop_last)

    def _train_epoch(self, epoch: int, step_schedule: bool) -> tuple[float, float, dict[str, float]]:
        """The epoch's mean training loss (the criterion, with its regularization), train-mode accuracy, and where
        its time went: waiting for batches (data_s), optimizer steps (optimizer_s), forward and backward (compute_s)."""
        cfg, n = self.cfg, self.num_batches
        train_mode(self.model, self.plan.frozen)
        loss_sum, correct, count = 0.0, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        times = {"data_s": 0.0, "optimizer_s": 0.0}
        start = mark = time.perf_counter()
        with self.reporter.task(f"epoch {epoch + 1}/{cfg.epochs}", total=n) as bar:
            for b, (x, y, *extras) in enumerate(self._train_loader(epoch)):
                times["data_s"] += time.perf_counter() - mark
                x, y = _inputs(x, self.device, self.memory_format), y.to(self.device, non_blocking=True)
                extras = tuple(e.to(self.device, non_blocking=True) for e in extras)
                target = y
                if self.mixup_alpha > 0:
                    if extras:  # checked on the first batch, before any step
                        raise DeploykitError(
                            "MixUp mixes images and labels but not the extra per-sample items this training set "
                            "yields (e.g. cached teacher logits): set data.augment.mixup_alpha to 0 or drop the extras."
                        )
                    x, target = mixup_batch(x, y, self.mixup_alpha, self.bundle.num_classes)
                window_start = b - b % cfg.accumulate_steps
                window = min(cfg.accumulate_steps, n - window_start)  # the epoch's last window may be shorter
                is_step = b + 1 == window_start + window
                # Gradients are all-reduced only on the backward that precedes an optimizer step.
                sync = self.net.no_sync() if self.info.distributed and not is_step else contextlib.nullcontext()
                with sync:
                    with self._autocast():
                        logits = self.net(x)
                    loss = self.criterion(logits.float(), x, target, extras)
                    value = self._checked_loss(loss, epoch, b)
                    scaled = loss / window
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                if is_step:
                    step_start = time.perf_counter()
                    self._optimizer_step(step_schedule)
                    times["optimizer_s"] += time.perf_counter() - step_start
                loss_sum += value * len(x)
                correct += self._batch_score(logits.detach(), target)
                count += len(x)
                bar.update(loss=loss_sum / count, acc=correct / count, lr=self.schedule.lr)
                bar.advance()
                mark = time.perf_counter()
        times["compute_s"] = time.perf_counter() - start - times["data_s"] - times["optimizer_s"]
        ddp.broadcast_buffers(self.model, self.info)
        loss_sum, correct, count = ddp.all_reduce_sum([loss_sum, correct, count], self.device, self.info)
        return loss_sum / count, correct / count, times

    def _batch_score(self, logits: torch.Tensor, target: torch.Tensor) -> float:
        """Correct predictions in a training batch; with a user metric, the batch's metric times its size (the
        epoch's train metric is then a mean over batches, an estimate: the exact one is train_eval_acc)."""
        if self.task.user_metric is not None:
            return call_metric(self.task, logits.float().cpu(), target.cpu()) * len(target)
        labels = target.argmax(dim=1) if target.is_floating_point() else target
        return int((logits.argmax(dim=1) == labels).sum())

    def _checked_loss(self, loss: torch.Tensor, epoch: int, batch: int) -> float:
        """The batch loss as a float, raising TrainingDiverged when it is NaN/Inf on any rank."""
        value = loss.item()
        # Summed over ranks, a NaN anywhere reaches every rank: all raise together instead of leaving the others
        # waiting in the next all-reduce.
        (total,) = ddp.all_reduce_sum([value], self.device, self.info)
        if not math.isfinite(total):
            raise TrainingDiverged(
                total, epoch + 1, batch + 1, self.num_batches, self.step + 1, self.schedule.lr, self.cfg.grad_clip_norm
            )
        return value

    def _optimizer_step(self, step_schedule: bool) -> None:
        self.step += 1
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # checks and clipping must see the true gradients
        if self.monitor.due(self.step):
            self.monitor.check(self.model, self.step, skip_nonfinite=self.scaler is not None)
        if self.cfg.grad_clip_norm:
            norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm))
            self.clip["max_pre_clip_norm"] = max(self.clip["max_pre_clip_norm"], norm)
            self.clip["clipped_steps"] += int(norm > self.cfg.grad_clip_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if step_schedule:
            self.schedule.step_batch()

    def _samples_per_s(self) -> float | None:
        seconds = sum(h.get("data_s", 0.0) + h.get("compute_s", 0.0) + h.get("optimizer_s", 0.0) for h in self.history)
        return len(self.history) * len(self.bundle.train) / seconds if seconds > 0 else None

    def _chance_loss(self) -> float | None:
        """Cross-entropy of a uniform guess, ln(classes): what a first epoch's val loss is judged against."""
        classes = self.bundle.num_classes
        return math.log(classes) if classes and classes > 1 and not self.task.user_loss else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _early_stopping(self, row: dict[str, float], epoch: int) -> None:
        if self.stopper is None:
            return
        if self.stopper.update(row, epoch):
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.stopped_early = ddp.broadcast_flag(self.stopper.should_stop, self.device, self.info)
        if self.stopped_early:
            self.reporter.log(
                f"early stopping: {self.cfg.early_stopping.monitor} has not improved for {self.stopper.bad_epochs} "
                f"epochs; keeping epoch {self.stopper.best_epoch + 1}."
            )

    # -- checkpoint and resume -----------------------------------------------------------------------------

    def _budget_epochs(self, budget_s: float) -> int:
        """The epochs (at most cfg.epochs) that fit in `budget_s`: a run being resumed keeps its own choice, else
        a few training steps of a throwaway copy of the model are timed, and evaluation is added at its share."""
        path = self.work_dir / LAST_CHECKPOINT
        if path.exists():
            state = load_torch(path, "training checkpoint")
            if isinstance(state, dict) and state.get("format") == _CHECKPOINT_FORMAT:
                return int(state["epochs"])
        per_batch = self._time_steps(copy.deepcopy(self.model))
        evaluated = len(self.bundle.val) + _clean_train_size(self.bundle)
        # A forward alone costs about a third of a training step (forward + backward + update).
        epoch_s = per_batch * (self.num_batches + evaluated / self.cfg.batch_size / 3)
        fits = max(1, min(self.cfg.epochs, int(budget_s // epoch_s)))
        # Ranks may time differently: all take the mean, so every rank builds the same schedule.
        (total,) = ddp.all_reduce_sum([float(fits)], self.device, self.info)
        epochs = int(total // self.info.world_size)
        self.reporter.log(
            f"time budget {budget_s:g} s: about {epoch_s:.1f} s an epoch ({per_batch * 1e3:.0f} ms a batch), so "
            f"{epochs} epoch(s)" + (f" (the cap, epochs: {self.cfg.epochs})" if epochs == self.cfg.epochs else "")
        )
        return epochs

    def _time_steps(self, probe: nn.Module, batches: int = 6) -> float:
        """Seconds per training step of `probe`, batch loading included: the median over `batches` steps (the first
        step, which sets kernels up, not counted). A median, since one stall in six steps once made the mean 1.4x the
        epochs' real pace, and the budget bought 7 epochs where 10 fitted."""
        probe.train()
        optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
        steps: list[float] = []
        last = 0.0
        for b, (x, y, *extras) in enumerate(self._train_loader(0)):
            x, y = _inputs(x, self.device, self.memory_format), y.to(self.device)
            with self._autocast():
                logits = probe(x)
            self.criterion(logits.float(), x, y, tuple(e.to(self.device) for e in extras)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            if b >= 1:
                steps.append(now - last)
            last = now
            if len(steps) == batches:
                break
        return statistics.median(steps) if steps else 0.0

    def _save(self, epoch: int) -> None:
        save_torch(
            {
                "format": _CHECKPOINT_FORMAT,
                "epoch": epoch,
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "swa": self.swa.state_dict() if self.swa else None,
                "early_stopping": self.stopper.state_dict() if self.stopper else None,
                "best_state": self.best_state,
                "stopped_early": self.stopped_early,
                "history": self.history,
                "monitor": self.monitor.state_dict(),
                "clip": self.clip,
                "rng": rng_state(),
                "epochs": self.cfg.epochs,  # with a time budget, what the estimate chose: a resume keeps it
            },
            self.work_dir / LAST_CHECKPOINT,
        )

    def _resume(self) -> None:
        path = self.work_dir / LAST_CHECKPOINT
        if not path.exists():
            return
        state = load_torch(path, "training checkpoint")
        if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
            raise DeploykitError(
                f"The training checkpoint {path} is not one this version of fit() wrote: delete it to start afresh."
            )
        try:
            self.model.load_state_dict(state["model"])
            self.schedule.load_state_dict(state["schedule"])
            if self.swa:
                self.swa.load_state_dict(state["swa"])
            # Last: the schedulers above set lrs as they are built or loaded; the optimizer's saved values win.
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler:
                self.scaler.load_state_dict(state["scaler"])
            if self.stopper:
                self.stopper.load_state_dict(state["early_stopping"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise DeploykitError(
                f"The training checkpoint {path} does not fit this model or these train settings "
                f"({exc.__class__.__name__}): delete it to start afresh."
            ) from exc
        self.best_state = state["best_state"]
        self.stopped_early = state["stopped_early"]
        self.history, self.step, self.clip = state["history"], state["step"], state["clip"]
        self.monitor.load_state_dict(state["monitor"])
        set_rng_state(state["rng"])
        self.start_epoch = self.resumed_from = state["epoch"] + 1
        self.reporter.log(f"resuming from {path} after epoch {self.resumed_from}")

    # -- the end -------------------------------------------------------------------------------------------

    def _finish(self) -> tuple[nn.Module, FitResult]:
        final = self.model
        if self.swa is not None and self.swa.n_averaged > 0:
            final = self._swa_model()
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        # In fp32 whatever the training precision: the returned weights are fp32, and so is what gets exported.
        val_loss, val_acc = evaluate(final, self.val_loader, self.device, task=self.task)
        if self.cfg.activation_checkpointing:  # only a training-time setting; hand back a plain model
            final.activation_checkpointing = False
        final = final.cpu().to(memory_format=torch.contiguous_format).eval()  # plain strides for export and saving

        if self.stopper is not None and self.stopper.best_epoch >= 0:
            best = self.history[self.stopper.best_epoch]
        else:
            best = max(self.history, key=lambda h: h["val_acc"])
        metrics = {
            "val_acc": val_acc,
            "val_loss": val_loss,
            "best_val_acc": best["val_acc"],
            "best_epoch": best["epoch"],
            "epochs_run": len(self.history),
            "optimizer_steps": self.step,
            "world_size": self.info.world_size,
            "stopped_early": self.stopped_early,
            "train_time_s": sum(h["epoch_time_s"] for h in self.history),
            "precision": self.precision,
            "precision_why": self.precision_why,
            "time_split": _time_split(self.history),
            # Samples trained per second of training (batches waited for, forward, backward, steps; evaluation not).
            "train_samples_per_s": self._samples_per_s(),
            "swa": self.swa is not None,
            "resumed_from_epoch": self.resumed_from,
        }
        if self.swa is not None:
            metrics["swa_epochs_averaged"] = self.swa.n_averaged
        if self.plan.report:
            metrics["transfer"] = self.plan.report
        curves = classify_curves(self.history)
        diagnostics = {
            "gradients": self.monitor.summary(),
            "grad_clip": self.clip if self.cfg.grad_clip_norm else None,
            "curves": curves,
            "val_loss_spike": val_loss_spike(self.history, self.cfg.epochs, self._chance_loss()),
        }
        self.reporter.log(f"diagnosis: {curves['finding']}: {curves['evidence']}")
        ddp.barrier(self.info)
        return final, FitResult(history=self.history, metrics=metrics, diagnostics=diagnostics)

    def _swa_model(self) -> nn.Module:
        """The averaged weights with BatchNorm statistics re-estimated over the whole training split."""
        averaged = self.swa.model.module
        # update_bn resets every BatchNorm; frozen groups must keep the statistics they came with.
        frozen = {name: copy.deepcopy(averaged.get_submodule(name).state_dict()) for name in self.plan.frozen}
        # Every rank walks the whole (unshuffled) split so that all ranks end with the same statistics.
        loader = make_loader(self.bundle.train, self.cfg.batch_size, shuffle=False, drop_last=self.drop_last)
        with torch.no_grad():  # fp32 statistics, whatever the training precision: the model is used in fp32
            update_bn(loader, averaged, self.device)
        for name, state in frozen.items():
            averaged.get_submodule(name).load_state_dict(state)
        return averaged


def _memory_format(asked: str, model: nn.Module) -> torch.memory_format:
    """channels_last where asked, or (auto) for a model with 2-D convolutions; else the layout as given."""
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if asked == "channels_last" or (asked == "auto" and convolutional):
        return torch.channels_last
    return torch.contiguous_format


def _inputs(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """A batch on `device`, in `memory_format` where it has the 4 dimensions that format describes."""
    if x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=memory_format)
    return x.to(device, non_blocking=True)


def _clean_train_size(bundle: DataBundle) -> int:
    """How much of the train split is evaluated like val each epoch: as much as val has, within bounds."""
    return min(max(len(bundle.val), _MIN_CLEAN_TRAIN), _MAX_CLEAN_TRAIN)


def _time_split(history: list[dict]) -> dict[str, float]:
    """The fraction of the epochs' time each part took (data, compute, optimizer, eval), over every epoch run."""
    parts = ("data_s", "compute_s", "optimizer_s", "eval_s")
    totals = {p: sum(h.get(p, 0.0) for h in history) for p in parts}
    whole = sum(h["epoch_time_s"] for h in history) or 1.0
    return {p.removesuffix("_s"): round(t / whole, 3) for p, t in totals.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    task: Task | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[float, float]:
    """Mean loss (cross-entropy, or the task's own loss) and the task's metric (top-1 by default) of `model`
    (eval mode) over `loader`."""
    task = task or TOP1_CLASSIFICATION
    model.eval()
    loss_sum, count = 0.0, 0
    metric = task.accumulator()
    for x, y in loader:
        x, y = _inputs(x, device, memory_format), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        logits = logits.float()
        if task.user_loss:
            loss = task.loss(logits, y) * len(y)
        elif task.classes:
            loss = F.cross_entropy(logits, y, reduction="sum")
        else:  # per-pixel (or per-position) targets: the mean over them, so the scale matches the training loss
            loss = F.cross_entropy(logits, y) * len(y)
        loss_sum += float(loss)
        metric.update(logits, y)
        count += len(y)
    return loss_sum / count, metric.value()


def _pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DeploykitError("train.device is cuda but no CUDA GPU is available: set train.device to auto or cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _check_inputs(model: nn.Module, bundle: DataBundle, cfg: TrainConfig, device: torch.device, precision: str) -> None:
    """Fail before any work for settings that cannot run."""
    if precision == "fp16" and device.type != "cuda":
        raise DeploykitError(f"precision fp16 needs a CUDA GPU but training runs on {device.type}: use bf16 or fp32.")
    if cfg.activation_checkpointing and not hasattr(model, "activation_checkpointing"):
        raise DeploykitError(
            f"{type(model).__name__} does not support activation checkpointing: use a zoo model or set "
            "train.activation_checkpointing to false."
        )
    if cfg.swa and cfg.early_stopping:
        raise DeploykitError(
            "train.swa and train.early_stopping both choose the weights to return: enable only one of them."
        )
    if len(bundle.val) == 0:
        raise DeploykitError("The validation split is empty: raise data.val_fraction or add data.")


def _seed_everything(cfg: TrainConfig) -> None:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)


@contextlib.contextmanager
def _torch_settings(cfg: TrainConfig) -> Iterator[None]:
    """Apply cfg.threads and cfg.deterministic for the run, then give later stages torch's settings back."""
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic and torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


def _drop_last(model: nn.Module, samples: int, batch_size: int, world_size: int) -> bool:
    """Drop the last training batch only when it would hold one sample, which BatchNorm cannot train on."""
    per_rank = math.ceil(samples / world_size)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return has_bn and per_rank > batch_size and per_rank % batch_size == 1
