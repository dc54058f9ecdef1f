"""Transfer learning: start from a checkpoint, then freeze or slow down groups of the model by strategy.

Strategies follow the advanced cheat sheet's table:
- feature_extraction: every group but the head is frozen;
- partial: the first `freeze_stages` groups of `stage_groups()` (the stem is group 0) are frozen;
- full: nothing is frozen; discriminative lrs give the head lr x head_lr_mult and the stem plus the
  first half of the body stages lr x early_lr_mult.
Frozen groups are kept in eval mode during training (see `train_mode`), so their BatchNorm running
statistics and dropout stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deploykit.errors import DeploykitError
from deploykit.train.checkpoint import load_torch, state_dict_from
from deploykit.train.config import TransferConfig

_WHAT = "transfer checkpoint"


@dataclass
class TransferPlan:
    """What fit() needs from transfer: lr multipliers for build_optimizer, groups to keep frozen, a load report."""

    lr_mults: dict[str, float] | None = None
    frozen: list[str] = field(default_factory=list)  # submodule names (get_submodule paths)
    report: dict[str, Any] = field(default_factory=dict)


def apply_transfer(model: nn.Module, cfg: TransferConfig) -> TransferPlan:
    """Load cfg.checkpoint into `model`, freeze by cfg.strategy and return the plan for the optimizer and loop."""
    groups = _stage_groups(model)
    report = load_pretrained(model, cfg)
    if cfg.strategy == "feature_extraction":
        frozen_groups = groups[:-1]
    elif cfg.strategy == "partial":
        if cfg.freeze_stages >= len(groups):
            raise DeploykitError(
                f"transfer.freeze_stages={cfg.freeze_stages} would freeze all {len(groups)} stage groups of the model, "
                f"head included: use at most {len(groups) - 1}."
            )
        frozen_groups = groups[: cfg.freeze_stages]
    else:
        frozen_groups = []
    frozen = [name for group in frozen_groups for name in group]
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    lr_mults = _discriminative_lrs(model, groups, cfg) if cfg.strategy == "full" else None
    return TransferPlan(lr_mults=lr_mults, frozen=frozen, report={**report, "strategy": cfg.strategy, "frozen": frozen})


def load_pretrained(model: nn.Module, cfg: TransferConfig) -> dict[str, Any]:
    """Copy the checkpoint's tensors into `model`; unless cfg.strict, skip keys that are unknown or differ in shape.

    Returns {"loaded", "skipped" (counts), "skipped_keys", "missing_keys" (model keys left as they were)}.
    """
    state = state_dict_from(load_torch(cfg.checkpoint, _WHAT), cfg.checkpoint, _WHAT)
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    if cfg.strict:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise DeploykitError(
                f"The {_WHAT} {cfg.checkpoint} does not match the model exactly: set transfer.strict to false "
                "to skip a head of another shape."
            ) from exc
        return _report(state, state, own)
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise DeploykitError(
            f"None of the {len(state)} tensors in the {_WHAT} {cfg.checkpoint} match the model: "
            "use a checkpoint of the same architecture."
        )
    model.load_state_dict(matching, strict=False)
    return _report(state, matching, own)


def _report(state: dict, loaded: dict, own: dict) -> dict[str, Any]:
    """Counts for the run's metrics, with the names behind them."""
    skipped, missing = sorted(set(state) - set(loaded)), sorted(set(own) - set(loaded))
    return {"loaded": len(loaded), "skipped": len(skipped), "skipped_keys": skipped, "missing_keys": missing}


def train_mode(model: nn.Module, frozen: list[str]) -> None:
    """model.train(), except that frozen groups stay in eval mode so BatchNorm statistics do not move."""
    model.train()
    for name in frozen:
        model.get_submodule(name).eval()


def _stage_groups(model: nn.Module) -> list[list[str]]:
    if not hasattr(model, "stage_groups"):
        raise DeploykitError(
            f"Transfer learning needs a model with stage_groups(), which {type(model).__name__} lacks: use a zoo model."
        )
    return model.stage_groups()


def _discriminative_lrs(model: nn.Module, groups: list[list[str]], cfg: TransferConfig) -> dict[str, float]:
    stem, *body, head = groups
    early = stem + [name for group in body[: len(body) // 2] for name in group]
    mults = {name: cfg.early_lr_mult for name in early} | {name: cfg.head_lr_mult for name in head}
    # Parameter-free members (activations, pooling) would match no parameter name, which build_optimizer rejects.
    return {name: m for name, m in mults.items() if _has_params(model.get_submodule(name))}


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None
