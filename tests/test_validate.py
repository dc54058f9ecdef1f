"""`deploykit validate` against real servers: every check on a healthy deployment, and failures that are real."""

from __future__ import annotations

import json

import numpy as np
import pytest
from servers import SAMPLE

from deploykit.loadtest.slo import custom_slo
from deploykit.serve.oip import OipClient
from deploykit.validate import validate_server
from deploykit.validate.checks import bad_input_checks, health_checks


def by_name(result):
    return {c["name"]: c for c in result["checks"]}


def test_triton_deployment_passes_every_check_and_the_slo(triton, tmp_path):
    samples = np.random.default_rng(0).standard_normal((16, *SAMPLE)).astype(np.float32)
    # loose bars: 2 shared cores, and this test is about the checks, not the speed
    slo = custom_slo("image_classification", max_latency_ms=100.0, min_throughput=5.0)
    result = validate_server(
        triton.http_url, triton.model, out_dir=tmp_path, model_path=triton.onnx, samples=samples,
        grpc_url=triton.grpc_url, metrics_url=triton.metrics_url, users=[2], duration_s=4, slo=slo, size_mb=0.01,
    )  # fmt: skip
    checks = by_name(result)
    fails = [c for c in result["checks"] if c["status"] == "fail"]
    assert not fails and result["passed"], fails
    for name in ("server live", "server ready", "model ready", "model metadata", "outputs equal offline (http)",
                 "outputs equal offline (grpc)", "outputs valid (http)", "outputs valid (grpc)", "wrong shape",
                 "wrong dtype", "missing input", "still serving afterwards", "prometheus metrics", "error rate",
                 "SLO image_classification"):  # fmt: skip
        assert checks[name]["status"] == "pass", checks[name]
    # every sample, one alone then fours, each answer held to the config Triton reports
    assert checks["outputs valid (grpc)"]["detail"] == (
        "16 samples in 5 requests: every output finite, as the config declares (logits FP32 [-1, 5])"
    )
    # Triton 2.51 refuses unparseable bodies with 500: refused and still healthy, but flagged.
    assert checks["malformed JSON"]["status"] in ("pass", "warn")
    assert "HTTP 500" in checks["malformed JSON"]["detail"] or "HTTP 400" in checks["malformed JSON"]["detail"]
    saved = json.loads((tmp_path / "validation.json").read_text())
    assert saved["passed"] and saved["loadtest"]["levels"][0]["requests"] > 0


def test_torchserve_deployment_passes_checks(torchserve, tmp_path):
    result = validate_server(
        torchserve.http_url, torchserve.model, out_dir=tmp_path, engine="torchserve", model_path=torchserve.onnx,
        metrics_url=torchserve.metrics_url, duration_s=0,
    )  # fmt: skip
    checks = by_name(result)
    assert result["passed"], [c for c in result["checks"] if c["status"] != "pass"]
    for name in ("ping", "outputs equal offline (http)", "outputs valid (http)", "wrong shape", "wrong dtype",
                 "missing input", "malformed JSON", "oversized body", "prometheus metrics"):  # fmt: skip
        assert checks[name]["status"] == "pass", checks[name]


def test_a_wrong_reference_model_and_an_impossible_slo_fail(triton, tmp_path):
    from servers import export_tiny

    other = export_tiny(tmp_path / "other.onnx", seed=5)  # not the model being served
    slo = custom_slo("image_classification", max_latency_ms=0.001)
    result = validate_server(
        triton.http_url, triton.model, out_dir=tmp_path, model_path=other, users=1, duration_s=4, slo=slo,
        size_mb=0.01,
    )  # fmt: skip
    checks = by_name(result)
    assert checks["outputs equal offline (http)"]["status"] == "fail"
    assert checks["SLO image_classification"]["status"] == "fail"
    assert not result["passed"]


def test_checks_fail_against_a_model_that_is_not_served(triton):
    client = OipClient(triton.http_url, "absent")
    checks = {c.name: c for c in health_checks(client)}
    assert checks["server live"].status == "pass"
    assert checks["model ready"].status == "fail" and checks["model metadata"].status == "fail"
    assert {c.name: c.status for c in bad_input_checks(client, list(SAMPLE))}["still serving afterwards"] == "fail"


def test_unknown_engine_is_one_sentence():
    from deploykit.errors import DeploykitError

    with pytest.raises(DeploykitError, match="Engine 'kserve' is unknown"):
        OipClient("http://127.0.0.1:1", "m", engine="kserve")


def test_cli_loadtest_and_validate_exit_nonzero_on_a_breach(triton, tmp_path):
    from typer.testing import CliRunner

    from deploykit.cli import app

    runner = CliRunner()
    common = ["--url", triton.http_url, "--model", triton.model, "--duration", "4"]
    breach = runner.invoke(app, ["loadtest", *common, "--slo", "image_classification", "--max-latency-ms", "0.001",
                                 "--out", str(tmp_path / "lt")])  # fmt: skip
    assert breach.exit_code == 1, breach.output
    assert "FAIL" in breach.output and (tmp_path / "lt" / "loadtest.json").is_file()
    ok = runner.invoke(app, ["validate", *common, "-u", "1", "--onnx", str(triton.onnx), "--min-throughput", "5",
                             "--out", str(tmp_path / "v")])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "v" / "validation.json").read_text())["passed"]
