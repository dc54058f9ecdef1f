"""INT8 quantization: ONNX Runtime PTQ (QDQ) and dynamic, torchao pt2e and QAT, the accuracy-aware fallback,
the latency guard, and the stage in a pipeline. One tiny trained ResNet-18 (width 0.25, 16x16 digits) is
trained and exported once per module; the other tests run the stage on its folders."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from pydantic import TypeAdapter, ValidationError
from torch import nn

from deploykit.artifacts import StageRecord
from deploykit.compress import quantize as q
from deploykit.data import build_datasets
from deploykit.errors import DeploykitError
from deploykit.export import export_onnx
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline
from deploykit.pipeline.registry import method_variants
from deploykit.progress import silent
from deploykit.runtime import ort_session
from deploykit.stages.quantize import _METHODS, DynamicSettings, PtqSettings, QatSettings, QuantizeStage

FAST = {"latency_threads": 1, "latency_rounds": 1, "latency_window_s": 0.02, "parity_samples": 128}
CONFIG = TypeAdapter(QuantizeStage.Config)  # settings as a pipeline entry gives them: the model of their method


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train (1 epoch) -> export -> quantize (ptq) through the engine, once for the module."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = parse_pipeline(
        {
            "name": "q",
            "runs_dir": str(runs),
            "data": {"dataset": "digits", "image_size": 16},
            "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
            "stages": [
                {"stage": "train", "epochs": 1, "batch_size": 32, "threads": 1},
                {"stage": "export", "parity_batch_sizes": [1, 7], "max_batch": 8},
                {"stage": "quantize", "calibration_samples": 64, **FAST},
            ],
        }
    )
    outcomes = run_pipeline(cfg)
    assert [o.status for o in outcomes] == ["ran"] * 3
    run_dir = runs / "q"
    records = {
        name: StageRecord(name, name, run_dir / name, json.loads((run_dir / name / "meta.json").read_text()))
        for name in ("train", "export", "quantize")
    }
    return SimpleNamespace(cfg=cfg, dir=run_dir, records=records, bundle=build_datasets(cfg.data))


def run_stage(run, tmp_path, upstream, **settings):
    """The quantize stage on hand-picked upstream records; returns its metrics and the INT8 model's path."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(parents=True)
    ctx = StageContext(run.cfg, "quantize", out, work, list(upstream), silent(), {"bundle": run.bundle})
    result = QuantizeStage(CONFIG.validate_python({**FAST, **settings})).run(ctx)
    assert result.artifacts == {"onnx_int8": "model.int8.onnx", "quant_report": "quantize.json"}
    assert json.loads((out / "quantize.json").read_text())["deployable"] == result.metrics["deployable"]
    assert f"{result.deployable.stage}/{result.deployable.role}" == result.metrics["deployable"]
    return result.metrics, out / "model.int8.onnx"


def onnx_record(model_path):
    """An upstream record holding just an 'onnx' artifact."""
    return StageRecord("export", "export", model_path.parent, {"artifacts": {"onnx": {"path": model_path.name}}})


def ops(path):
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def dequantized_weights(graph):
    """DequantizeLinear nodes whose quantized input is an initializer (weights), by output name."""
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return {n.output[0]: (n, inits) for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}


# ---- ptq through the pipeline ----------------------------------------------------------------------------


def test_ptq_pipeline_writes_a_u8s8_per_channel_qdq_model(run):
    path = run.dir / "quantize" / "model.int8.onnx"
    metrics = run.records["quantize"].meta["metrics"]
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(path)
    quantize_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_nodes and all(inits[n.input[2]].dtype == np.uint8 for n in quantize_nodes)  # u8 activations
    weights = dequantized_weights(graph)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in weights for n in convs)  # every conv weight is INT8
    for conv in convs:
        dq, _ = weights[conv.input[1]]
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert w.dtype == np.int8 and axis == 0 and scale.shape == (w.shape[0],)  # s8, per output channel

    session = ort_session(path, threads=1)
    x = np.random.default_rng(0).standard_normal((7, 3, 16, 16), dtype=np.float32)
    assert session.run(x[:1]).shape == (1, 10) and session.run(x).shape == (7, 10)

    assert metrics["parity"]["top1_agreement"] >= 0.95 and metrics["parity"]["samples"] == 128
    assert metrics["size_ratio"] <= 0.35 and metrics["int8_bytes"] < metrics["fp32_bytes"]
    assert metrics["accuracy_goal_met"] and metrics["excluded_nodes"] == [] and len(metrics["attempts"]) == 1
    trials = [{"method": "minmax", "accuracy": metrics["int8_accuracy"]}]
    assert metrics["calibration"] == {"method": "minmax", "trials": trials, "bias_corrected_layers": 0}
    layers = metrics["sensitivity"]  # ranked for the report although no fallback was needed
    assert 0 < len(layers) <= 10 and [x["loss_db"] for x in layers] == sorted((x["loss_db"] for x in layers), reverse=True)
    assert all(x["module"] for x in layers)  # the PyTorch module each ONNX node was exported from
    assert abs(metrics["accuracy_drop"] - 100 * (metrics["fp32_accuracy"] - metrics["int8_accuracy"])) < 1e-3
    # One real measurement on this machine, with the load beside it.
    latency = metrics["latency"]
    assert latency["fp32_p50_ms"] > 0 and latency["int8_p50_ms"] > 0 and metrics["speedup"] > 0
    assert len(latency["rounds"]["fp32"]) == 1 and len(latency["rounds"]["int8"][0]["load_avg"]) == 3
    assert metrics["deployable"] == ("quantize/onnx_int8" if metrics["speedup"] >= 1.05 else "export/onnx")
    assert run.records["quantize"].meta["deployable"]["stage"] == metrics["deployable"].split("/")[0]
    assert set(run.records["quantize"].meta["artifacts"]) == {"onnx_int8", "quant_report"}


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_each_calibration_method_runs(run, tmp_path, method):
    metrics, path = run_stage(
        run, tmp_path, [run.records["export"]], calibrate_method=method, calibration_samples=32, max_accuracy_drop=None
    )
    assert "DequantizeLinear" in ops(path) and metrics["parity"]["top1_agreement"] >= 0.9
    assert metrics["fallback"] == "accuracy goal disabled"


def test_bias_correction_rewrites_every_quantized_layer_bias(run, tmp_path):
    plain = run.dir / "quantize" / "model.int8.onnx"
    metrics, path = run_stage(run, tmp_path, [run.records["export"]], calibration_samples=64, bias_correction=True)
    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm")]
    assert metrics["calibration"]["bias_corrected_layers"] == len(convs) > 0
    biases = {}
    for model in (plain, path):
        graph = onnx.load(str(model)).graph
        int32 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT32]
        biases[model] = {t.name: numpy_helper.to_array(t) for t in int32}
    assert biases[plain].keys() == biases[path].keys()
    moved = [name for name in biases[path] if not np.array_equal(biases[path][name], biases[plain][name])]
    assert len(moved) >= len(convs) // 2  # the same calibration, so only the correction differs
    assert metrics["parity"]["top1_agreement"] >= 0.95 and metrics["accuracy_goal_met"]


def test_missing_onnx_upstream_is_a_clear_error(in_tmp):
    cfg = parse_pipeline(
        {
            "name": "no-export",
            "data": {"dataset": "digits", "image_size": 16},
            "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
            "stages": [{"stage": "quantize"}],
        }
    )
    with pytest.raises(DeploykitError, match="no earlier stage wrote one: add an export stage before quantize"):
        run_pipeline(cfg)
    assert not (in_tmp / "runs/no-export/quantize").exists()


def test_each_method_has_its_own_settings():
    assert type(CONFIG.validate_python({})) is PtqSettings  # no method: ptq
    assert type(CONFIG.validate_python({"method": "dynamic"})) is DynamicSettings
    with pytest.raises(ValidationError, match="pt2e.calibrate_method"):
        CONFIG.validate_python({"method": "pt2e", "calibrate_method": "entropy"})
    with pytest.raises(ValidationError, match="ptq.qat"):
        CONFIG.validate_python({"qat": {"epochs": 1}})
    with pytest.raises(ValidationError, match="calibration_sample"):
        CONFIG.validate_python({"calibration_sample": 10})  # typo: extra keys are forbidden
    assert CONFIG.validate_python({"method": "qat", "qat": {"epochs": 1}}).qat.epochs == 1
    assert QatSettings().qat.epochs == 2 and not hasattr(DynamicSettings(), "calibration_samples")
    assert set(_METHODS) == set(method_variants(QuantizeStage.Config).values())  # every method has a handler


# ---- dynamic ---------------------------------------------------------------------------------------------


def test_dynamic_quantizes_linear_layers(run, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    fp32 = export_onnx(model, (3, 16, 16), tmp_path / "export" / "model.onnx")
    metrics, path = run_stage(run, tmp_path, [onnx_record(fp32)], method="dynamic", max_accuracy_drop=None)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops(path) and "Gemm" not in ops(path)
    assert metrics["parity"]["top1_agreement"] >= 0.9 and metrics["size_ratio"] < 0.5
    # The accuracy-aware search works on dynamic models too: both Gemms are ranked, then kept in FP32.
    upstream = [onnx_record(fp32)]
    metrics, _ = run_stage(run, tmp_path / "again", upstream, method="dynamic", max_accuracy_drop=-1.0)
    gemms = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Gemm"]
    assert sorted(layer["node"] for layer in metrics["sensitivity"]) == sorted(gemms)
    assert [a["excluded"] for a in metrics["attempts"]] == [0, 1, 2] and not metrics["accuracy_goal_met"]


# ---- torchao pt2e and QAT --------------------------------------------------------------------------------


def test_pt2e_gives_a_qdq_onnx_model_agreeing_with_torch(run, tmp_path):
    upstream = [run.records["train"], run.records["export"]]
    metrics, path = run_stage(run, tmp_path, upstream, method="pt2e", calibration_samples=64)
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops(path)
    assert metrics["parity"]["reference"] == "torch-fp32" and metrics["parity"]["top1_agreement"] >= 0.95
    assert "no layer-wise FP32 fallback" in metrics["fallback"]


def test_qat_after_one_short_epoch_gives_a_qdq_onnx_model(run, tmp_path):
    qat = {"epochs": 1, "batch_size": 64, "threads": 1, "optimizer": {"lr": 0.005}}
    metrics, path = run_stage(run, tmp_path, [run.records["train"]], method="qat", qat=qat)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(path) and metrics["qat"]["epochs_run"] == 1
    # Fine-tuning moves the weights, so agreement with the original float model is lower than for PTQ.
    assert metrics["parity"]["top1_agreement"] >= 0.9
    assert metrics["deployable"] in ("quantize/onnx_int8", "train/checkpoint")  # no upstream ONNX: FP32 is the checkpoint


# ---- accuracy-aware fallback -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(run, tmp_path_factory):
    """The exported model with its stem conv made INT8-hostile but the same in FP32.

    digits images are grey, so input channels 0 and 1 are equal: +1000 on one and -1000 on the other cancel in
    float, while INT8 weight scales sized for +-1000 round every real weight of the stem to zero.
    """
    model = onnx.load(str(run.records["export"].artifact("onnx")))
    stem = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == model.graph.input[0].name)
    weight = next(t for t in model.graph.initializer if t.name == stem.input[1])
    w = numpy_helper.to_array(weight).copy()
    w[:, 0] += 1000.0
    w[:, 1] -= 1000.0
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    path = tmp_path_factory.mktemp("hostile") / "model.onnx"
    onnx.save(model, str(path))
    return SimpleNamespace(record=onnx_record(path), stem=stem.name)


def test_fallback_keeps_the_sensitive_layer_in_fp32(run, tmp_path, hostile):
    metrics, path = run_stage(run, tmp_path, [hostile.record], calibration_samples=64, max_accuracy_drop=3.0)
    attempts = metrics["attempts"]
    assert attempts[0]["excluded"] == 0 and attempts[0]["accuracy_drop"] > 3.0  # everything INT8 fails
    # ...with every calibration (auto tries them in turn first): the weights, not the activation ranges, are at fault.
    trials = metrics["calibration"]["trials"]
    assert [t["method"] for t in trials] == ["minmax", "percentile", "entropy"]
    assert metrics["calibration"]["method"] == max(trials, key=lambda t: t["accuracy"])["method"]
    assert metrics["sensitivity"][0]["node"] == hostile.stem  # SQNR blames the stem
    assert metrics["accuracy_goal_met"] and hostile.stem in metrics["excluded_nodes"] and len(attempts) >= 2
    assert metrics["accuracy_drop"] <= 3.0 and "goal met" in metrics["fallback"]
    graph = onnx.load(str(path)).graph
    stem = next(n for n in graph.node if n.name == hostile.stem)
    assert stem.input[1] not in dequantized_weights(graph)  # its weight is a plain FP32 initializer
    assert hostile.stem in metrics["float_layers"]


def test_impossible_goal_still_saves_the_best_candidate(run, tmp_path, hostile):
    metrics, path = run_stage(run, tmp_path, [hostile.record], calibration_samples=64, max_accuracy_drop=-1.0)
    attempts = metrics["attempts"]
    assert not metrics["accuracy_goal_met"] and "goal not met" in metrics["fallback"]
    assert [a["excluded"] for a in attempts][:3] == [0, 1, 2] and len(attempts) >= 4
    assert metrics["int8_accuracy"] == max(a["accuracy"] for a in attempts) and path.is_file()
    assert metrics["excluded_nodes"]  # the best candidate keeps the stem (at least) in FP32
    assert metrics["deployable"] == "export/onnx" and "max_accuracy_drop" in metrics["deployable_reason"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_attempts(accuracies, clock, seconds=1.0):
    """An attempt function whose accuracy depends on how many layers stay in FP32, taking `seconds` each."""
    calls = []

    def attempt(excluded):
        calls.append(list(excluded))
        clock.now += seconds
        return accuracies[len(excluded)], Path(f"candidate-{len(excluded)}.onnx")

    return attempt, calls


def test_search_stops_once_the_goal_is_met():
    clock = FakeClock()
    attempt, calls = fake_attempts({0: 0.80, 1: 0.85, 2: 0.895, 4: 0.90}, clock)
    result = q.search_exclusions(attempt, lambda: ["a", "b", "c", "d", "e"], 0.90, 1.0, 100.0, clock)
    assert calls == [[], ["a"], ["a", "b"]] and result.goal_met
    assert result.best.excluded == ["a", "b"] and result.note == "goal met with 2 layer(s) in FP32"
    assert q.exclusion_sizes(5) == [1, 2, 4, 5] and q.exclusion_sizes(1) == [1] and q.exclusion_sizes(0) == []


def test_search_respects_the_budget_and_prefers_fewer_fp32_layers_on_ties():
    clock = FakeClock()
    attempt, calls = fake_attempts({0: 0.80, 1: 0.85, 2: 0.85, 4: 0.85}, clock, seconds=10.0)
    result = q.search_exclusions(attempt, lambda: list("abcdef"), 0.90, 0.0, 25.0, clock)
    assert calls == [[], ["a"]] and not result.goal_met  # a third 10 s attempt would end past 25 s
    assert "time budget of 25 s ran out after 2 attempt(s)" == result.note
    clock.now = 0.0
    attempt, _ = fake_attempts({0: 0.80, 1: 0.85, 2: 0.85, 4: 0.85, 6: 0.85}, clock)
    result = q.search_exclusions(attempt, lambda: list("abcdef"), 0.90, -1.0, 100.0, clock)
    assert len(result.attempts) == 5 and result.best.excluded == ["a"]  # ties go to fewer FP32 layers


def test_search_never_ranks_when_not_needed():
    def rank():
        raise AssertionError("ranking is only needed when the goal is missed")

    attempt, calls = fake_attempts({0: 0.5}, FakeClock())
    assert q.search_exclusions(attempt, rank, 0.9, None, 10.0).goal_met and calls == [[]]


# ---- latency guard ---------------------------------------------------------------------------------------


def test_latency_verdict_both_branches():
    fast = q.latency_verdict(10.0, 4.0, 1.05)
    assert fast.worth_it and fast.speedup == 2.5 and fast.message.startswith("INT8 is 2.50x faster")
    slow = q.latency_verdict(10.2, 10.0, 1.05)
    assert not slow.worth_it and slow.message.startswith("INT8 is only 1.02x faster than FP32 on this CPU")


def test_compare_latency_alternates_and_takes_median_p50s(monkeypatch):
    import deploykit.bench

    order, timings = [], {"fp32": iter([9.0, 30.0, 10.0]), "int8": iter([5.0, 4.0, 50.0])}

    def fake_measure(session, x, **_):
        order.append(session)
        return SimpleNamespace(p50_ms=next(timings[session]), p95_ms=0.0, stable=True, load_avg_after=[1.0, 1.0, 1.0])

    monkeypatch.setattr(deploykit.bench, "measure", fake_measure)
    result = q.compare_latency("fp32", "int8", np.zeros((1, 3, 8, 8), np.float32), rounds=3, min_speedup=1.05)
    assert order == ["fp32", "int8"] * 3  # interleaved: both see the same load
    assert (result["fp32_p50_ms"], result["int8_p50_ms"], result["speedup"]) == (10.0, 5.0, 2.0) and result["worth_it"]
    timings = {"fp32": iter([10.0]), "int8": iter([9.9])}
    slow = q.compare_latency("fp32", "int8", np.zeros((1, 3, 8, 8), np.float32), rounds=1, min_speedup=1.05)
    assert not slow["worth_it"] and "only 1.01x faster" in slow["message"]


def test_slow_int8_makes_fp32_the_deployable_model(run, tmp_path):
    metrics, _ = run_stage(run, tmp_path, [run.records["export"]], calibration_samples=32, min_speedup=1000.0)
    assert metrics["deployable"] == "export/onnx" and "is only" in metrics["latency_note"]
    assert metrics["deployable_reason"] == metrics["latency_note"]
