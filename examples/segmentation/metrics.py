"""mIoU: the mean over classes of |prediction AND truth| / |prediction OR truth|, over the whole validation split.

deploykit calls `miou(outputs, targets)` with the model's outputs [N, K, H, W] and the masks [N, H, W] of every
validation sample at once; higher is better, a fraction in [0, 1] (budgets are in points: 100 x a difference).
"""

from __future__ import annotations

import torch


def miou(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    predicted = outputs.argmax(dim=1)
    ious = []
    for k in range(outputs.shape[1]):
        union = ((predicted == k) | (targets == k)).sum()
        if union > 0:  # a class absent from both says nothing
            ious.append(((predicted == k) & (targets == k)).sum() / union)
    return float(torch.stack(ious).mean())
