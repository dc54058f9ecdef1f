"""The artifact contract: `latest`, `deployable`, and the one model that deploy, benchmark and report all name."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploykit.artifacts import ArtifactRef, Role, StageRecord, deployable, latest, model_kind, require
from deploykit.errors import DeploykitError


def _record(name: str, roles: tuple[str, ...] = (), pick: dict | None = None) -> StageRecord:
    artifacts = {role: {"path": f"{role}.bin", "sha256": f"{name}-{role}", "bytes": 1} for role in roles}
    return StageRecord(name, name, Path(name), {"artifacts": artifacts, "deployable": pick})


def test_latest_and_require_find_the_newest_file_of_a_role():
    upstream = [_record("export", ("onnx",)), _record("export2", ("onnx",)), _record("bench", ("benchmark",))]
    assert latest(upstream, Role.ONNX) == ArtifactRef(
        "export2", "onnx", Path("export2/onnx.bin"), "export2-onnx", "the newest 'onnx' artifact"
    )
    assert latest(upstream, Role.ONNX_INT8) is None
    with pytest.raises(DeploykitError, match="Stage 'deploy' needs a 'onnx_int8' artifact .* add such a stage"):
        require(upstream, Role.ONNX_INT8, "deploy")


def test_deployable_follows_the_newest_pick_even_to_an_earlier_stage():
    keep_fp32 = {"stage": "export", "role": "onnx", "reason": "INT8 is only 0.91x faster"}
    upstream = [_record("train", ("checkpoint",)), _record("export", ("onnx",)), _record("quantize", ("onnx_int8",), keep_fp32)]
    ref = deployable(upstream)
    assert (ref.key, ref.label, ref.sha256) == ("export/onnx", "export (onnx fp32)", "export-onnx")
    assert ref.why == "picked by the quantize stage: INT8 is only 0.91x faster"
    take_int8 = {"stage": "quantize", "role": "onnx_int8", "reason": "2.3x faster"}
    upstream[-1] = _record("quantize", ("onnx_int8",), take_int8)
    assert deployable(upstream).label == "quantize (onnx int8)"


def test_deployable_without_a_pick_is_the_newest_onnx_then_the_newest_checkpoint():
    assert deployable([]) is None
    torch_only = [_record("train", ("checkpoint",)), _record("prune", ("checkpoint",))]
    assert deployable(torch_only).key == "prune/checkpoint"
    exported = [*torch_only, _record("export", ("onnx",)), _record("quantize", ("onnx_int8",))]
    assert deployable(exported).key == "quantize/onnx_int8"
    assert deployable(exported[:3]).why == "the newest ONNX model (no stage picked one)"


def test_a_pick_of_a_missing_artifact_says_how_to_recover():
    upstream = [_record("quantize", ("onnx_int8",), {"stage": "gone", "role": "onnx", "reason": "r"})]
    with pytest.raises(DeploykitError, match="re-run the pipeline with --force quantize"):
        deployable(upstream)


def test_model_roles_and_side_files():
    assert model_kind("onnx_int8") == ("onnx", "int8") and model_kind("trt_fp8") == ("tensorrt", "fp8")
    assert model_kind("trt_fp16_meta") is None and model_kind("benchmark") is None


# ---- end to end: the guard's pick is what is served, benchmarked, reported and judged ------------------------


def _chain(runs: Path, int8_wins: bool) -> dict[str, dict]:
    """train -> export -> quantize (real ptq; its guard forced one way) -> benchmark -> deploy (real Triton) -> report."""
    from test_bench import BENCH_FAST, tiny_pipeline

    from deploykit.pipeline.engine import run_pipeline

    guard = {"min_speedup": 0.001, "max_accuracy_drop": None} if int8_wins else {"min_speedup": 1000.0}
    stages = [
        {"stage": "export", "parity_batch_sizes": [1], "max_batch": 4},
        {"stage": "quantize", "calibration_samples": 16, "latency_rounds": 1, "latency_window_s": 0.02,
         "latency_threads": 1, "parity_samples": 16, **guard},
        {"stage": "benchmark", **BENCH_FAST, "isolate": False, "threads": 1, "select": False},
        {"stage": "deploy", "duration_s": 0, "triton": {"threads": 1}},
        {"stage": "report"},
    ]  # fmt: skip
    outcomes = run_pipeline(tiny_pipeline(runs, stages))
    return {o.name: o.metrics for o in outcomes}


@pytest.mark.parametrize("int8_wins", [False, True], ids=["guard-rejects-int8", "guard-takes-int8"])
def test_the_model_picked_is_the_model_served_benchmarked_and_reported(tmp_path, int8_wins):
    import json

    from deploykit.files import sha256_file

    metrics = _chain(tmp_path, int8_wins)
    run = tmp_path / "tiny"
    expected = run / ("quantize/model.int8.onnx" if int8_wins else "export/model.onnx")
    label = "quantize (onnx int8)" if int8_wins else "export (onnx fp32)"
    served = metrics["deploy"]["served_model"]
    assert served["label"] == label and served["sha256"] == sha256_file(expected)
    assert metrics["deploy"]["passed"], metrics["deploy"]["checks_failed"]  # real Triton answered with its outputs
    assert metrics["report"]["deployable"] == label and metrics["report"]["deployable_sha256"] == served["sha256"]
    assert metrics["benchmark"]["deployable"] == label
    rows = json.loads((run / "benchmark/benchmark.json").read_text())["results"]
    assert {r["artifact"] for r in rows if r["deployable"]} == {label}
    md = (run / "report/report.md").read_text()
    assert f"Deployable artifact: {label}, picked by the quantize stage" in md
    assert f"{label} ({expected.name}, sha256 {served['sha256'][:12]}) served as 'tiny'" in md
    # The SLO verdict judged the deployable row's numbers, not another artifact's.
    row = next(r for r in metrics["report"]["rows"] if r["artifact"] == label)
    assert metrics["report"]["verdict"]["criteria"]["latency"]["measured"] == row["p95_ms"]
