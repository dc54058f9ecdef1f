"""Precision as a measured axis: BF16 candidates only where the CPU has BF16, labels read back from the runtime,
the pick by measurement across precisions, and a BF16 model served as picked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploykit.artifacts import Role, StageRecord, deployable
from deploykit.bench.select import select_fastest
from deploykit.bench.targets import discover
from deploykit.machine import bf16_unsupported, machine_info
from deploykit.package.triton_repo import ModelIO, TensorSpec, TritonModelOptions, render_config

BF16_HERE = bf16_unsupported(machine_info()) is None


def record(name: str, roles: dict[str, str], **meta) -> StageRecord:
    artifacts = {role: {"path": path, "sha256": "0" * 64, "bytes": 1000} for role, path in roles.items()}
    return StageRecord(name, name, Path("/nowhere") / name, {"artifacts": artifacts, **meta})


def test_bf16_is_decided_from_the_machine_record():
    assert bf16_unsupported({"isa": ["AVX2", "AVX-512", "AMX-BF16"]}) is None
    assert bf16_unsupported({"isa": ["AVX2", "AVX-512 BF16"]}) is None
    reason = bf16_unsupported({"isa": ["AVX2", "AVX-512", "AVX-512 VNNI"]})
    assert "neither AVX-512 BF16 nor AMX-BF16" in reason and "AVX-512 VNNI" in reason


def test_bf16_candidates_are_what_openvino_runs_and_nothing_else():
    upstream = [
        record("train", {Role.CHECKPOINT: "model.pt"}),
        record("export", {Role.ONNX: "model.onnx"}),
        record("quantize", {Role.ONNX_INT8: "model.int8.onnx"}),
        record("openvino", {Role.OPENVINO: "model.xml"}),
    ]
    without = discover(upstream, onnx_runtimes=("onnxruntime", "openvino"))
    assert not any(t.exec_precision for t in without)
    twins = [t for t in discover(upstream, onnx_runtimes=("onnxruntime", "openvino"), bf16=True) if t.exec_precision]
    assert [t.key for t in twins] == [
        "export/onnx@openvino:bf16",
        "quantize/onnx_int8@openvino:bf16",
        "openvino/openvino:bf16",
    ]  # never the torch checkpoint nor a file on ONNX Runtime, which has no BF16 kernels on CPU here
    assert twins[0].label == "export (onnx fp32) on openvino in bf16"


def row(key, precision, runs_in, accuracy, p50, fmt="onnx", hint=None, runs_on="onnxruntime"):
    stage, role = key.split("/")[0], key.split("/")[1].split("@")[0].split(":")[0]
    return {"key": key, "artifact": key, "stage": stage, "role": role, "format": fmt, "precision": precision,
            "execution_precision": runs_in, "accuracy": accuracy, "p50_ms": p50, "batch": 1,
            "precision_hint": hint, "runs_on": runs_on}  # fmt: skip


def test_the_pick_takes_bf16_when_int8_is_over_budget_and_fp32_is_slower():
    rows = [
        row("export/onnx", "fp32", "fp32", 0.900, 28.0),
        row("export/onnx@openvino:bf16", "fp32", "bf16", 0.897, 6.4, hint="bf16", runs_on="openvino"),
        row("quantize/onnx_int8", "int8", "int8", 0.870, 9.5),  # 3 points lost: over a 1-point budget
        # An FP32 file OpenVINO ran in BF16 is a BF16 candidate, never the FP32 reference, even when it scores higher.
        row("openvino/openvino:bf16", "fp32", "bf16", 0.950, 7.0, fmt="openvino", hint="bf16", runs_on="openvino"),
    ]
    selection = select_fastest(rows, 1, max_accuracy_drop=1.0)
    assert selection["reference_accuracy"] == 0.900
    assert selection["pick"]["key"] == "export/onnx@openvino:bf16"
    assert [r["key"] for r in selection["rejected"]] == ["quantize/onnx_int8"]
    with_int8 = select_fastest(rows, 1, max_accuracy_drop=5.0)  # a budget INT8 meets
    assert with_int8["pick"]["key"] == "export/onnx@openvino:bf16"  # still the fastest here (6.4 < 9.5 ms)


def test_the_picked_precision_reaches_the_deployable_and_the_served_config():
    export = record("export", {Role.ONNX: "model.onnx"})
    bench = record("benchmark", {}, deployable={"stage": "export", "role": "onnx", "reason": "fastest",
                                                "runtime": "openvino", "precision": "bf16"})  # fmt: skip
    ref = deployable([export, bench])
    assert (ref.runs_on, ref.exec_precision, ref.key) == ("openvino", "bf16", "export/onnx@openvino:bf16")
    io = ModelIO([TensorSpec("input", "TYPE_FP32", [3, 8, 8])], [TensorSpec("logits", "TYPE_FP32", [5])], batched=True)
    portable = render_config("m", io, TritonModelOptions(runtime="openvino", precision="bf16"), "python")
    assert 'key: "precision", value: { string_value: "bf16" }' in portable
    native = render_config("m", io, TritonModelOptions(flavour="native", runtime="openvino", precision="bf16"),
                           "openvino")  # fmt: skip
    assert 'key: "HINT_BF16", value: { string_value: "YES" }' in native
    with pytest.raises(ValueError, match="runs on OpenVINO only"):
        TritonModelOptions(precision="bf16")


def test_native_openvino_configs_turn_batching_off_so_the_real_backend_loads_them():
    """Triton 24.10's openvino backend fixes the batch at max_batch_size: a batch-1 warm-up then fails to load. The
    config it loads and serves has max_batch_size 0 and a -1 batch dimension (measured, FIELD-NOTES 2026-12-07)."""
    io = ModelIO([TensorSpec("input", "TYPE_FP32", [3, 8, 8])], [TensorSpec("logits", "TYPE_FP32", [5])], batched=True)
    config = render_config("m", io, TritonModelOptions(flavour="native", max_batch_size=8), "openvino")
    assert "max_batch_size: 0" in config and "dims: [ -1, 3, 8, 8 ]" in config and "dims: [ -1, 5 ]" in config
    assert "dynamic_batching {" not in config and 'name: "zeros_b8"' not in config
    assert 'name: "zeros_b1", batch_size: 1' in config and "dims: [ 1, 3, 8, 8 ]" in config
    onnxruntime = render_config("m", io, TritonModelOptions(flavour="native", max_batch_size=8), "onnxruntime_onnx")
    assert "max_batch_size: 8" in onnxruntime  # the onnxruntime backend loads batching configs as written


class _Compiled:
    def __init__(self, answer: str) -> None:
        self.answer = answer

    def get_property(self, name: str) -> str:
        assert name == "INFERENCE_PRECISION_HINT"
        return self.answer


@pytest.mark.openvino
def test_the_execution_precision_is_read_back_from_openvino(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the openvino extra)")
    from servers import export_tiny

    from deploykit.runtime import open_artifact
    from deploykit.runtime.ov_rt import compiled_precision

    assert compiled_precision(_Compiled("<Type: 'bfloat16'>")) == "bf16"
    assert compiled_precision(_Compiled("<Type: 'float32'>")) == "fp32"
    onnx = export_tiny(tmp_path / "tiny.onnx")
    fp32 = open_artifact(onnx, threads=1, runtime="openvino")
    assert fp32.execution_precision == "fp32"  # said explicitly: OpenVINO's own default on a BF16 CPU is bf16
    asked = open_artifact(onnx, threads=1, runtime="openvino", precision="bf16")
    assert asked.execution_precision == ("bf16" if BF16_HERE else asked.float_precision)
    with pytest.raises(Exception, match="ask for bf16 on OpenVINO"):
        open_artifact(onnx, threads=1, precision="bf16")


@pytest.mark.openvino
@pytest.mark.skipif(not BF16_HERE, reason="this CPU has no AVX-512 BF16 or AMX-BF16: no BF16 model to serve")
def test_a_bf16_model_is_served_as_picked_within_tolerance_of_offline_bf16(tmp_path):
    from servers import triton_with_tiny

    from deploykit.runtime import open_artifact
    from deploykit.serve.oip import OipClient
    from deploykit.validate.checks import correctness_checks

    with triton_with_tiny(tmp_path, runtime="openvino", precision="bf16") as served:
        config = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
        assert 'string_value: "bf16"' in config
        reference = open_artifact(served.onnx, threads=1, runtime="openvino", precision="bf16")
        rng = np.random.default_rng(0)
        batches = [rng.standard_normal((n, 3, 8, 8)).astype(np.float32) for n in (1, 7)]
        client = OipClient(served.http_url, served.model, "triton")
        checks = correctness_checks(client, reference, batches, served.grpc_url)
        assert [c.status for c in checks] == ["pass", "pass"], [c.detail for c in checks]


def test_the_fp16_stage_writes_a_checked_fp16_model_the_cpu_benchmark_declines(tmp_path):
    import json

    from deploykit.pipeline.engine import run_pipeline
    from deploykit.pipeline.loader import parse_pipeline
    from deploykit.runtime import onnx_precision

    cfg = parse_pipeline({
        "name": "half", "runs_dir": str(tmp_path),
        "data": {"dataset": "digits", "image_size": 8, "channels": 1},
        "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
        "stages": [{"stage": "load"}, {"stage": "export", "max_batch": 2}, {"stage": "fp16"},
                   {"stage": "benchmark", "batch_sizes": [1], "window_s": 0.02, "max_windows": 3, "isolate": False,
                    "include": ["onnx_fp16"], "select": False}],
    })  # fmt: skip
    outcomes = {o.name: o for o in run_pipeline(cfg)}
    half = outcomes["fp16"].directory / "model.fp16.onnx"
    metrics = outcomes["fp16"].metrics
    assert metrics["weight_types"] == ["FLOAT16"] and metrics["io_types"] == ["FLOAT", "FLOAT"]
    assert metrics["parity_rel_diff"] < 1e-2 and 0.4 < metrics["size_ratio"] < 0.6  # half the bytes
    assert onnx_precision(half) == "fp16"  # read from the graph's types, not the file name
    bench = json.loads((outcomes["benchmark"].directory / "benchmark.json").read_text())
    assert bench["results"] == [] and "FP16 ONNX is for GPU runtimes" in bench["skipped"][0]["reason"]


@pytest.mark.openvino
@pytest.mark.parametrize("claims_bf16", [False, True])
def test_the_benchmark_offers_bf16_by_the_machine_record_and_labels_what_ran(tmp_path, monkeypatch, claims_bf16):
    """With a record without BF16: no BF16 row, and the reason. With one that claims it (on any real CPU): BF16 rows
    whose label is what OpenVINO says it compiled to, so a CPU without BF16 shows fp32, never a made-up bf16."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (the openvino extra)")
    import json

    from deploykit.pipeline.engine import run_pipeline
    from deploykit.pipeline.loader import parse_pipeline
    from deploykit.stages import benchmark

    isa = ["AVX2", "AVX-512", "AMX-BF16"] if claims_bf16 else ["AVX2", "AVX-512"]
    monkeypatch.setattr(benchmark, "machine_info", lambda: {**machine_info(), "isa": isa})
    bench = {"stage": "benchmark", "batch_sizes": [1], "warmup": 1, "window_s": 0.02, "max_windows": 3,
             "isolate": False, "onnx_runtimes": ["openvino"], "max_accuracy_drop": 100.0}  # fmt: skip
    cfg = parse_pipeline({
        "name": "axis", "runs_dir": str(tmp_path),
        "data": {"dataset": "digits", "image_size": 8, "channels": 1},
        "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
        "stages": [{"stage": "load"}, {"stage": "export", "max_batch": 2}, bench],
    })  # fmt: skip
    directory = {o.name: o for o in run_pipeline(cfg)}["benchmark"].directory
    report = json.loads((directory / "benchmark.json").read_text())
    ran = {r["key"]: r["execution_precision"] for r in report["results"]}
    if not claims_bf16:
        assert ran == {"load/checkpoint": "fp32", "export/onnx@openvino": "fp32"}
        assert "neither AVX-512 BF16 nor AMX-BF16" in next(s["reason"] for s in report["skipped"] if s["key"] == "bf16")
        return
    assert ran["export/onnx@openvino"] == "fp32"  # asked for f32 explicitly, whatever OpenVINO's default here
    assert ran["export/onnx@openvino:bf16"] == ("bf16" if BF16_HERE else "fp32")  # read back, not assumed
    row = next(r for r in report["results"] if r["key"] == "export/onnx@openvino:bf16")
    assert row["accuracy"] is not None  # judged in the precision it ran in
    assert ("| bf16 |" in (directory / "benchmark.md").read_text()) == BF16_HERE  # the table's Runs in column
