"""fit() under torchrun: two gloo processes on CPU train one model and end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from deploykit.serve.process import free_port

TESTS = Path(__file__).resolve().parent


def test_two_process_ddp_training_agrees(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(TESTS / "ddp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]

    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["hash"] == reports[1]["hash"]  # weights and BatchNorm statistics alike
    assert reports[0]["swa_hash"] == reports[1]["swa_hash"]
    assert (tmp_path / "work0" / "last.pt").exists()
    assert not (tmp_path / "work1" / "last.pt").exists()
    for report in reports:
        metrics = report["metrics"]
        assert metrics["val_acc"] > 0.9 and metrics["epochs_run"] == 2
        assert metrics["optimizer_steps"] == 2 * 256 // 16  # each rank read its half of the 512 samples
        assert report["swa_metrics"]["swa"] and report["swa_metrics"]["val_acc"] > 0.9
