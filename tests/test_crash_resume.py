"""Crash anywhere: `deploykit optimize` SIGKILLed at seeded random moments, resumed, and judged against a run
that was never interrupted.

One chain of runs on a tiny real pipeline (train -> prune -> export -> quantize): ten seeded moments on an
uninterrupted run's timeline, in order, each one the kill of the next run, so the kills land in start-up, in
the stages and between them, and each resume starts from whatever the last kill left. After every kill each stage folder
present must be complete (its artifacts hash to what its meta.json says) and hold the reference run's models;
every run that finishes must hold exactly the reference run's models.
"""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deploykit.artifacts import MODEL_ROLES
from deploykit.files import sha256_file

KILLS = 10
SEED = 20261206

PIPELINE = {
    "name": "crash",
    "data": {"dataset": "synthetic", "image_size": 8, "channels": 1, "num_samples": 64, "num_classes": 4},
    "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
    "stages": [
        {"stage": "train", "epochs": 3, "batch_size": 16},
        {"stage": "prune", "method": "structured", "target_macs_ratio": 0.5, "finetune": {"epochs": 1}},
        {"stage": "export", "parity_batch_sizes": [1]},
        {
            "stage": "quantize",
            "method": "ptq",
            "calibrate_method": "minmax",
            "calibration_samples": 32,
            "parity_samples": 32,
            "latency_rounds": 1,
            "latency_window_s": 0.05,
        },
    ],
}
STAGES = [s["stage"] for s in PIPELINE["stages"]]


def _start(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deploykit", "optimize", "-c", "p.yaml", "-q"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, within_s: float = 300) -> None:
    """Wait for a run to succeed; TimeoutExpired if it is still running after `within_s`."""
    _, err = proc.communicate(timeout=within_s)
    assert proc.returncode == 0, err[-3000:]


def _complete_stages(run_dir: Path) -> dict[str, dict[str, str]]:
    """Stage name -> {model role: sha256} of every stage folder, after checking each artifact against meta.json."""
    stages = {}
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta_path = folder / "meta.json"
        assert meta_path.is_file(), f"stage folder {folder.name} has no meta.json: a half-written stage"
        meta = json.loads(meta_path.read_text())
        for role, entry in meta["artifacts"].items():
            path = folder / entry["path"]
            assert path.is_file() and sha256_file(path) == entry["sha256"], f"{folder.name}/{entry['path']} altered"
        # Models must be bit-identical to the reference; histories and reports hold timings, so they may not be.
        stages[folder.name] = {r: e["sha256"] for r, e in meta["artifacts"].items() if r in MODEL_ROLES}
    return stages


def _running_stage(run_dir: Path) -> str:
    """Where a run was when it was killed: the stage whose temporary folder exists, else 'between stages'."""
    running = [p.name.removeprefix(".tmp-").rsplit("-", 1)[0] for p in run_dir.glob(".tmp-*")]  # .tmp-<stage>-<pid>
    return running[0] if running else "start-up or between stages"


@pytest.mark.slow
@pytest.mark.side
def test_sigkill_at_ten_random_moments_resumes_to_the_uninterrupted_result(in_tmp):
    (in_tmp / "p.yaml").write_text(yaml.safe_dump(PIPELINE))
    run_dir = in_tmp / "runs/crash"

    t0 = time.perf_counter()
    _finish(_start(in_tmp))
    uninterrupted_s = time.perf_counter() - t0
    reference = _complete_stages(run_dir)
    assert sorted(reference) == sorted(STAGES) and all(reference[s] for s in STAGES)
    stage_s = {s: json.loads((run_dir / s / "meta.json").read_text())["wall_time_s"] for s in STAGES}
    shutil.rmtree(run_dir)

    rng = random.Random(SEED)
    where: list[str] = []
    finished_runs = 0
    while len(where) < KILLS:
        # Moments on the uninterrupted run's timeline, in order. A resumed run skips the stages already complete,
        # so the same moment comes that much sooner in it.
        for moment in sorted(rng.uniform(0, uninterrupted_s) for _ in range(KILLS - len(where))):
            done = set(_complete_stages(run_dir)) if run_dir.exists() else set()
            skipped_s = sum(t for s, t in stage_s.items() if s in done)
            proc = _start(in_tmp)
            try:
                _finish(proc, within_s=max(0.2, moment - skipped_s))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=30)
                where.append(_running_stage(run_dir))
                partial = _complete_stages(run_dir) if run_dir.exists() else {}
                assert all(partial[s] == reference[s] for s in partial), f"kill {len(where)} in {where[-1]}"
                continue
            finished_runs += 1  # it finished first: a whole result, then start over
            assert _complete_stages(run_dir) == reference
            shutil.rmtree(run_dir)

    _finish(_start(in_tmp))
    assert _complete_stages(run_dir) == reference
    assert not list(run_dir.glob(".tmp-*")) and not list(run_dir.glob(".trash-*"))
    # The kills were spread: at least two different stages (or start-up) were interrupted.
    assert len(set(where)) >= 2, where
    assert finished_runs < KILLS  # most runs were killed, not left to finish
