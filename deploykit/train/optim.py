"""Optimizers: parameter groups (weight decay on weights only, discriminative lrs) and the optimizer by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from deploykit.errors import DeploykitError
from deploykit.train.config import OptimizerConfig

# Normalisation layers: their weights are scales, and decaying them towards 0 hurts (LayerNorm's can be >1-d).
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
_ADAM_DEFAULT_BETAS = (0.9, 0.999)
_LION_DEFAULT_BETAS = (0.9, 0.99)


def param_groups(model: nn.Module, cfg: OptimizerConfig, lr_mults: dict[str, float] | None = None) -> list[dict]:
    """Split the trainable parameters by lr multiplier and by whether they get weight decay.

    Only conv/linear-style weights (ndim > 1, outside norm layers) are decayed unless cfg.decay_norm_and_bias.
    `lr_mults` maps a parameter-name prefix to an lr multiplier; a prefix matches whole dotted components
    ("layer1" covers "layer1.0.conv1.weight", not "layer10.weight") and the longest matching prefix wins.
    Parameters sharing a multiplier share a group, so a per-module `lr_mults` does not explode the group count.
    Groups carry 'params', 'lr', 'weight_decay', 'name' and 'lr_mult'; the base (x1) groups come first.
    """
    lr_mults = lr_mults or {}
    names = [name for name, _ in model.named_parameters()]
    for prefix in lr_mults:
        if not any(_matches(name, prefix) for name in names):
            raise DeploykitError(
                f"The lr multiplier prefix {prefix!r} matches no parameter of the model; "
                "use a module name from model.named_parameters()."
            )
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters(recurse=False)}

    # Pre-seeded so group order is stable: base groups first (their lr is what gets logged), then each multiplier.
    mults = dict.fromkeys([1.0, *lr_mults.values()])
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {(m, decay): [] for m in mults for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            prefix = _longest_prefix(name, lr_mults)
            decay = cfg.decay_norm_and_bias or (p.ndim > 1 and id(p) not in norm_params)
            buckets[(lr_mults[prefix] if prefix is not None else 1.0, decay)].append(p)

    groups = []
    for (mult, decay), params in buckets.items():
        if params:
            groups.append(
                {
                    "params": params,
                    "lr": cfg.lr * mult,
                    "lr_mult": mult,
                    "weight_decay": cfg.weight_decay if decay else 0.0,
                    "name": f"{'base' if mult == 1.0 else f'lr_x{mult:g}'}/{'decay' if decay else 'no_decay'}",
                }
            )
    return groups


def _matches(name: str, prefix: str) -> bool:
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _longest_prefix(name: str, lr_mults: dict[str, float]) -> str | None:
    return max((p for p in lr_mults if _matches(name, p)), key=len, default=None)


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, lr_mults: dict[str, float] | None = None
) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over `param_groups(model, cfg, lr_mults)`."""
    groups = param_groups(model, cfg, lr_mults)
    if not groups:
        raise DeploykitError("The model has no trainable parameters; unfreeze at least one layer before training.")
    factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "sgd": lambda: _sgd(groups, cfg),
        "adagrad": lambda: torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps),
        "rmsprop": lambda: torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum),
        "adam": lambda: torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps),
        "adamw": lambda: torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps),
        "lion": lambda: Lion(
            groups, lr=cfg.lr, betas=_LION_DEFAULT_BETAS if tuple(cfg.betas) == _ADAM_DEFAULT_BETAS else cfg.betas
        ),
    }
    return factories[cfg.name]()


def _sgd(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.SGD:
    if cfg.nesterov and cfg.momentum == 0:
        raise DeploykitError(
            "optimizer.nesterov needs optimizer.momentum > 0; set momentum (e.g. 0.9) or nesterov: false."
        )
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    update = sign(beta1 m + (1 - beta1) g); p <- p - lr (update + wd p); m <- beta2 m + (1 - beta2) g.
    Every coordinate moves by exactly lr, so use an lr about 3-10x smaller than AdamW's and a larger weight decay.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = _LION_DEFAULT_BETAS,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid Lion hyper-parameters lr={lr}, betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                update = m.lerp(p.grad, 1 - beta1).sign_()  # beta1 m + (1 - beta1) g
                p.mul_(1 - lr * wd).add_(update, alpha=-lr)  # decoupled weight decay, as in AdamW
                m.lerp_(p.grad, 1 - beta2)
        return loss
