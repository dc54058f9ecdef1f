"""One torchrun worker of tests/test_ddp.py: fit() a tiny model for 2 epochs with gloo, plainly and with SWA.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR
Writes OUT_DIR/rank{r}.json with hashes of the final weights and the metrics of both runs; rank r trains in
OUT_DIR/work{r} (and swa{r}), so the test can tell which ranks wrote a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from test_train_loop import config, separable_bundle, tiny  # the script's folder is on sys.path

from deploykit.train import fit
from deploykit.train.distributed import init_from_env, shutdown


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    info = init_from_env("cpu")
    bundle = separable_bundle(n_train=512)
    # Ranks start from different weights: DDP must broadcast rank 0's.
    model, result = fit(tiny(seed=info.rank), bundle, config(epochs=2, batch_size=16), out / f"work{info.rank}")
    # A second fit in the same process group, averaging the last epoch: SWA's BatchNorm pass must agree too.
    swa_cfg = config(epochs=2, batch_size=16, swa={"start_epoch": 1})
    swa_model, swa_result = fit(tiny(seed=info.rank), bundle, swa_cfg, out / f"swa{info.rank}")
    report = {
        "rank": info.rank,
        "world_size": info.world_size,
        "hash": weights_hash(model),
        "metrics": result.metrics,
        "swa_hash": weights_hash(swa_model),
        "swa_metrics": swa_result.metrics,
    }
    (out / f"rank{info.rank}.json").write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    assert "RANK" in os.environ, "run me with torchrun"
    main(Path(sys.argv[1]))
