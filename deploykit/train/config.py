"""Pipeline-file settings for the training stage: every knob typed, defaulted and described."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OptimizerName = Literal["sgd", "adagrad", "rmsprop", "adam", "adamw", "lion"]
ScheduleName = Literal[
    "constant",
    "step",
    "multistep",
    "exponential",
    "cosine",
    "cosine_restarts",
    "onecycle",
    "warmup_cosine",
    "inverse_sqrt",
    "plateau",
    "polynomial",
]
LossName = Literal["cross_entropy", "nll", "bce_with_logits", "mse", "l1", "smooth_l1", "huber", "kl_div"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimizerConfig(_Strict):
    """Optimizer and its hyper-parameters; defaults follow the advanced cheat sheet's table."""

    name: OptimizerName = Field("sgd", description="sgd (with momentum/nesterov), adagrad, rmsprop, adam, adamw or lion.")
    lr: float = Field(0.1, gt=0.0, description="Base learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd/rmsprop momentum (beta = 0.9 in the cheat sheet).")
    nesterov: bool = Field(False, description="sgd only: Nesterov momentum.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam/adamw betas; lion uses (0.9, 0.99) if left at the default.")
    alpha: float = Field(0.99, gt=0.0, lt=1.0, description="rmsprop smoothing constant rho.")
    eps: float = Field(1e-8, gt=0.0, description="Numerical stability term for adaptive methods.")
    weight_decay: float = Field(5e-4, ge=0.0, description="Applied to weights only: norms and biases get none.")
    decay_norm_and_bias: bool = Field(False, description="Also decay normalisation weights and biases (usually worse).")


class ScheduleConfig(_Strict):
    """Learning-rate schedule; which fields matter depends on `name`."""

    name: ScheduleName = Field("cosine", description="Learning-rate schedule.")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up length in epochs (warmup_cosine, cosine, inverse_sqrt).")
    step_size: int = Field(30, ge=1, description="step: epochs between decays.")
    milestones: list[int] = Field(default_factory=lambda: [30, 60, 90], description="multistep: epochs at which to decay.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step/multistep/exponential: decay factor.")
    min_lr: float = Field(0.0, ge=0.0, description="cosine/cosine_restarts/warmup_cosine/polynomial: final learning rate.")
    restart_epochs: int = Field(10, ge=1, description="cosine_restarts: length of the first cycle in epochs (T_0).")
    restart_mult: int = Field(1, ge=1, description="cosine_restarts: cycle length multiplier (T_mult).")
    max_lr: float | None = Field(None, gt=0.0, description="onecycle: peak learning rate (default: 10x the optimizer lr).")
    pct_start: float = Field(0.3, gt=0.0, lt=1.0, description="onecycle: fraction of steps spent increasing the lr.")
    power: float = Field(1.0, gt=0.0, description="polynomial: decay power.")
    patience: int = Field(3, ge=0, description="plateau: epochs without improvement before the lr drops.")
    factor: float = Field(0.1, gt=0.0, lt=1.0, description="plateau: lr multiplier on a plateau.")


class LossConfig(_Strict):
    """Training loss by name."""

    name: LossName = Field("cross_entropy", description="Loss function.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross_entropy only: typical 0.1.")


class SWAConfig(_Strict):
    """Stochastic weight averaging: average weights over the last epochs, then re-estimate BatchNorm."""

    start_epoch: int | None = Field(None, ge=0, description="First epoch (0-based) to average; default: 75% of the epochs.")
    lr: float | None = Field(None, gt=0.0, description="SWA learning rate; default: half the optimizer lr.")
    anneal_epochs: int = Field(1, ge=0, description="Epochs to anneal to the SWA learning rate.")


class EarlyStoppingConfig(_Strict):
    """Stop when the monitored validation metric stops improving."""

    monitor: Literal["val_loss", "val_acc"] = Field("val_loss", description="Validation metric to watch.")
    patience: int = Field(5, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as improvement.")


class TransferConfig(_Strict):
    """Start from a checkpoint file (a state_dict saved by deploykit or any matching state_dict)."""

    checkpoint: Path = Field(..., description="A .pt file holding a state_dict (loaded with weights_only=True).")
    strategy: Literal["feature_extraction", "partial", "full"] = Field(
        "full", description="feature_extraction: train the head only; partial: freeze the first `freeze_stages`; full: train all."
    )
    freeze_stages: int = Field(1, ge=0, description="partial: number of leading stages (stem counts as stage 0) to freeze.")
    head_lr_mult: float = Field(10.0, gt=0.0, description="Discriminative lr: head lr = base lr x this.")
    early_lr_mult: float = Field(0.1, gt=0.0, description="Discriminative lr: the first half of the body gets base lr x this.")
    strict: bool = Field(False, description="Require every key to match; default skips a head whose shape differs.")


class DiagnosticsConfig(_Strict):
    """The cheat sheet's debugging patterns, run during training."""

    grad_norm_every: int = Field(50, ge=1, description="Check per-layer gradient norms every N optimizer steps.")
    explode_threshold: float = Field(100.0, gt=0.0, description="A layer's gradient norm above this is flagged as exploding.")
    vanish_threshold: float = Field(1e-6, ge=0.0, description="A layer's gradient norm below this is flagged as vanishing.")


class TrainConfig(_Strict):
    """The training stage."""

    epochs: int = Field(10, ge=1, description="Number of epochs.")
    time_budget_s: float | None = Field(
        None,
        gt=0.0,
        description="Train for as many epochs as fit in this many seconds (at most `epochs`), estimated from a few "
        "timed batches before training starts, so the schedule is built for the epochs that will run.",
    )
    batch_size: int = Field(64, ge=1, description="Per-process batch size.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    grad_clip_norm: float | None = Field(None, gt=0.0, description="Clip the global gradient norm to this value.")
    accumulate_steps: int = Field(1, ge=1, description="Gradient accumulation: optimizer step every N batches.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on CPUs with AVX-512 BF16 or AMX-BF16 and on GPUs that have BF16, fp32 "
        "elsewhere (decided from the machine record); bf16: autocast on CPU or GPU; fp16: autocast with a grad "
        "scaler, CUDA only. Weights stay fp32.",
    )
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="auto: channels_last (NHWC) for models with 2-D convolutions, which oneDNN and cuDNN run faster "
        "(ResNet-18 training steps on an AMX Xeon: 1.2x in fp32, 1.3x more in bf16); contiguous: NCHW as given.",
    )
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    swa: SWAConfig | None = Field(None, description="Enable stochastic weight averaging.")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="Enable early stopping.")
    transfer: TransferConfig | None = Field(None, description="Start from a checkpoint (transfer learning).")
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when available.")
    deterministic: bool = Field(True, description="Seed everything and use deterministic algorithms.")
    seed: int = Field(0, description="Seed for initialisation, shuffling and augmentation.")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice).")
