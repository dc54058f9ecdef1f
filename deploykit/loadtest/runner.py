"""Load tests against a running server: locust in a child process, sub-millisecond percentiles, an SLO verdict.

Each concurrency level is one headless locust run of the packaged locustfile. Its users write every
request's raw timing, so percentiles here are exact (locust's own are whole milliseconds), and the
first `warmup_s` seconds (connections opening, the server's first batches) are left out of them.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from rich.table import Table

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_json
from deploykit.loadtest import inputs_note, metrics
from deploykit.loadtest.slo import PERCENTILES, SLO, verdict
from deploykit.progress import Reporter, Task, silent
from deploykit.serve.access import client_access
from deploykit.serve.engines import engine_traits
from deploykit.serve.oip import (
    TORCHSERVE_INPUT_NAME,
    OipClient,
    check_samples,
    key_refused,
    oip_body,
    sample_shape,
)
from deploykit.serve.process import ServerProcess, http_status
from deploykit.serve.triton import ModelControl

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
_EXIT_MARGIN_S = 30.0  # --stop-timeout 5 and writing the timings, after the run
_START_GRACE_S = 30  # the users' start (imports, metadata, encoding) before the first request starts the clock


@dataclass
class LoadResult:
    """One concurrency level, over the measured window (after warm-up).

    Latencies are of successful requests; `server` is the server's own split of where the time went,
    from its metrics scraped before and after the whole run (warm-up included), {} without a metrics URL.
    """

    users: int
    requests: int
    failures: int
    duration_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    throughput_rps: float
    error_rate: float
    server: dict[str, float] = field(default_factory=dict)


def _preflight_triton(url: str, model: str, protocol: str, grpc_url: str, samples: Path | None) -> None:
    """Fail before locust starts: server not ready, model unknown, gRPC port wrong, samples of the wrong shape."""
    status = http_status(f"{url}/v2/health/ready")
    if status != 200:
        said = "nothing answered" if status is None else f"it answered {status}"
        raise DeploykitError(f"Triton at {url} is not ready ({said} at /v2/health/ready): start it or fix the URL.")
    if http_status(f"{url}/v2/models/{model}/ready") != 200:
        names = [m.get("name") for m in ModelControl(url).model_states()]
        raise DeploykitError(
            f"Model '{model}' is not ready on Triton at {url}: use one of {names} or check the server's log."
        )
    if protocol == "grpc":
        access = client_access()
        try:
            with access.grpc_client(grpc_url) as client:
                client.is_server_ready(headers=access.grpc_headers, client_timeout=5)
        except Exception:  # noqa: BLE001 (tritonclient raises its own types for every connection failure)
            raise DeploykitError(
                f"Triton's gRPC endpoint {grpc_url} does not answer: pass the right grpc_url."
            ) from None
    check_samples(samples, sample_shape(OipClient(url, model).metadata()["inputs"][0]["shape"]), model)


def _preflight_torchserve(url: str, model: str, input_shape: tuple[int, ...] | None, samples: Path | None) -> None:
    """TorchServe has no model metadata: /ping, then one real request, which also proves the shape is accepted;
    both carry its inference key, which its token authorization wants even for /ping."""
    if input_shape is None:
        raise DeploykitError(
            "TorchServe load tests need input_shape: pass it, e.g. (3, 224, 224), as TorchServe does not report it."
        )
    client = OipClient(url, model, "torchserve")
    status, text = client.request("/ping")
    if status != 200:
        said = "nothing answered" if status == 0 else f"it answered {status}"
        fix = key_refused(status, text, "torchserve") or "start it or fix the URL"
        raise DeploykitError(f"TorchServe at {url} does not answer /ping with 200 ({said}): {fix}.")
    check_samples(samples, tuple(input_shape), model)
    status, text = client.post_infer(oip_body(TORCHSERVE_INPUT_NAME, "FP32", np.zeros(input_shape, np.float32)))
    if status == 0:
        raise DeploykitError(f"TorchServe at {url} failed a test request ({text}): check the server's log.")
    if status == 404:
        raise DeploykitError(
            f"Model '{model}' is not registered on TorchServe at {url}: "
            "check the name (its management API's /models lists them)."
        )
    if status != 200:
        fix = key_refused(status, text, "torchserve") or (
            "check input_shape, or the server's log if the model is still loading"
        )
        raise DeploykitError(
            f"Model '{model}' on TorchServe at {url} answered {status} to an input of shape {tuple(input_shape)}: "
            f"{fix}."
        )


def summarize_timings(timings: np.ndarray, warmup_s: float, users: int, log: Path) -> LoadResult:
    """Percentiles and throughput over requests that started after the warm-up.

    `timings` rows are [start s since epoch, response time ms, success 0/1], as the locustfile writes them;
    latencies are of successful requests (a fast error would flatter them), failures count in error_rate.
    """
    if len(timings) == 0:
        raise DeploykitError(f"Locust sent no request in the whole run: see {log} for why.")
    start, latency_ms, ok = timings[:, 0], timings[:, 1], timings[:, 2] == 1
    window_start = start.min() + warmup_s
    measured = start >= window_start
    if not measured.any():
        raise DeploykitError(f"No request started after the {warmup_s:g} s warm-up: lengthen duration_s.")
    window_end = (start + latency_ms / 1000)[measured].max()
    good = latency_ms[measured & ok]
    requests, failures = int(measured.sum()), int((measured & ~ok).sum())
    if len(good) == 0:
        raise DeploykitError(f"All {requests} measured requests failed: see the error report at the end of {log}.")
    duration = float(window_end - window_start)
    p50, p95, p99 = (float(p) for p in np.percentile(good, [50, 95, 99]))
    return LoadResult(
        users=users,
        requests=requests,
        failures=failures,
        duration_s=duration,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        mean_ms=float(good.mean()),
        throughput_rps=len(good) / duration,
        error_rate=failures / requests,
    )


def run_locust(
    url: str,
    model: str,
    *,
    users: int,
    spawn_rate: float,
    duration_s: float,
    protocol: str = "http",
    grpc_url: str | None = None,
    samples: Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    metrics_url: str | None = None,
    engine: str = "triton",
    workdir: Path | None = None,
    warmup_s: float = 1.0,
    progress: Task | None = None,
    rate_per_user: float | None = None,
) -> LoadResult:
    """One headless locust run of `users` closed-loop users for `duration_s` (whole seconds, rounded up); with
    `rate_per_user` (Triton HTTP), each user sends that many requests per second instead of back to back.

    `url` is the server's HTTP base URL (also for gRPC, whose readiness and metadata are checked over it).
    Writes locust.log and timings.npy into `workdir` (a temporary folder when None).
    """
    engine_traits(engine).check_protocol(protocol)
    if users < 1 or spawn_rate <= 0:
        raise DeploykitError(f"users={users} and spawn_rate={spawn_rate:g} must be positive: pass at least 1 user.")
    if duration_s - warmup_s < 1:
        raise DeploykitError(
            f"duration_s={duration_s:g} leaves less than 1 s after the {warmup_s:g} s warm-up: lengthen it."
        )
    url = url.rstrip("/")
    grpc_url = grpc_url or f"{urlsplit(url).hostname}:8001"
    if engine == "torchserve":
        if input_shape is None and samples is not None:  # TorchServe cannot say its input shape; the samples can
            input_shape = tuple(np.load(samples, mmap_mode="r").shape[1:])
        _preflight_torchserve(url, model, input_shape, samples)
    else:
        _preflight_triton(url, model, protocol, grpc_url, samples)

    scratch = workdir is None  # a temporary folder goes after a good run, and stays after a failure for its log
    workdir = (
        Path(tempfile.mkdtemp(prefix="deploykit-locust-")) if scratch else Path(workdir).resolve()
    )  # locust runs in it
    workdir.mkdir(parents=True, exist_ok=True)
    log, timings_path = workdir / "locust.log", workdir / "timings.npy"
    for old in (log, timings_path):  # never read a previous run's output
        old.unlink(missing_ok=True)
    seconds = math.ceil(duration_s)  # counted from the first request; locust's -t is the backstop for a stuck start
    env = {
        **os.environ,
        "DEPLOYKIT_ENGINE": engine,
        "DEPLOYKIT_PROTOCOL": protocol,
        "DEPLOYKIT_MODEL": model,
        "DEPLOYKIT_GRPC_URL": grpc_url,
        "DEPLOYKIT_SAMPLES_OUT": str(timings_path),
        "DEPLOYKIT_RUN_S": str(seconds),
    }
    env.pop("DEPLOYKIT_RATE_PER_USER", None)
    if rate_per_user:
        env["DEPLOYKIT_RATE_PER_USER"] = f"{rate_per_user:g}"
    env.pop("DEPLOYKIT_SAMPLES_IN", None)
    if samples is not None:
        env["DEPLOYKIT_SAMPLES_IN"] = str(Path(samples).resolve())
    if input_shape is not None:
        env["DEPLOYKIT_INPUT_SHAPE"] = ",".join(str(d) for d in input_shape)
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary"]
    argv += ["-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{seconds + _START_GRACE_S}s", "--host", url]
    argv += ["--stop-timeout", "5"]

    before = metrics.scrape(metrics_url) if metrics_url else {}
    # cwd=workdir: locust would otherwise read a locust.conf or pyproject.toml from wherever we run
    proc = ServerProcess(argv, log, env=env, cwd=workdir)
    try:
        _wait(proc, seconds + _START_GRACE_S + _EXIT_MARGIN_S, seconds, progress)
    finally:
        proc.stop()
    if proc.proc.returncode not in (0, 1):  # 1: some requests failed, which the numbers show
        raise DeploykitError(
            f"Locust exited with code {proc.proc.returncode}: see {log} (last lines: {proc.log_tail(3)!r})."
        )
    if not timings_path.exists():
        raise DeploykitError(f"Locust wrote no timings to {timings_path}: see {log} for why.")
    result = summarize_timings(np.load(timings_path), warmup_s, users, log)
    if metrics_url:
        result.server = metrics.SPLITS[engine](before, metrics.scrape(metrics_url), model)
    if scratch:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _wait(proc: ServerProcess, limit_s: float, seconds: int, progress: Task | None) -> None:
    """Wait for locust to exit, moving the bar with the clock; stop it past `limit_s` (a hung run never blocks)."""
    start, shown = time.monotonic(), 0
    while proc.running:
        elapsed = time.monotonic() - start
        if elapsed > limit_s:
            raise DeploykitError(
                f"Locust was still running {limit_s:g} s after a {seconds} s test and was stopped: "
                f"see {proc.log_path} for what it was waiting on."
            )
        if progress is not None and (step := min(int(elapsed), seconds) - shown) > 0:
            progress.advance(step)
            shown += step
        time.sleep(0.2)


def run_loadtest(
    url: str,
    model: str,
    *,
    users: list[int] | int,
    out_dir: Path,
    duration_s: float = 10.0,
    spawn_rate: float | None = None,
    protocol: str = "http",
    grpc_url: str | None = None,
    samples: Path | None = None,
    input_shape: tuple[int, ...] | None = None,
    metrics_url: str | None = None,
    engine: str = "triton",
    warmup_s: float = 1.0,
    slo: SLO | None = None,
    size_mb: float | None = None,
    latency_percentile: str = "p95",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """One locust run per concurrency level; writes loadtest.json and latency_vs_concurrency.png into `out_dir`.

    The SLO verdict judges the highest level (the load the deployment must carry); `spawn_rate` None
    starts each level's users within a second. Users send the first samples of `samples`, or zeros without them.
    """
    levels = sorted({users} if isinstance(users, int) else set(users))
    if not levels or levels[0] < 1:
        raise DeploykitError(f"Concurrency levels {levels} are invalid: pass positive user counts, e.g. [1, 2, 4, 8].")
    if latency_percentile not in PERCENTILES:  # checked here too, so a typo fails before minutes of load
        raise DeploykitError(
            f"Latency percentile '{latency_percentile}' is unknown: use one of {', '.join(PERCENTILES)}."
        )
    reporter = reporter or silent()
    reporter.log(f"load test inputs: {inputs_note(samples)}")
    out_dir = Path(out_dir)
    results: list[LoadResult] = []
    for n in levels:
        with reporter.task(f"load test: {n} user{'s' if n > 1 else ''}", total=math.ceil(duration_s)) as task:
            result = run_locust(
                url,
                model,
                users=n,
                spawn_rate=spawn_rate or n,
                duration_s=duration_s,
                protocol=protocol,
                grpc_url=grpc_url,
                samples=samples,
                input_shape=input_shape,
                metrics_url=metrics_url,
                engine=engine,
                workdir=out_dir / f"users-{n}",
                warmup_s=warmup_s,
                progress=task,
            )
        reporter.log(
            f"{n} users: P50 {result.p50_ms:.2f} ms, P95 {result.p95_ms:.2f} ms, P99 {result.p99_ms:.2f} ms, "
            f"{result.throughput_rps:.1f} req/s, {result.failures} failed"
        )
        results.append(result)

    from deploykit.machine import machine_info  # imports torch: only once the runs are done

    top = results[-1]
    judged = None
    if slo is not None:
        latency = getattr(top, f"{latency_percentile}_ms")
        judged = verdict(slo, latency, top.throughput_rps, size_mb, latency_percentile)
    summary = {
        "model": model,
        "url": url,
        "engine": engine,
        "protocol": protocol,
        "inputs": inputs_note(samples),
        "settings": {
            "users": levels,
            "duration_s": duration_s,
            "spawn_rate": spawn_rate,
            "warmup_s": warmup_s,
            "samples": str(samples) if samples else None,
            "metrics_url": metrics_url,
        },
        "machine": machine_info(),
        "levels": [asdict(r) for r in results],
        "verdict": judged,
    }
    plot_levels(results, out_dir / "latency_vs_concurrency.png")
    atomic_write_json(out_dir / "loadtest.json", summary)
    return summary


def plot_levels(results: list[LoadResult], path: Path) -> None:
    """P50/P95/P99 latency (left) and throughput (right) against the number of concurrent users."""
    from matplotlib.figure import Figure

    from deploykit.report.plots import save_png

    users = [r.users for r in results]
    fig = Figure(figsize=(10, 4))
    lat_ax, thr_ax = fig.subplots(1, 2)
    for i, p in enumerate(("p50", "p95", "p99")):
        lat_ax.plot(users, [getattr(r, f"{p}_ms") for r in results], marker="osD"[i], label=p.upper())
    thr_ax.plot(users, [r.throughput_rps for r in results], marker="o", color="C3")
    lat_ax.set(title="Latency vs concurrency", xlabel="concurrent users", ylabel="latency (ms)")
    thr_ax.set(title="Throughput vs concurrency", xlabel="concurrent users", ylabel="successful requests / s")
    for ax in (lat_ax, thr_ax):
        ax.set_xticks(users)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    lat_ax.legend()
    save_png(fig, path)


def levels_table(result: dict[str, Any]) -> Table:
    """P50/P95/P99 and throughput per concurrency level of a load test (locust's or perf_analyzer's)."""
    client = result.get("client", "locust")
    table = Table(title=f"Load test of '{result['model']}' over {result['protocol']} ({client})",
                  caption=f"inputs: {result['inputs']}" if result.get("inputs") else None)  # fmt: skip
    for column in ("users", "P50 ms", "P95 ms", "P99 ms", "req/s", "errors"):
        table.add_column(column, justify="right")
    for level in result["levels"]:
        ms = (f"{level[k]:.2f}" for k in ("p50_ms", "p95_ms", "p99_ms"))
        # perf_analyzer stops (and deploykit raises) on the first failed request: its levels have none
        errors = f"{100 * level['error_rate']:.2f}%" if "error_rate" in level else "0"
        table.add_row(str(level["users"]), *ms, f"{level['throughput_rps']:.1f}", errors)
    return table


def verdict_table(result: dict[str, Any]) -> Table:
    """Pass/fail per SLO criterion of a `run_loadtest` result, judged at its highest concurrency level."""
    v = result["verdict"]
    if v is None:
        raise DeploykitError("This load test was run without an SLO, so there is no verdict: pass slo to judge it.")
    users = result["levels"][-1]["users"]
    table = Table(title=f"SLO {v['task']} at {users} users: {'PASS' if v['passed'] else 'FAIL'}")
    for column, justify in (
        ("criterion", "left"),
        ("measured", "right"),
        ("target", "right"),
        ("margin", "right"),
        ("result", "center"),
    ):
        table.add_column(column, justify=justify)
    for name, c in v["criteria"].items():
        label = f"latency {v['latency_percentile'].upper()}" if name == "latency" else name
        table.add_row(
            label,
            f"{c['measured']:.2f} {c['unit']}",
            f"{c['comparison']} {c['target']:g} {c['unit']}",
            f"{c['margin_pct']:+.1f}%",
            "[green]PASS[/]" if c["passed"] else "[red]FAIL[/]",
        )
    return table
