"""PyTorch eager models behind the Session interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploykit.runtime.base import Session, as_input


class TorchSession(Session):
    def __init__(self, model: nn.Module, threads: int | None, name: str) -> None:
        self.model = model.eval()
        self.threads = threads
        self.name, self.precision = name, "fp32"
        self.path: Path | None = None  # open_artifact sets the model directory
        reference = next(model.parameters(), None)
        self.device = reference.device if reference is not None else torch.device("cpu")

    def run(self, x: np.ndarray) -> np.ndarray:
        # torch's thread count is process-wide: set it for this call only and give the old one back.
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(as_input(x)).to(self.device))
        finally:
            torch.set_num_threads(previous)
        return logits.float().cpu().numpy()


def torch_session(model: nn.Module, threads: int | None = None, name: str = "torch-fp32") -> Session:
    """Run `model` in eval mode under inference_mode, with `threads` intra-op threads while it runs."""
    return TorchSession(model, threads, name)
