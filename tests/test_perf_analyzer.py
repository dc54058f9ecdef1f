"""perf_analyzer (the tritonclient 2.51 binary) as a second load generator, against a real Triton on 127.0.0.1.

Each real sweep measures 500 ms windows until three agree within 50% (loose: the machines are shared), a few
seconds per run. As with locust, speed is never asserted, only structure: ordering, levels, files.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from servers import SAMPLE

from deploykit.errors import DeploykitError
from deploykit.loadtest import perf_analyzer as pa
from deploykit.loadtest.slo import get_slo
from deploykit.serve.access import KEY_ENV, KEY_FILE_ENV, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, client_access

# Two levels as perf_analyzer 2.51 writes them with --percentile=95 (every value but throughput in microseconds).
CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
2,3775.78,58,153,101,10,167,34,0,512,605,657,1518
1,3223.26,38,66,28,9,117,46,1,285,343,375,587
"""

FAST = {"measurement_interval_ms": 500, "stability_percentage": 50.0, "max_trials": 10, "timeout_s": 60.0}


def test_csv_rows_are_in_ms_sorted_by_users_with_the_latency_split():
    rows = pa.parse_csv(CSV)
    assert [r["users"] for r in rows] == [1, 2]
    one = rows[0]
    assert one["throughput_rps"] == pytest.approx(3223.26)
    assert (one["p50_ms"], one["p90_ms"], one["p95_ms"], one["p99_ms"]) == pytest.approx((0.285, 0.343, 0.375, 0.587))
    assert one["client"] == pytest.approx({"send_ms": 0.038, "network_ms": 0.066, "recv_ms": 0.001})
    assert one["server"] == pytest.approx(
        {
            "queue_ms": 0.028,
            "compute_input_ms": 0.009,
            "compute_infer_ms": 0.117,
            "compute_output_ms": 0.046,
            "compute_ms": 0.172,
        }
    )
    assert one["avg_ms"] == pytest.approx((38 + 66 + 28 + 9 + 117 + 46 + 1) / 1000)
    assert rows[1]["p99_ms"] == pytest.approx(1.518)


def test_csv_without_concurrency_columns_is_refused():
    with pytest.raises(DeploykitError, match=r"lacks the columns \['Concurrency'"):
        pa.parse_csv("Request Rate,Inferences/Second\n10,9.9\n")


def test_rows_are_judged_by_the_runner_s_slo_verdict_at_the_top_level():
    rows = pa.parse_csv(CSV)
    judged = pa.judge(rows, get_slo("image_classification"))
    assert judged["criteria"]["latency"]["measured"] == pytest.approx(0.657)  # P95 at 2 users
    assert judged["criteria"]["throughput"]["measured"] == pytest.approx(3775.78)
    assert judged["passed"]
    with pytest.raises(DeploykitError, match="Latency percentile 'p90' is unknown"):
        pa.judge(rows, get_slo("image_classification"), latency_percentile="p90")


def test_evenly_spaced_levels_are_one_sweep_others_one_run_each():
    assert pa._sweeps([1, 2]) == ["1:2:1"]
    assert pa._sweeps([2, 4, 6]) == ["2:6:2"]
    assert pa._sweeps([4]) == ["4:4:1"]
    assert pa._sweeps([1, 2, 4]) == ["1:1", "2:2", "4:4"]


def test_load_goes_only_to_loopback(tmp_path):
    with pytest.raises(DeploykitError, match="not a port on 127.0.0.1"):
        pa.run_perf_analyzer("http://10.1.2.3:8000", "tiny", concurrency=[1], out_dir=tmp_path)
    with pytest.raises(DeploykitError, match="not a port on 127.0.0.1"):
        pa.run_perf_analyzer(
            "http://127.0.0.1:8000",
            "tiny",
            protocol="grpc",
            grpc_url="example.com:8001",
            concurrency=[1],
            out_dir=tmp_path,
        )
    assert not list(tmp_path.iterdir())


def test_a_missing_binary_or_a_wrapper_script_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(pa.PERF_ANALYZER_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DeploykitError, match="perf_analyzer not found.*make setup"):
        pa.find_perf_analyzer()
    wrapper = tmp_path / "perf_analyzer"
    wrapper.write_text("#!/usr/bin/env python\nimport sys; sys.exit(0)\n")
    monkeypatch.setenv(pa.PERF_ANALYZER_VAR, str(wrapper))
    with pytest.raises(DeploykitError, match="not the perf_analyzer binary"):
        pa.find_perf_analyzer()


def test_the_key_and_grpc_tls_come_from_the_environment_and_the_key_never_shows(monkeypatch, tmp_path):
    for var in (KEY_ENV, KEY_FILE_ENV, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV):
        monkeypatch.delenv(var, raising=False)
    assert pa.access_args(client_access(), "grpc") == []  # an open server: nothing added
    key = "k" * 20
    monkeypatch.setenv(KEY_ENV, key)
    monkeypatch.setenv(TLS_CA_ENV, str(tmp_path / "ca.pem"))
    access = client_access()
    assert pa.access_args(access, "http") == ["-H", f"deploykit-key:{key}"]  # TLS is gRPC's only
    assert pa.access_args(access, "grpc") == [
        "-H", f"triton-grpc-protocol-deploykit-key:{key}",  # the name Triton 2.51 checks gRPC metadata for
        "--ssl-grpc-use-ssl", f"--ssl-grpc-root-certifications-file={tmp_path / 'ca.pem'}",
    ]  # fmt: skip
    monkeypatch.setenv(TLS_CERT_ENV, str(tmp_path / "client.pem"))
    monkeypatch.setenv(TLS_KEY_ENV, str(tmp_path / "client.key"))
    assert pa.access_args(client_access(), "grpc")[-2:] == [
        f"--ssl-grpc-certificate-chain-file={tmp_path / 'client.pem'}",
        f"--ssl-grpc-private-key-file={tmp_path / 'client.key'}",
    ]
    shown = pa.masked(f"$ perf_analyzer -H deploykit-key:{key} -m tiny", access)
    assert shown == "$ perf_analyzer -H deploykit-key:*** -m tiny"


# ---- against the real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary():
    try:
        return pa.find_perf_analyzer()
    except DeploykitError as e:
        pytest.skip(f"perf_analyzer cannot run here: {e}")


@pytest.fixture
def samples(tmp_path) -> Path:
    path = tmp_path / "samples.npy"
    np.save(path, np.random.default_rng(0).standard_normal((6, *SAMPLE)).astype(np.float32))
    return path


def test_input_data_holds_the_samples_as_the_model_s_input(binary, triton, samples, tmp_path):
    path = pa.write_input_data(triton.http_url, triton.model, samples, tmp_path / "input.json", limit=4)
    entries = json.loads(path.read_text())["data"]
    assert len(entries) == 4
    assert entries[0]["input"]["shape"] == list(SAMPLE)
    decoded = np.frombuffer(base64.b64decode(entries[3]["input"]["b64"]), np.float32).reshape(SAMPLE)
    np.testing.assert_array_equal(decoded, np.load(samples)[3])
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(DeploykitError, match=r"shape \(3, 4, 4\).*'tiny' takes \(3, 8, 8\)"):
        pa.write_input_data(triton.http_url, triton.model, wrong, tmp_path / "wrong.json")


def test_without_samples_it_sends_zeros_and_the_model_refuses_none(binary, triton, tmp_path):
    """perf_analyzer's own default, random bytes, is NaN/Inf as FP32, which the portable model refuses."""
    from deploykit.loadtest.metrics import scrape, total

    def count(name: str) -> float:
        values = scrape(triton.metrics_url)
        assert any(k.startswith(f"{name}{{") for k in values), name  # the series exists: a 0 below means 0
        return total(values, name, {"model": triton.model})

    failures, successes = count("nv_inference_request_failure"), count("nv_inference_request_success")
    result = pa.perf_loadtest(
        triton.http_url, triton.model, users=1, out_dir=tmp_path, duration_s=1.5, stability_percentage=50.0
    )
    assert count("nv_inference_request_failure") == failures and count("nv_inference_request_success") > successes
    assert result["inputs"] == "zeros (no samples given)"
    assert "--input-data zero " in (tmp_path / pa.LOG_NAME).read_text()
    assert json.loads((tmp_path / pa.JSON_NAME).read_text())["settings"]["input_data"] == "zero"


def test_http_sweep_of_two_levels_with_real_samples(binary, triton, samples, tmp_path):
    data = pa.write_input_data(triton.http_url, triton.model, samples, tmp_path / "input.json")
    start = time.monotonic()
    settings = {k: v for k, v in FAST.items() if k != "stability_percentage"}
    # as the CLI runs it: a level that never settles (perf_analyzer then ends the sweep early, exit code 0) is
    # measured once more at twice the bound
    rows, _ = pa.run_settled(
        triton.http_url, triton.model, FAST["stability_percentage"], concurrency=[2, 1], input_data=data,
        out_dir=tmp_path / "out", **settings,
    )  # fmt: skip
    print(f"2-level HTTP sweep: {time.monotonic() - start:.1f} s; {rows}")
    assert [r["users"] for r in rows] == [1, 2]
    for r in rows:
        assert r["throughput_rps"] > 0
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["avg_ms"] > 0 and r["server"]["compute_infer_ms"] > 0
    out = tmp_path / "out"
    assert (out / pa.CSV_NAME).read_text().startswith("Concurrency,")
    written = json.loads((out / pa.JSON_NAME).read_text())
    assert written["levels"] == rows and written["settings"]["concurrency"] == [1, 2]
    assert "--percentile=95" in (out / pa.LOG_NAME).read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_grpc_levels_that_are_not_evenly_spaced_run_one_by_one(binary, triton, tmp_path):
    rows = pa.run_perf_analyzer(
        triton.http_url,
        triton.model,
        protocol="grpc",
        grpc_url=triton.grpc_url,
        concurrency=[1, 3, 4],
        out_dir=tmp_path,
        **FAST,
    )
    assert [r["users"] for r in rows] == [1, 3, 4]
    assert all(r["throughput_rps"] > 0 and r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in rows)
    assert len((tmp_path / pa.CSV_NAME).read_text().splitlines()) == 4  # one header, one row per level


def test_an_unknown_model_fails_with_its_name_and_writes_no_results(binary, triton, tmp_path):
    (tmp_path / pa.CSV_NAME).write_text("an earlier run's results\n")
    with pytest.raises(DeploykitError, match=r"code 99 on model 'no_such_model'.*'no_such_model' is not found"):
        pa.run_perf_analyzer(triton.http_url, "no_such_model", concurrency=[1], out_dir=tmp_path, **FAST)
    assert not (tmp_path / pa.CSV_NAME).exists() and not (tmp_path / pa.JSON_NAME).exists()
    assert (tmp_path / pa.LOG_NAME).is_file()


def test_a_run_past_its_timeout_is_stopped(binary, triton, tmp_path):
    start = time.monotonic()
    with pytest.raises(DeploykitError, match="still running after timeout_s=1 s"):
        pa.run_perf_analyzer(
            triton.http_url, triton.model, concurrency=[1], out_dir=tmp_path, measurement_interval_ms=5000, timeout_s=1
        )
    assert time.monotonic() - start < 10
    assert "--concurrency-range 1:1:1" in (tmp_path / pa.LOG_NAME).read_text()


def test_cli_loadtest_with_perf_analyzer_prints_levels_and_judges(triton, tmp_path):
    from typer.testing import CliRunner

    from deploykit.cli import app

    out = tmp_path / "pa"
    common = ["loadtest", "--url", triton.http_url, "--model", triton.model, "--client", "perf_analyzer"]
    args = [*common, "-u", "1", "-u", "2", "--duration", "1.5", "--stability", "50", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--slo", "image_classification", "--max-latency-ms", "0.001"])
    assert result.exit_code == 1, result.output  # a breach of an impossible target exits 1
    assert "(perf_analyzer)" in result.output and "FAIL" in result.output
    assert "inputs: zeros" in result.output  # no --samples: zeros, and the console says so
    saved = json.loads((out / "perf_analyzer.json").read_text())
    assert [level["users"] for level in saved["levels"]] == [1, 2] and (out / "perf_analyzer.csv").is_file()
    refused = CliRunner().invoke(app, [*common, "--engine", "torchserve", "--out", str(out)])
    assert refused.exit_code != 0 and "use --client locust for TorchServe" in refused.output


def test_an_unstable_measurement_is_retried_with_twice_the_bound_up_to_100(monkeypatch):
    tried: list[float] = []

    def fake(url, model, stability_percentage, **settings):
        tried.append(stability_percentage)
        if stability_percentage < 100.0:
            raise pa.UnstableMeasurement("no stable measurement")
        return [{"users": 1}]

    monkeypatch.setattr(pa, "run_perf_analyzer", fake)
    assert pa.run_settled("http://127.0.0.1:1", "m", 25.0) == ([{"users": 1}], 100.0)
    assert tried == [25.0, 50.0, 100.0]
    monkeypatch.setattr(pa, "run_perf_analyzer", lambda *a, **k: (_ for _ in ()).throw(pa.UnstableMeasurement("x")))
    with pytest.raises(pa.UnstableMeasurement):  # past 100% it is the measurement's failure, said as such
        pa.run_settled("http://127.0.0.1:1", "m", 60.0)
