"""Offline benchmarking: perf_analyzer-style windows on a virtual clock, percentiles, and the benchmark stage.

Timing assertions use a virtual clock (exact) or generous structural bounds (real runs): the machines are shared.
"""

import importlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from deploykit.artifacts import Pick, StageResult
from deploykit.bench.measure import current_rss_mb, measure, peak_rss_mb, percentile
from deploykit.errors import DeploykitError
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline
from deploykit.pipeline.registry import Stage, register

# The package re-exports the function `measure`, which shadows the submodule's attribute name.
measure_mod = importlib.import_module("deploykit.bench.measure")

# ---- stand-in stages: fast, so these tests do not hinge on the real export/quantize/tensorrt stages ----


class _NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    int8_wins: bool = Field(False, description="What the stand-in's guard decided: INT8, or the FP32 ONNX it came from.")


@register("stub_export")
class StubExport(Stage):
    """The newest checkpoint as model.onnx through the fast TorchScript exporter (the real stage uses dynamo)."""

    Config = _NoConfig

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.train import load_model

        source = ctx.find("checkpoint")
        model, _ = load_model(source.path.parent)
        bundle = ctx.data()
        x = torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(ctx.out_dir / "model.onnx"), dynamo=False, input_names=["x"], output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
        return StageResult(artifacts={"onnx": "model.onnx"}, models={"onnx": ctx.stats(source)})


@register("stub_quantize")
class StubQuantize(Stage):
    """Publishes the FP32 ONNX again as 'onnx_int8', with a guard decision, like the quantize stage's metrics."""

    Config = _QuantizeConfig

    def run(self, ctx: StageContext) -> StageResult:
        fp32 = ctx.find("onnx")
        shutil.copy(fp32.path, ctx.out_dir / "model.int8.onnx")
        pick = Pick(ctx.name, "onnx_int8", "fast") if self.config.int8_wins else Pick(fp32.stage, "onnx", "too slow")
        return StageResult(
            artifacts={"onnx_int8": "model.int8.onnx"},
            metrics={"speedup": 0.91, "accuracy_drop": 0.004, "excluded": ["fc"]},
            models={"onnx_int8": ctx.stats(fp32)},
            deployable=pick,
        )


@register("stub_tensorrt")
class StubTensorRT(Stage):
    """Publishes a 'trt_fp16' engine file that no machine here can run: the benchmark must skip it, not fake it."""

    Config = _NoConfig

    def run(self, ctx: StageContext) -> StageResult:
        (ctx.out_dir / "model.fp16.plan").write_bytes(b"not an engine")
        (ctx.out_dir / "model.fp16.json").write_text("{}")  # a side file, as the real stage writes: not a model
        return StageResult(artifacts={"trt_fp16": "model.fp16.plan", "trt_fp16_meta": "model.fp16.json"})


BENCH_FAST = {"batch_sizes": [1, 4], "warmup": 2, "window_s": 0.02, "max_windows": 4}


def tiny_pipeline(runs_dir: Path, stages: list[dict], description: str = "tiny") -> object:
    """A one-epoch train on 60 noise images of 8x8 (seconds, not minutes), then `stages`."""
    return parse_pipeline(
        {
            "name": "tiny",
            "description": description,
            "runs_dir": str(runs_dir),
            "data": {"dataset": "synthetic", "image_size": 8, "channels": 1, "num_samples": 60},
            "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
            "stages": [{"stage": "train", "epochs": 1, "batch_size": 16}, *stages],
        }
    )


# ---- measure() on a virtual clock: exact window logic, whatever the machine's load -----------------------


class Scripted:
    """A session whose call k 'takes' duration_ms(k) on a virtual clock."""

    def __init__(self, monkeypatch, duration_ms) -> None:
        self.now, self.calls, self.duration_ms = 0, 0, duration_ms
        monkeypatch.setattr(measure_mod, "_clock_ns", lambda: self.now)

    def run(self, x: np.ndarray) -> np.ndarray:
        self.now += round(self.duration_ms(self.calls) * 1e6)
        self.calls += 1
        return x


X4 = np.zeros((4, 3), dtype=np.float32)


def test_stable_after_warmup_stops_at_three_windows(monkeypatch):
    s = Scripted(monkeypatch, lambda k: 50.0 if k < 5 else 2.0)  # slow warm-up calls are not timed
    m = measure(s, X4, warmup=5, window_iters=4)
    assert m.stable and m.windows == 3 and m.iterations == 12 and s.calls == 5 + 12
    assert m.p50_ms == m.p95_ms == m.p99_ms == m.min_ms == m.max_ms == m.mean_ms == 2.0
    assert m.window_means_ms == [2.0, 2.0, 2.0]
    assert m.throughput == pytest.approx(4 / 0.002) and m.batch == 4
    assert len(m.load_avg_before) == 3 and len(m.load_avg_after) == 3


def test_slow_first_window_needs_a_fourth_and_is_not_pooled(monkeypatch):
    s = Scripted(monkeypatch, lambda k: 10.0 if k < 4 else 2.0)
    m = measure(s, X4, warmup=0, window_iters=4)
    assert m.stable and m.windows == 4 and m.window_means_ms == [10.0, 2.0, 2.0, 2.0]
    assert m.max_ms == 2.0 and m.iterations == 12  # percentiles pool only the three agreeing windows


def test_alternating_windows_never_settle(monkeypatch):
    s = Scripted(monkeypatch, lambda k: 1.0 if (k // 3) % 2 == 0 else 5.0)
    m = measure(s, X4, warmup=0, window_iters=3, max_windows=6)
    assert not m.stable and m.windows == 6 and m.window_means_ms == [1.0, 5.0, 1.0, 5.0, 1.0, 5.0]
    assert m.iterations == 9 and m.min_ms == 1.0 and m.max_ms == 5.0  # the last three windows: 5, 1, 5


def test_stability_bound_is_inclusive(monkeypatch):
    means = [1.0, 1.1, 1.05]  # max/min - 1 == 0.10 exactly
    s = Scripted(monkeypatch, lambda k: means[k] if k < 3 else 9.0)
    assert measure(s, X4, warmup=0, window_iters=1, stability=0.10).stable
    s = Scripted(monkeypatch, lambda k: [1.0, 1.11, 1.05][k] if k < 3 else 1.0)
    m = measure(s, X4, warmup=0, window_iters=1, stability=0.10, max_windows=3)
    assert not m.stable and m.windows == 3


def test_time_windows_run_as_many_calls_as_fit(monkeypatch):
    s = Scripted(monkeypatch, lambda k: 1.0)
    m = measure(s, X4, warmup=0, window_s=0.010)
    assert m.stable and m.windows == 3 and m.iterations == 30  # 10 calls of 1 ms fill a 10 ms window


def test_bad_window_settings_are_refused():
    with pytest.raises(ValueError):
        measure(None, X4, min_windows=5, max_windows=3)
    with pytest.raises(ValueError):
        measure(None, X4, window_iters=0)


def test_percentile_interpolates_between_ranks():
    values = list(range(1, 101))
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([4, 1, 3, 2], 50) == 2.5  # order of the input does not matter
    with pytest.raises(ValueError):
        percentile([], 50)


def test_real_torch_model_gives_sane_fields():
    from deploykit.runtime import torch_session

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    model(torch.zeros(1, 1, 8, 8))
    x = np.zeros((2, 1, 8, 8), np.float32)
    m = measure(torch_session(model, threads=1), x, warmup=2, window_s=0.02, max_windows=4)
    assert 0 < m.min_ms <= m.p50_ms <= m.p95_ms <= m.p99_ms <= m.max_ms
    assert m.throughput == pytest.approx(2 / (m.mean_ms / 1e3))
    assert 3 <= m.windows <= 4 and m.iterations >= 3 and m.batch == 2
    assert set(m.to_dict()) >= {"p50_ms", "p95_ms", "p99_ms", "throughput", "stable", "window_means_ms"}


def test_memory_helpers():
    assert 10 < peak_rss_mb() < 100_000
    assert 0 < current_rss_mb() <= peak_rss_mb() + 1


def test_onnx_size_counts_external_weights(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from deploykit.export.torch2onnx import onnx_size_bytes

    weight = numpy_helper.from_array(np.ones((256, 256), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [weight],
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="m.onnx.data")
    assert path.stat().st_size < 1000 and onnx_size_bytes(path) == path.stat().st_size + 256 * 256 * 4


def test_repeated_rounds_report_the_median_round():
    from deploykit.stages.benchmark import _median_round

    rounds = [{"p50_ms": 3.0}, {"p50_ms": 90.0}, {"p50_ms": 2.0}]  # one round hit by a neighbour's burst
    assert _median_round(rounds) == {"p50_ms": 3.0}
    assert _median_round(rounds[:2]) == {"p50_ms": 3.0}  # even count: the lower middle


# ---- the benchmark stage in a real (tiny) pipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    # the default machine is shared; BF16 rows depend on the CPU (tests/test_precision.py)
    bench = {"stage": "benchmark", **BENCH_FAST, "omp_wait_policy": "passive", "bf16": False}
    stages = [{"stage": "stub_export"}, {"stage": "stub_tensorrt"}, bench]
    run_pipeline(tiny_pipeline(runs, stages))
    directory = runs / "tiny" / "benchmark"
    return json.loads((directory / "benchmark.json").read_text()), directory


def test_benchmark_has_one_entry_per_artifact_and_batch(bench_run):
    report, _ = bench_run
    rows = report["results"]
    assert [(r["artifact"], r["batch"]) for r in rows] == [
        ("train (torch fp32)", 1),
        ("train (torch fp32)", 4),
        ("stub_export (onnx fp32)", 1),
        ("stub_export (onnx fp32)", 4),
        ("stub_export (onnx fp32) on openvino", 1),  # the same file, timed on the other runtime
        ("stub_export (onnx fp32) on openvino", 4),
    ]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["throughput"] > 0 and 0.0 <= r["accuracy"] <= 1.0 and r["size_bytes"] > 10_000
        assert len(r["load_avg_before"]) == 3 and len(r["load_avg_after"]) == 3
        assert r["params"] > 1000 and r["macs"] > 1000  # the ONNX model inherits the exported model's counts
        assert r["isolated"] and r["peak_rss_mb"] > 10 and r["runtime"] in ("torch-fp32", "ort-fp32", "ov-fp32")
        assert r["omp_wait_policy"] == "PASSIVE"  # it reached the worker process
    assert [r["runtime"] for r in rows[::2]] == ["torch-fp32", "ort-fp32", "ov-fp32"]
    assert report["baseline"] == "train (torch fp32)"
    assert rows[0]["speedup"] == 1.0 and rows[2]["speedup"] > 0


def test_benchmark_records_machine_versions_and_skips_tensorrt(bench_run):
    report, directory = bench_run
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and len(machine["load_avg_before"]) == 3
    assert "torch" in report["versions"] and "onnxruntime" in report["versions"]
    assert report["settings"]["threads"] >= 1 and report["settings"]["batch_sizes"] == [1, 4]
    (skipped,) = report["skipped"]
    assert skipped["artifact"] == "stub_tensorrt (tensorrt fp16)" and "TensorRT" in skipped["reason"]
    table = (directory / "benchmark.md").read_text()
    assert "| Artifact | Runs in | Batch | P50 ms |" in table and "stub_tensorrt (tensorrt fp16) skipped" in table
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["artifacts"]["benchmark"]["path"] == "benchmark.json" and len(meta["metrics"]["results"]) == 6


def test_benchmark_without_models_upstream_says_what_to_add(tmp_path):
    cfg = parse_pipeline(
        {
            "name": "empty",
            "runs_dir": str(tmp_path),
            "data": {"dataset": "synthetic", "image_size": 8, "num_samples": 20},
            "stages": [{"stage": "benchmark"}],
        }
    )
    with pytest.raises(DeploykitError, match="found no model artifact"):
        run_pipeline(cfg)


def test_benchmark_config_is_strict():
    with pytest.raises(DeploykitError):
        tiny_pipeline(Path("runs"), [{"stage": "benchmark", "batch_size": 4}])  # a typo of batch_sizes
    with pytest.raises(DeploykitError):
        tiny_pipeline(Path("runs"), [{"stage": "benchmark", "include": ["tflite"]}])
    with pytest.raises(DeploykitError, match="omp_wait_policy"):
        tiny_pipeline(Path("runs"), [{"stage": "benchmark", "isolate": False, "omp_wait_policy": "passive"}])
    with pytest.raises(DeploykitError, match="select_batch 8 is not one of batch_sizes"):
        tiny_pipeline(Path("runs"), [{"stage": "benchmark", "batch_sizes": [1, 4], "select_batch": 8}])


# ---- selection by measurement ---------------------------------------------------------------------------


def _row(key: str, fmt: str, precision: str, p50: float | None, accuracy: float | None, batch: int = 1) -> dict:
    return {"key": key, "artifact": key, "format": fmt, "precision": precision, "p50_ms": p50, "accuracy": accuracy,
            "batch": batch}  # fmt: skip


def test_selection_picks_the_fastest_servable_candidate_within_the_accuracy_budget():
    from deploykit.bench.select import select_fastest

    rows = [
        _row("train/checkpoint", "torch", "fp32", 1.0, 0.95),  # fastest, but eager torch is not served
        _row("export/onnx", "onnx", "fp32", 10.0, 0.95),
        _row("quantize/onnx_int8", "onnx", "int8", 4.0, 0.945),
        _row("quantize/onnx_int8@openvino", "onnx", "int8", 3.0, 0.945),
        _row("openvino/openvino_int8", "openvino", "int8", 2.0, 0.90),  # fastest servable, but 5 points lost
        _row("export/onnx", "onnx", "fp32", 0.5, 0.95, batch=16),  # another batch size: not compared
    ]
    chosen = select_fastest(rows, batch=1, max_accuracy_drop=1.0)
    assert chosen["pick"]["key"] == "quantize/onnx_int8@openvino"
    assert chosen["runner_up"]["key"] == "quantize/onnx_int8" and chosen["ratio"] == pytest.approx(4.0 / 3.0)
    assert chosen["rejected"] == [{"key": "openvino/openvino_int8", "reason": "loses 5.00 points (budget 1)"}]
    assert [r["key"] for r in chosen["ranked"]] == ["quantize/onnx_int8@openvino", "quantize/onnx_int8", "export/onnx"]
    assert "1.33x faster than quantize/onnx_int8" in chosen["reason"]
    # Without a budget the lossy one wins; with no servable row there is no pick.
    assert select_fastest(rows, 1, None)["pick"]["key"] == "openvino/openvino_int8"
    assert select_fastest(rows[:1], 1, 1.0) is None


def test_selection_without_measured_accuracy_applies_no_budget():
    from deploykit.bench.select import select_fastest

    rows = [_row("export/onnx", "onnx", "fp32", 10.0, None), _row("quantize/onnx_int8", "onnx", "int8", 4.0, None)]
    chosen = select_fastest(rows, 1, 1.0)
    assert chosen["pick"]["key"] == "quantize/onnx_int8" and "no accuracy budget" in chosen["reason"]


def test_the_benchmark_pick_is_its_own_fastest_row_and_the_deployable_one(bench_run):
    report, directory = bench_run
    ranked = report["selection"]["ranked"]
    at_1 = {r["key"]: r["p50_ms"] for r in report["results"] if r["batch"] == 1 and r["format"] == "onnx"}
    assert [r["key"] for r in ranked] == sorted(at_1, key=at_1.get)  # the rows it measured, fastest first
    assert {r["key"] for r in report["results"] if r["deployable"]} == {ranked[0]["key"]}
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["deployable"]["stage"] == "stub_export" and meta["deployable"]["role"] == "onnx"
    assert meta["deployable"]["runtime"] == ("openvino" if ranked[0]["key"].endswith("@openvino") else "onnxruntime")
