"""The engine: content-hash cache, invalidation, --force/--until, atomic folders, SIGKILL and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import plugin_stages  # noqa: F401  (registers the `append` test stage)
import pytest

from deploykit.errors import DeploykitError
from deploykit.pipeline.engine import _RunLock, run_pipeline
from deploykit.pipeline.loader import parse_pipeline

TESTS = Path(__file__).parent


def pipeline(b_text="B", name="chain"):
    return parse_pipeline(
        {
            "name": name,
            "data": {"dataset": "synthetic", "image_size": 8, "num_samples": 20},
            "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
            "stages": [
                {"stage": "append", "name": "a", "text": "A"},
                {"stage": "append", "name": "b", "text": b_text},
                {"stage": "append", "name": "c", "text": "C"},
            ],
        }
    )


@pytest.fixture
def counter(in_tmp, monkeypatch):
    path = in_tmp / "counter.txt"
    monkeypatch.setenv("DEPLOYKIT_TEST_COUNTER", str(path))
    return lambda: path.read_text().split() if path.exists() else []


def statuses(outcomes):
    return {o.name: o.status for o in outcomes}


def test_first_run_writes_artifacts_and_meta(counter, in_tmp):
    outcomes = run_pipeline(pipeline())
    assert statuses(outcomes) == {"a": "ran", "b": "ran", "c": "ran"}
    assert (in_tmp / "runs/chain/c/out.txt").read_text() == "ABC"
    meta = json.loads((in_tmp / "runs/chain/b/meta.json").read_text())
    assert meta["artifacts"]["text"]["bytes"] == 2 and len(meta["key"]) == 64
    assert set(meta["inputs"]) == {"a"} and meta["metrics"] == {"length": 2}
    assert "torch" in meta["versions"] and len(meta["machine"]["load_avg"]) == 3
    run = json.loads((in_tmp / "runs/chain/run.json").read_text())
    assert [s["status"] for s in run["stages"]] == ["ran"] * 3


def test_second_run_is_cached(counter):
    run_pipeline(pipeline())
    outcomes = run_pipeline(pipeline())
    assert statuses(outcomes) == {"a": "cached", "b": "cached", "c": "cached"}
    assert counter() == ["a", "b", "c"]


def test_changed_stage_reruns_it_and_later_ones(counter, in_tmp):
    run_pipeline(pipeline())
    outcomes = run_pipeline(pipeline(b_text="B2"))
    assert statuses(outcomes) == {"a": "cached", "b": "ran", "c": "ran"}
    assert (in_tmp / "runs/chain/c/out.txt").read_text() == "AB2C"


def test_force_and_until(counter, in_tmp):
    outcomes = run_pipeline(pipeline(), until="b")
    assert statuses(outcomes) == {"a": "ran", "b": "ran"}
    assert not (in_tmp / "runs/chain/c").exists()
    outcomes = run_pipeline(pipeline(), force=["b"])
    assert statuses(outcomes) == {"a": "cached", "b": "ran", "c": "ran"}
    with pytest.raises(DeploykitError, match="--force 'x' is not a stage"):
        run_pipeline(pipeline(), force=["x"])


def test_tampered_artifact_is_rebuilt(counter, in_tmp):
    run_pipeline(pipeline())
    (in_tmp / "runs/chain/a/out.txt").write_text("tampered")
    outcomes = run_pipeline(pipeline())
    assert statuses(outcomes)["a"] == "ran"
    assert (in_tmp / "runs/chain/a/out.txt").read_text() == "A"


def test_failing_stage_keeps_previous_folder_and_leaves_no_temp(counter, in_tmp):
    run_pipeline(pipeline())
    with pytest.raises(RuntimeError, match="on purpose"):
        run_pipeline(pipeline(b_text="FAIL"))
    run_dir = in_tmp / "runs/chain"
    assert (run_dir / "b/out.txt").read_text() == "AB"  # the last complete result, untouched
    assert not list(run_dir.glob(".tmp-*"))


def test_concurrent_run_is_refused(in_tmp):
    run_dir = in_tmp / "runs/chain"
    run_dir.mkdir(parents=True)
    with _RunLock(run_dir), pytest.raises(DeploykitError, match="Another deploykit process"):
        run_pipeline(pipeline())


def test_sigkill_mid_stage_leaves_no_half_artifact_and_resumes(counter, in_tmp):
    import yaml

    cfg = pipeline().model_dump(mode="json", exclude_none=True)
    (in_tmp / "p.yaml").write_text(yaml.safe_dump(cfg))
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import plugin_stages; from deploykit.cli import app; app(['optimize', '-c', 'p.yaml', '-q'])"
    env = dict(os.environ, DEPLOYKIT_TEST_PAUSE_STAGE="b", DEPLOYKIT_TEST_PAUSE="60")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=in_tmp)
    run_dir = in_tmp / "runs/chain"
    deadline = time.time() + 60
    while not any(p.stat().st_size for p in run_dir.glob(".tmp-b-*/out.txt")):  # b has written half its file
        assert time.time() < deadline and proc.poll() is None, "stage b never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (run_dir / "a/meta.json").is_file()
    assert not (run_dir / "b").exists() and not (run_dir / "c").exists()

    outcomes = run_pipeline(pipeline())
    assert statuses(outcomes) == {"a": "cached", "b": "ran", "c": "ran"}
    assert (run_dir / "c/out.txt").read_text() == "ABC"
    assert not list(run_dir.glob(".tmp-*"))


def test_atomic_writes_get_the_mode_of_a_plain_open_and_leave_no_temp_file(tmp_path):
    from deploykit.files import atomic_path, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "b.txt").write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "c.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
