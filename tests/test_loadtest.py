"""Load tests with real locust against a real Triton (HTTP and gRPC) and a real TorchServe, all on 127.0.0.1.

Each locust run lasts 3-4 s. Timing assertions are structural (ordering, Little's law, counts), not
absolute: the machines are shared.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from deploykit.errors import DeploykitError
from deploykit.loadtest import runner
from deploykit.loadtest.metrics import parse, torchserve_split, triton_split
from deploykit.loadtest.runner import levels_table, run_loadtest, run_locust, summarize_timings, verdict_table
from deploykit.loadtest.slo import custom_slo, get_slo, verdict
from deploykit.serve.access import KEY_ENV, KEY_FILE_ENV, TORCHSERVE_KEY_FILE_ENV
from deploykit.serve.process import free_port

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# The `triton` and `torchserve` fixtures (conftest.py) serve `tiny`: input [3, 8, 8] FP32, dynamic batching up to 8.


def test_http_run_has_sub_ms_percentiles_and_a_server_split(triton, tmp_path):
    r = run_locust(
        triton.http_url,
        triton.model,
        users=2,
        spawn_rate=2,
        duration_s=4,
        warmup_s=1,
        metrics_url=triton.metrics_url,
        workdir=tmp_path,
    )
    timings = np.load(tmp_path / "timings.npy")
    seen = f"{r} ({len(timings)} requests recorded)"  # the numbers, should a timing bound ever fail
    assert r.users == 2 and r.requests > 50 and r.failures == 0 and r.error_rate == 0.0, seen
    assert 0 < r.p50_ms <= r.p95_ms <= r.p99_ms, seen
    assert any(p != round(p) for p in (r.p50_ms, r.p95_ms, r.p99_ms)), seen  # locust's own CSV has whole ms
    assert 1.5 <= r.duration_s <= 3.5, seen  # the 4 s run less the 1 s warm-up
    assert r.throughput_rps == pytest.approx(r.requests / r.duration_s), seen
    # Little's law for a closed loop with no think time: users = throughput x latency (client overhead adds a bit)
    assert 0.5 <= r.throughput_rps * r.mean_ms / 1000 / r.users <= 1.05, seen
    assert timings.shape[1] == 3 and len(timings) > r.requests, seen  # warm-up requests: recorded, not measured

    s = r.server
    seen += f", server {s}"
    assert s["requests"] >= r.requests - r.failures, seen  # Triton saw the warm-up's requests too
    assert s["requests"] == pytest.approx(len(timings), abs=2), seen  # the very requests locust recorded
    assert 0 < s["queue_ms"] and 0 < s["compute_ms"], seen
    assert s["queue_ms"] + s["compute_ms"] <= s["total_ms"] * 1.05 + 0.05, seen
    assert s["total_ms"] < timings[:, 1].mean(), seen  # over the same requests, the client's time includes the server's
    assert 1.0 <= s["avg_batch_size"] <= 2.0, seen  # two users can never fill a batch of three


def test_grpc_run_with_real_samples(triton, tmp_path):
    samples = tmp_path / "samples.npy"
    np.save(samples, np.random.default_rng(1).random((5, 3, 8, 8), dtype=np.float32))
    r = run_locust(
        triton.http_url,
        triton.model,
        users=2,
        spawn_rate=2,
        duration_s=3,
        protocol="grpc",
        grpc_url=triton.grpc_url,
        samples=samples,
        workdir=tmp_path,
    )
    assert r.requests > 50 and r.failures == 0
    assert 0 < r.p50_ms <= r.p95_ms <= r.p99_ms
    assert r.server == {}  # no metrics URL given


def test_torchserve_run_and_its_server_split(torchserve, tmp_path):
    r = run_locust(
        torchserve.http_url,
        torchserve.model,
        users=2,
        spawn_rate=2,
        duration_s=3,
        engine="torchserve",
        input_shape=(3, 8, 8),
        metrics_url=torchserve.metrics_url,
        workdir=tmp_path,
    )
    assert r.requests > 20 and r.failures == 0
    assert 0 < r.p50_ms <= r.p95_ms <= r.p99_ms
    assert r.server["requests"] >= r.requests
    assert 0 < r.server["queue_ms"] < r.server["total_ms"]


def test_mistakes_are_refused_before_locust_starts(triton, torchserve, tmp_path):
    common = {"users": 1, "spawn_rate": 1, "duration_s": 3, "workdir": tmp_path}
    with pytest.raises(DeploykitError, match=r"Model 'nope' is not ready on Triton .*'tiny'"):
        run_locust(triton.http_url, "nope", **common)
    with pytest.raises(DeploykitError, match=r"Triton at http://127.0.0.1:\d+ is not ready \(nothing answered"):
        run_locust(f"http://127.0.0.1:{free_port()}", "tiny", **common)
    with pytest.raises(DeploykitError, match="gRPC endpoint .* does not answer"):
        run_locust(triton.http_url, "tiny", protocol="grpc", grpc_url=f"127.0.0.1:{free_port()}", **common)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(DeploykitError, match=r"shape \(1, 8, 8\) per sample but model 'tiny' takes \(3, 8, 8\)"):
        run_locust(triton.http_url, "tiny", samples=wrong, **common)
    with pytest.raises(DeploykitError, match="Model .nope. is not registered on TorchServe"):
        run_locust(torchserve.http_url, "nope", engine="torchserve", input_shape=(3, 8, 8), **common)
    with pytest.raises(DeploykitError, match="need input_shape"):
        run_locust(torchserve.http_url, "tiny", engine="torchserve", **common)
    with pytest.raises(DeploykitError, match="Protocol 'grpc' is not one torchserve speaks here: use http"):
        run_locust(torchserve.http_url, "tiny", engine="torchserve", protocol="grpc", **common)
    with pytest.raises(DeploykitError, match="Engine 'kserve' is unknown: use one of triton, torchserve"):
        run_locust(triton.http_url, "tiny", engine="kserve", **common)
    with pytest.raises(DeploykitError, match="duration_s=1.5 leaves less than 1 s after the 1 s warm-up"):
        run_locust(triton.http_url, "tiny", **{**common, "duration_s": 1.5})
    with pytest.raises(DeploykitError, match="Protocol 'kserve' is not one triton speaks here: use http or grpc"):
        run_locust(triton.http_url, "tiny", protocol="kserve", **common)
    assert not (tmp_path / "locust.log").exists()  # every mistake was caught before locust ran


def test_loadtest_writes_results_plot_and_a_failing_verdict(triton, tmp_path):
    impossible = custom_slo("image_classification", max_latency_ms=0.001)
    result = run_loadtest(
        triton.http_url,
        triton.model,
        users=[2, 1],
        duration_s=3,
        out_dir=tmp_path,
        metrics_url=triton.metrics_url,
        slo=impossible,
    )
    saved = json.loads((tmp_path / "loadtest.json").read_text())
    assert saved == json.loads(json.dumps(result, default=str))
    assert set(saved) == {"model", "url", "engine", "protocol", "inputs", "settings", "machine", "levels", "verdict"}
    assert saved["inputs"] == "zeros (no samples given)"  # never made-up data a model may refuse
    assert [level["users"] for level in saved["levels"]] == [1, 2]  # sorted, the highest judged
    assert all(level["server"]["requests"] > 0 for level in saved["levels"])
    assert saved["machine"]["cores"] == os.cpu_count() and saved["settings"]["users"] == [1, 2]
    assert (tmp_path / "latency_vs_concurrency.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "users-2" / "locust.log").exists()

    v = saved["verdict"]
    assert v["passed"] is False and set(v["criteria"]) == {"latency", "throughput"}  # no size: none was given
    assert v["criteria"]["latency"]["measured"] == saved["levels"][-1]["p95_ms"]
    assert not v["criteria"]["latency"]["passed"] and v["criteria"]["throughput"]["passed"]

    console = Console(record=True, width=120)
    console.print(verdict_table(result))
    console.print(levels_table(result))
    text = console.export_text()
    assert "SLO image_classification at 2 users: FAIL" in text and "latency P95" in text
    assert "inputs: zeros (no samples given)" in text
    assert f"{saved['levels'][0]['p50_ms']:.2f}" in text


def test_verdict_table_needs_a_verdict_and_size_is_optional():
    with pytest.raises(DeploykitError, match="without an SLO"):
        verdict_table({"verdict": None, "levels": []})
    v = verdict(get_slo("image_classification"), latency_ms=5.0, throughput=200.0, size_mb=None)
    assert v["passed"] and set(v["criteria"]) == {"latency", "throughput"}
    assert not verdict(get_slo("image_classification"), 5.0, 200.0, size_mb=60.0)["passed"]


def test_summary_leaves_out_the_warm_up_and_failed_requests_latencies():
    t0 = 1.8e9
    warm = [(t0 + i * 0.1, 100.0, 1) for i in range(10)]  # the first second: slow, must not count
    good = [(t0 + 1.0 + i * 0.01, 1.0 + i / 100, 1) for i in range(100)]  # 1.00 ... 1.99 ms
    failed = [(t0 + 1.5 + i * 0.1, 0.1, 0) for i in range(5)]  # fast errors: counted, not in the percentiles
    r = summarize_timings(np.array(warm + good + failed), warmup_s=1.0, users=1, log=Path("locust.log"))
    assert (r.requests, r.failures, r.error_rate) == (105, 5, pytest.approx(5 / 105))
    assert r.p50_ms == pytest.approx(1.495) and r.p99_ms == pytest.approx(1.9801)
    assert r.mean_ms == pytest.approx(1.495)
    assert r.duration_s == pytest.approx(0.99 + 0.00199, abs=1e-5)  # to the end of the last request (1.99 ms long)
    assert r.throughput_rps == pytest.approx(100 / r.duration_s)
    with pytest.raises(DeploykitError, match="All 5 measured requests failed"):
        summarize_timings(np.array(warm + failed), warmup_s=1.0, users=1, log=Path("locust.log"))
    with pytest.raises(DeploykitError, match="No request started after the 2 s warm-up"):
        summarize_timings(np.array(warm), warmup_s=2.0, users=1, log=Path("locust.log"))


def _locust_list(**env: str) -> subprocess.CompletedProcess:
    """`locust --list` on the standalone locustfile: which user classes the settings select."""
    argv = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"), "--list"]
    ambient = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, KEY_FILE_ENV, TORCHSERVE_KEY_FILE_ENV)}  # fixtures' keys
    return subprocess.run(argv, env={**ambient, **env}, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    "engine, protocol, user",
    [("triton", "http", "TritonHttpUser"), ("triton", "grpc", "TritonGrpcUser"), ("torchserve", "http", "TorchServeUser")],
)
def test_standalone_locustfile_runs_the_protocols_user_only(engine, protocol, user):
    env = {"DEPLOYKIT_ENGINE": engine, "DEPLOYKIT_PROTOCOL": protocol, "DEPLOYKIT_INPUT_SHAPE": "3,8,8"}
    out = _locust_list(DEPLOYKIT_MODEL="tiny", **env)
    assert out.returncode == 0 and out.stdout.split("Available Users:")[1].split() == [user]


def test_standalone_locustfile_refuses_bad_settings():
    out = _locust_list(DEPLOYKIT_ENGINE="torchserve", DEPLOYKIT_MODEL="tiny", DEPLOYKIT_INPUT_SHAPE="3x8")
    assert out.returncode == 1 and "DEPLOYKIT_INPUT_SHAPE='3x8' is not a shape" in out.stderr
    out = _locust_list(DEPLOYKIT_PROTOCOL="kserve", DEPLOYKIT_MODEL="tiny")
    assert out.returncode == 1 and "Protocol 'kserve' is not one triton speaks here" in out.stderr
    out = _locust_list(DEPLOYKIT_ENGINE="torchserve", DEPLOYKIT_PROTOCOL="grpc", DEPLOYKIT_MODEL="tiny")
    assert out.returncode == 1 and "Protocol 'grpc' is not one torchserve speaks here" in out.stderr
    out = _locust_list(DEPLOYKIT_MODEL="tiny", DEPLOYKIT_KEY="short")  # a key no header could carry
    assert out.returncode == 1 and "The key in $DEPLOYKIT_KEY is not 16-512 characters" in out.stderr


def test_the_run_clock_starts_at_the_first_request_not_at_locusts_start(triton, tmp_path):
    """locust's -t (30 s here) is only the backstop: the locustfile stops DEPLOYKIT_RUN_S after its first request, so
    a slow start on a busy machine cannot shrink the measured window (it once left nothing after the warm-up)."""
    timings = tmp_path / "timings.npy"
    argv = [sys.executable, "-m", "locust", "-f", str(runner.LOCUSTFILE), "--headless", "--only-summary"]
    argv += ["-u", "1", "-r", "1", "-t", "30s", "--host", triton.http_url, "--stop-timeout", "5"]
    env = {**os.environ, "DEPLOYKIT_MODEL": triton.model, "DEPLOYKIT_RUN_S": "2", "DEPLOYKIT_SAMPLES_OUT": str(timings)}
    out = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    starts = np.load(timings)[:, 0]
    assert 1.5 <= starts.max() - starts.min() <= 3.0, f"{len(starts)} requests over {starts.max() - starts.min():.2f} s"


def test_a_locust_past_its_time_limit_is_stopped(triton, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_START_GRACE_S", 0)
    monkeypatch.setattr(runner, "_EXIT_MARGIN_S", -2.0)  # a 3 s run allowed 1 s: as if locust hung
    with pytest.raises(DeploykitError, match="still running 1 s after a 3 s test and was stopped"):
        run_locust(triton.http_url, triton.model, users=1, spawn_rate=1, duration_s=3, workdir=tmp_path)
    # stopped with its whole process group (how far locust got before that depends on the machine's load)
    left = subprocess.run(["pgrep", "-f", str(runner.LOCUSTFILE)], capture_output=True, text=True).stdout
    assert left.strip() == ""


# ---- Prometheus text ------------------------------------------------------------------------------------

# Captured from Triton 2.51 after a load test; version 2 and the model `tiny2` were added by hand, so the
# split must sum over versions and must not mistake `tiny2` for `tiny`.
TRITON_METRICS = """# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="tiny",version="1"} 28871
nv_inference_request_success{model="tiny",version="2"} 100
nv_inference_request_success{model="tiny2",version="1"} 1000000
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="tiny",version="1"} 28871
nv_inference_count{model="tiny",version="2"} 100
# HELP nv_inference_exec_count Number of model executions performed (does not include cached requests)
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="tiny",version="1"} 14840
nv_inference_exec_count{model="tiny",version="2"} 50
# HELP nv_inference_request_duration_us Cumulative inference request duration in microseconds (includes cached requests)
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="tiny",version="1"} 25619994
nv_inference_request_duration_us{model="tiny",version="2"} 200000
nv_inference_request_duration_us{model="tiny2",version="1"} 999999999
# HELP nv_inference_queue_duration_us Cumulative inference queuing duration in microseconds (includes cached requests)
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="tiny",version="1"} 14254424
nv_inference_queue_duration_us{model="tiny",version="2"} 50000
# HELP nv_inference_compute_input_duration_us Cumulative compute input duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_input_duration_us counter
nv_inference_compute_input_duration_us{model="tiny",version="1"} 523724
nv_inference_compute_input_duration_us{model="tiny",version="2"} 10000
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="tiny",version="1"} 4063362
nv_inference_compute_infer_duration_us{model="tiny",version="2"} 100000
# HELP nv_inference_compute_output_duration_us Cumulative inference compute output duration in microseconds (does not include cached requests)
# TYPE nv_inference_compute_output_duration_us counter
nv_inference_compute_output_duration_us{model="tiny",version="1"} 6691814
nv_inference_compute_output_duration_us{model="tiny",version="2"} 20000
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="tiny",version="1"} 0
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 1
"""

# Captured from TorchServe 0.12 (metrics_mode=prometheus) after one request; its trailing commas are its own.
TORCHSERVE_METRICS = """# HELP ts_inference_requests_total Torchserve prometheus counter metric with unit: Count
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="tiny",model_version="default",hostname="vm",} 1.0
# HELP ts_inference_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds
# TYPE ts_inference_latency_microseconds counter
ts_inference_latency_microseconds{model_name="tiny",model_version="default",hostname="vm",} 3451.727
# HELP ts_queue_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds
# TYPE ts_queue_latency_microseconds counter
ts_queue_latency_microseconds{model_name="tiny",model_version="default",hostname="vm",} 245.274
# HELP QueueTime Torchserve prometheus gauge metric with unit: Milliseconds
# TYPE QueueTime gauge
QueueTime{Level="Host",Hostname="vm",} 0.0
"""


def test_parse_keys_counters_by_their_exposed_name_with_sorted_labels():
    values = parse(TRITON_METRICS)
    assert values['nv_inference_exec_count{model="tiny",version="1"}'] == 14840
    assert values['nv_inference_pending_request_count{model="tiny",version="1"}'] == 0
    assert values["nv_cpu_utilization"] == 1
    ts = parse(TORCHSERVE_METRICS)
    assert ts['ts_inference_requests{hostname="vm",model_name="tiny",model_version="default"}'] == 1.0
    assert ts['QueueTime{Hostname="vm",Level="Host"}'] == 0.0


def test_triton_split_sums_versions_of_one_model():
    split = triton_split({}, parse(TRITON_METRICS), "tiny")
    requests = 28871 + 100
    assert split["requests"] == requests
    assert split["avg_batch_size"] == pytest.approx(requests / (14840 + 50))
    assert split["queue_ms"] == pytest.approx((14254424 + 50000) / requests / 1000)
    compute_us = 523724 + 10000 + 4063362 + 100000 + 6691814 + 20000
    assert split["compute_ms"] == pytest.approx(compute_us / requests / 1000)
    assert split["total_ms"] == pytest.approx((25619994 + 200000) / requests / 1000)
    with pytest.raises(DeploykitError, match="no successful request for model 'tiny'"):
        triton_split(parse(TRITON_METRICS), parse(TRITON_METRICS), "tiny")  # nothing happened in between


def test_torchserve_split():
    split = torchserve_split({}, parse(TORCHSERVE_METRICS), "tiny")
    assert split == pytest.approx({"requests": 1.0, "queue_ms": 0.245274, "total_ms": 3.451727})
    with pytest.raises(DeploykitError, match="no request for model 'other'"):
        torchserve_split({}, parse(TORCHSERVE_METRICS), "other")


def test_cli_soak_holds_80_percent_of_capacity_without_errors_or_memory_growth(triton, tmp_path):
    """The short CI version of `deploykit loadtest --soak 10m`: 8 s at 80% of the capacity 2 users measured."""
    from typer.testing import CliRunner

    from deploykit.cli import app
    from deploykit.loadtest.soak import parse_duration

    out = tmp_path / "soak"
    args = ["loadtest", "--url", triton.http_url, "--model", triton.model, "-u", "2", "--soak", "8s", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "soak.json").read_text())
    assert saved["target_rps"] == pytest.approx(0.8 * saved["capacity_rps"]) and saved["capacity_rps"] > 0
    assert saved["failures"] == 0 and saved["requests"] > 0 and abs(saved["rss_growth"]) < 0.05
    assert len(saved["windows"]) == 10 and sum(w["requests"] for w in saved["windows"]) >= saved["requests"]
    assert saved["throughput_rps"] <= 1.1 * saved["target_rps"]  # an open rate, not back to back
    assert "P95 drift" in result.output and "PASS" in result.output
    assert (parse_duration("10m"), parse_duration("90"), parse_duration("1h")) == (600, 90, 3600)
    with pytest.raises(DeploykitError, match="not a positive time"):
        parse_duration("soon")
