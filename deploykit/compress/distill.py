"""Knowledge distillation (Hinton et al., 2015): the loss, a fit() criterion that takes the teacher's logits from
the batch (cached) or by running the teacher (online), and the one-pass logit cache.

Caching is exact only when a sample is the same tensor every epoch, i.e. without augmentation; with it the
teacher must see the very image the student sees, so it runs online.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from deploykit.data import make_loader, plain_item


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float,
    temperature: float,
    hard: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * hard(student, target).

    T^2 keeps the soft term's gradients on the scale of the hard term's as T grows. `target` may be class
    indices or (MixUp) class probabilities; `hard` is cross-entropy or the pipeline's own loss. The KL is a mean
    over the class distributions along dim 1: one per sample for a classifier, one per pixel for a segmenter.
    """
    t = temperature
    log_student, log_teacher = F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1)
    distributions = student_logits.numel() // student_logits.shape[1]
    soft = F.kl_div(log_student, log_teacher, log_target=True, reduction="sum") / distributions
    return alpha * t * t * soft + (1 - alpha) * hard(student_logits, target)


class DistillationLoss:
    """A fit() criterion: kd_loss against the teacher logits a batch carries as its first extra item (cached
    mode), or else against the teacher run on the batch's x, in eval mode without gradients (online mode)."""

    def __init__(
        self,
        alpha: float,
        temperature: float,
        teacher: nn.Module | None = None,
        hard: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    ) -> None:
        self.alpha, self.temperature, self.hard = alpha, temperature, hard
        self.teacher = teacher.eval() if teacher is not None else None
        self._device: torch.device | None = None

    def __call__(self, logits: Tensor, x: Tensor, target: Tensor, extras: tuple[Tensor, ...]) -> Tensor:
        teacher_logits = extras[0] if extras else self.run_teacher(x)
        return kd_loss(logits, teacher_logits.float(), target, self.alpha, self.temperature, self.hard)

    @torch.no_grad()
    def run_teacher(self, x: Tensor) -> Tensor:
        if self.teacher is None:
            raise ValueError("online distillation needs a teacher; this batch carries no cached teacher logits")
        if self._device != x.device:  # follow the student to whatever device fit() picked, once
            self.teacher.to(x.device)
            self._device = x.device
        return self.teacher(x)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, dataset: Dataset, batch_size: int) -> Tensor:
    """The teacher's logits for every sample of `dataset`, in index order, as a CPU float32 [N, classes] tensor."""
    teacher.eval()
    return torch.cat([teacher(x).float().cpu() for x, *_ in make_loader(dataset, batch_size, shuffle=False)])


class WithTeacherLogits(Dataset):
    """`dataset` whose samples also carry their cached teacher logits: (x, y, logits)."""

    def __init__(self, dataset: Dataset, logits: Tensor) -> None:
        if len(dataset) != len(logits):
            raise ValueError(f"{len(logits)} cached logits for a dataset of {len(dataset)} samples")
        self.dataset, self.logits = dataset, logits

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return (*self.dataset[index], self.logits[index])

    def item(self, index: int, augment: bool) -> tuple:
        """(x, y) of the wrapped split, without the logits (and without its augmentation if it has one to skip)."""
        return plain_item(self.dataset, index, augment)
