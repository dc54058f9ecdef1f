"""A soak: the served model at a fixed share of its measured capacity for a long while, watching what drifts.

First a short closed-loop run measures capacity (requests per second at `users` users); then the soak sends
`load_fraction` of it as an open-rate load for `duration_s`. It passes with no failed request and the server's
memory (the RSS of its whole process tree: Triton and its python-backend stubs) grown by less than
`max_rss_growth`; the rate achieved and the P50/P95 of each tenth of the run (the latency drift) are reported.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_json
from deploykit.loadtest.runner import run_locust
from deploykit.progress import Reporter, silent

WINDOWS = 10  # the run is cut into this many equal spans for the drift


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '10m' or '1h'."""
    units = {"s": 1, "m": 60, "h": 3600}
    value, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        seconds = float(value) * unit
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise DeploykitError(f"Soak duration {text!r} is not a positive time: use e.g. 60s, 10m or 1h.")
    return seconds


def server_pid(url: str) -> int:
    """The process listening on `url`'s port on this machine."""
    import psutil

    port = urlsplit(url).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise DeploykitError(f"No process on this machine listens on port {port} of {url}: soak a local server.")


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its children, in bytes."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:  # a child that ended meanwhile holds no memory
            continue
    return total


def drift_windows(timings: np.ndarray, windows: int = WINDOWS) -> list[dict[str, float]]:
    """P50/P95 (successful requests) and failures per equal span of the run, by request start time."""
    start = timings[:, 0]
    edges = np.linspace(start.min(), start.max() + 1e-9, windows + 1)
    rows = []
    for lo, hi in itertools.pairwise(edges):
        part = timings[(start >= lo) & (start < hi)]
        ok = part[part[:, 2] == 1, 1]
        p50, p95 = (float(v) for v in np.percentile(ok, [50, 95])) if len(ok) else (float("nan"), float("nan"))
        rows.append({"requests": len(part), "failures": int((part[:, 2] != 1).sum()), "p50_ms": p50, "p95_ms": p95})
    return rows


def soak(
    url: str,
    model: str,
    *,
    duration_s: float,
    out_dir: Path,
    users: int = 4,
    load_fraction: float = 0.8,
    capacity_s: float = 5.0,
    max_rss_growth: float = 0.05,
    samples: Path | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Measure capacity, soak at `load_fraction` of it, and judge; writes out_dir/soak.json and returns it."""
    reporter = reporter or silent()
    out_dir = Path(out_dir)
    pid = server_pid(url)
    with reporter.task("soak: measuring capacity", total=None):
        capacity = run_locust(url, model, users=users, spawn_rate=users, duration_s=capacity_s, samples=samples,
                              workdir=out_dir / "capacity").throughput_rps  # fmt: skip
    target = load_fraction * capacity
    rss_before = tree_rss(pid)  # after the capacity run: the server is warm, its buffers allocated
    with reporter.task(f"soak: {target:.0f} req/s for {duration_s:g} s", total=None):
        result = run_locust(url, model, users=users, spawn_rate=users, duration_s=duration_s, samples=samples,
                            workdir=out_dir / "soak", rate_per_user=target / users)  # fmt: skip
    rss_after = tree_rss(pid)
    windows = drift_windows(np.load(out_dir / "soak" / "timings.npy"))
    growth = rss_after / rss_before - 1
    report = {
        "url": url,
        "model": model,
        "duration_s": duration_s,
        "capacity_rps": capacity,
        "target_rps": target,
        "throughput_rps": result.throughput_rps,
        "requests": result.requests,
        "failures": result.failures,
        "p50_ms": result.p50_ms,
        "p95_ms": result.p95_ms,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_growth": growth,
        "p95_drift": windows[-1]["p95_ms"] / windows[0]["p95_ms"] - 1,
        "windows": windows,
        "passed": result.failures == 0 and growth < max_rss_growth,
        "criteria": {"failures": 0, "max_rss_growth": max_rss_growth},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "soak.json", report)
    return report

