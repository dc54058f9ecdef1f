"""Make what another tool would hand you: model.onnx and data.npz.

A small CNN trained here in plain PyTorch on scikit-learn's digits (they ship offline), as 16x16 grey images in
NHWC layout scaled to [0, 1] (no mean/std), then exported with the legacy TorchScript exporter at opset 13 with a
static batch of 1 and its own tensor names (`images` -> `scores`), as many published ONNX files are.
Usage: python make_model.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


class NhwcCnn(nn.Module):
    """Takes [N, H, W, 1] like a TensorFlow-style model; convolves in NCHW inside."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.permute(0, 3, 1, 2)).flatten(1))


def make(out: Path, seed: int = 0, epochs: int = 15) -> tuple[Path, Path]:
    torch.manual_seed(seed)
    digits = load_digits()
    x = (np.kron(digits.images / 16.0, np.ones((2, 2)))[..., None] * 255).astype(np.uint8)  # [N, 16, 16, 1]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:360], order[360:]
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "data.npz", x_train=x[train], y_train=y[train], x_val=x[val], y_val=y[val])

    model = NhwcCnn()
    xt, yt = torch.from_numpy(x[train]).float() / 255, torch.from_numpy(y[train])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.onnx.export(
        model, torch.zeros(1, 16, 16, 1), str(out / "model.onnx"), dynamo=False, opset_version=13,
        input_names=["images"], output_names=["scores"],
    )
    return out / "model.onnx", out / "data.npz"


if __name__ == "__main__":
    print(*make(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent), sep="\n")
