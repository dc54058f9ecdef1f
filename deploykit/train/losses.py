"""Training losses by name; each takes logits [B, C] and either class indices [B] or soft targets [B, C] (MixUp)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor

from deploykit.errors import DeploykitError
from deploykit.train.config import LossConfig

Loss = Callable[[Tensor, Tensor], Tensor]

# Regression-style losses compare logits with one-hot (or soft) target vectors element by element.
_ELEMENTWISE: dict[str, Callable[..., Tensor]] = {
    "bce_with_logits": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "smooth_l1": F.smooth_l1_loss,
    "huber": F.huber_loss,
}


def build_loss(cfg: LossConfig, num_classes: int) -> Loss:
    """The loss `cfg.name`; integer targets become one-hot wherever the loss needs a distribution or a vector."""
    if cfg.label_smoothing and cfg.name != "cross_entropy":
        raise DeploykitError(
            f"loss.label_smoothing only applies to cross_entropy, not {cfg.name}; set it to 0 or use cross_entropy."
        )
    if cfg.name == "cross_entropy":
        return partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)  # takes soft targets natively
    if cfg.name == "nll":
        return _nll
    if cfg.name == "kl_div":
        return partial(_kl_div, num_classes=num_classes)
    return partial(_elementwise, _ELEMENTWISE[cfg.name], num_classes=num_classes)


def _as_distribution(target: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """Soft targets pass through; class indices become one-hot rows in the logits' dtype."""
    if target.is_floating_point():
        return target.to(like.dtype)
    return F.one_hot(target, num_classes).to(like.dtype)


def _nll(logits: Tensor, target: Tensor) -> Tensor:
    log_probs = F.log_softmax(logits, dim=1)
    if target.is_floating_point():
        return -(target * log_probs).sum(dim=1).mean()
    return F.nll_loss(log_probs, target)


def _kl_div(logits: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """KL(target || softmax(logits)); F.kl_div uses xlogy, so the zeros of a one-hot target contribute exactly 0."""
    return F.kl_div(F.log_softmax(logits, dim=1), _as_distribution(target, num_classes, logits), reduction="batchmean")


def _elementwise(loss: Callable[..., Tensor], logits: Tensor, target: Tensor, num_classes: int) -> Tensor:
    return loss(logits, _as_distribution(target, num_classes, logits))
