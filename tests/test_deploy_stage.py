"""The `deploy` stage: package -> real Triton -> validate -> stop inside `deploykit optimize`, then the report."""

from __future__ import annotations

import json

import pytest
from test_bench import tiny_pipeline

from deploykit.errors import DeploykitError
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline
from deploykit.serve.process import http_status


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    stages = [
        {"stage": "export"},
        # restricted, as an exposed server is: every check and the locust users must send the stage's fresh key
        {"stage": "deploy", "users": [1, 2], "duration_s": 4, "slo": {"max_latency_ms": 100.0, "min_throughput": 5.0},
         "restrict": True},
        {"stage": "report"},
    ]
    outcomes = run_pipeline(tiny_pipeline(runs, stages))
    return runs / "tiny", {o.name: o for o in outcomes}


def test_deploy_serves_validates_and_stops(deployed):
    run, outcomes = deployed
    m = outcomes["deploy"].metrics
    assert m["passed"] and m["checks_failed"] == [] and m["checks_passed"] >= 12
    assert [level["users"] for level in m["served"]] == [1, 2]
    for level in m["served"]:
        assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"] < 1000
        assert level["throughput_rps"] > 5 and level["error_rate"] == 0
        assert level["server"]["requests"] > 0 and level["server"]["avg_batch_size"] >= 1
    validation = json.loads((run / "deploy" / "validation" / "validation.json").read_text())
    assert validation["passed"] and validation["loadtest"]["verdict"]["passed"]
    config = (run / "deploy" / "model_repo" / "tiny" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "EXECUTION_ENV_PATH" in config
    log = (run / "deploy" / "server-logs" / "tritonserver.log").read_text()
    assert "Started HTTPService at 127.0.0.1:" in log
    port = log.split("Started HTTPService at 127.0.0.1:")[1].split('"')[0]
    assert http_status(f"http://127.0.0.1:{port}/v2/health/live") is None  # stopped with the stage


def test_report_shows_served_numbers_beside_offline(deployed):
    run, _ = deployed
    md = (run / "report" / "report.md").read_text()
    served = md.split("## Served", 1)[1]
    assert "| Users | P50 ms |" in served and "served as 'tiny' on triton" in served
    assert "Overall: PASS" in served


def test_deploy_needs_an_onnx_model_and_a_safe_name(tmp_path):
    with pytest.raises(DeploykitError, match="needs an ONNX model upstream"):
        run_pipeline(tiny_pipeline(tmp_path, [{"stage": "deploy", "duration_s": 0}]))
    with pytest.raises(DeploykitError, match="not allowed"):
        parse_pipeline(
            {
                "name": "x",
                "data": {"dataset": "digits"},
                "model": {"name": "resnet18"},
                "stages": [{"stage": "deploy", "model_name": "../etc"}],
            }  # fmt: skip
        )


def test_perf_analyzer_tune_and_fuzz_are_refused_on_torchserve():
    base = {"name": "x", "data": {"dataset": "digits"}, "model": {"name": "resnet18"}}
    for wrong in ({"client": "perf_analyzer"}, {"tune": True}, {"fuzz": True}, {"protocol": "grpc"}):
        with pytest.raises(DeploykitError, match="Triton only|speaks http only"):
            parse_pipeline({**base, "stages": [{"stage": "deploy", "engine": "torchserve", **wrong}]})


def test_deploy_tunes_then_serves_the_tuned_config_judged_by_perf_analyzer(tmp_path):
    deploy = {
        "stage": "deploy", "tune": True, "tune_budget_s": 2, "tune_window_ms": 300, "client": "perf_analyzer",
        "users": [2], "duration_s": 3, "slo": {"max_latency_ms": 1000.0, "min_throughput": 1.0},
        "restrict": True,  # perf_analyzer sends the key too
    }  # fmt: skip
    m = run_pipeline(tiny_pipeline(tmp_path, [{"stage": "export"}, deploy]))[-1].metrics
    assert m["passed"], m["checks_failed"]
    tuned = m["tuned"]
    assert tuned["candidates"] >= 1 and tuned["meets_slo"] and tuned["best"]["p95_ms"] <= 1000.0
    config = (tmp_path / "tiny" / "deploy" / "model_repo" / "tiny" / "config.pbtxt").read_text()
    assert f"max_batch_size: {tuned['best']['max_batch_size']}" in config  # what was served is what tune chose
    assert m["served"][0]["users"] == 2 and m["served"][0]["throughput_rps"] > 0
    saved = (tmp_path / "tiny" / "deploy" / "validation" / "perf_analyzer.csv").read_text()
    assert saved.startswith("Concurrency,")


def test_deploy_on_torchserve_validates_the_same_way(tmp_path):
    stages = [{"stage": "export"}, {"stage": "deploy", "engine": "torchserve", "duration_s": 0}]
    m = run_pipeline(tiny_pipeline(tmp_path, stages))[-1].metrics
    assert m["engine"] == "torchserve" and m["passed"], m["checks_failed"]
    assert m["checks_passed"] >= 8 and "served" not in m  # no load test asked for
    assert (tmp_path / "tiny" / "deploy" / "model_store" / "tiny.mar").is_file()


def test_deploy_fuzz_sends_the_corpus_and_restarts_the_server_it_owns(tmp_path):
    from test_fuzz import TRITON_251_CRASHERS

    stages = [{"stage": "export"}, {"stage": "deploy", "fuzz": True, "duration_s": 0}]
    m = {o.name: o for o in run_pipeline(tiny_pipeline(tmp_path, stages))}["deploy"].metrics
    corpus = m["fuzz"]
    assert all(n["sent"] >= 30 for n in corpus["counts"].values()) and len(corpus["counts"]) == 3
    # Triton 2.51's two known crashers fail the checks; the stage restarted the server and sent the rest.
    assert corpus["crashed"] == TRITON_251_CRASHERS and corpus["good_request_after"] is True
    assert m["checks_failed"] == ["bad input: corpus (http json)", "bad input: server survives the corpus"]
    assert not m["passed"]
