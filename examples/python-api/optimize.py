"""deploykit from Python, as in a notebook: a model class, datasets and a metric defined right here.

    python examples/python-api/optimize.py [EPOCHS]

The model and data live in this process only (nothing to import), so deploykit keys them by a digest of their code
and content; run it again and every stage comes from the cache.
"""

from __future__ import annotations

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import deploykit


class SmallNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def balanced_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean of per-class recalls: what top-1 hides when classes are uneven."""
    predicted = outputs.argmax(dim=1)
    recalls = [(predicted[targets == k] == k).float().mean() for k in targets.unique()]
    return float(torch.stack(recalls).mean())


def main(epochs: int = 4) -> deploykit.Result:
    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(digits.target).long()
    train, val = TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])
    torch.manual_seed(0)
    pipeline = {
        "name": "python-api",
        "task": "classification",  # targets are class indices; the metric below replaces top-1
        "stages": [
            {"stage": "train", "epochs": epochs, "batch_size": 64, "optimizer": {"name": "adamw", "lr": 0.005}},
            {"stage": "export"},
            {"stage": "quantize", "method": "ptq", "max_accuracy_drop": 1.0},
            {"stage": "report"},
        ],
    }
    result = deploykit.optimize(
        pipeline, model=SmallNet(), data=(train, val), metric=balanced_accuracy, metric_name="balanced accuracy"
    )
    print("deployable:", result.deployable.path, "on", result.deployable.runtime)
    print("train:", f"balanced accuracy {result.metrics('train')['val_acc']:.3f}")
    print("report:", result.report_path)
    return result


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
