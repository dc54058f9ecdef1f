"""Latency measured the way perf_analyzer does it: warm up, then windows until three in a row agree.

One timing on a shared machine means little (a neighbour's job once made a convolution 60x slower), so
`measure` keeps running windows until the last `min_windows` window means agree within `stability`,
pools their latencies for P50/P95/P99, says whether it settled, and records the load average around it.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

_clock_ns = time.perf_counter_ns  # module-level so tests can substitute a virtual clock


class Runnable(Protocol):
    def run(self, x: np.ndarray) -> Any: ...


@dataclass
class Measurement:
    """Latency percentiles over the pooled last windows, and how the measurement went."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # samples per second: batch / mean latency
    batch: int
    iterations: int  # timed calls the statistics above are computed from (the pooled windows)
    windows: int  # windows run, including those that were not pooled
    stable: bool  # False: max_windows ran out before the last windows agreed
    window_means_ms: list[float]
    load_avg_before: list[float]
    load_avg_after: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolating linearly between the closest ranks (numpy's default)."""
    if len(values) == 0:
        raise ValueError("percentile of an empty sequence")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _window(session: Runnable, x: np.ndarray, iters: int | None, seconds: float) -> list[int]:
    """Durations (ns) of `iters` calls, or of as many calls as start within `seconds` (at least one)."""
    durations: list[int] = []
    deadline = _clock_ns() + int(seconds * 1e9)
    while True:
        start = _clock_ns()
        session.run(x)
        end = _clock_ns()
        durations.append(end - start)
        if (len(durations) >= iters) if iters else (end >= deadline):
            return durations


def _agree(means: Sequence[float], stability: float) -> bool:
    """max/min - 1 <= stability, written without the division so that a mean exactly on the bound agrees."""
    return min(means) > 0 and max(means) <= min(means) * (1 + stability)


def measure(
    session: Runnable,
    x: np.ndarray,
    *,
    warmup: int = 10,
    window_iters: int | None = None,
    window_s: float = 1.0,
    stability: float = 0.10,
    max_windows: int = 10,
    min_windows: int = 3,
) -> Measurement:
    """Time `session.run(x)`: `warmup` untimed calls, then windows until the last `min_windows` agree.

    A window is `window_iters` calls, or as many as fit in `window_s` seconds when that is None. The last
    `min_windows` window means agree when max/min - 1 <= `stability`; the measurement stops then, or after
    `max_windows` windows with stable=False. Percentiles pool every latency of the last `min_windows` windows.
    """
    if min_windows < 1 or max_windows < min_windows:
        raise ValueError(f"need 1 <= min_windows <= max_windows, got {min_windows} and {max_windows}")
    if (window_iters is not None and window_iters < 1) or window_s <= 0:
        raise ValueError("window_iters must be at least 1 and window_s positive")
    load_before = _load_avg()
    for _ in range(warmup):
        session.run(x)
    windows: list[list[int]] = []
    means: list[float] = []
    stable = False
    while len(windows) < max_windows and not stable:
        windows.append(_window(session, x, window_iters, window_s))
        means.append(float(np.mean(windows[-1])) / 1e6)
        stable = len(windows) >= min_windows and _agree(means[-min_windows:], stability)
    latencies = np.concatenate(windows[-min_windows:]).astype(np.float64) / 1e6
    mean = float(latencies.mean())
    batch = int(x.shape[0]) if x.ndim else 1
    return Measurement(
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        mean_ms=mean,
        min_ms=float(latencies.min()),
        max_ms=float(latencies.max()),
        throughput=batch / (mean / 1e3) if mean > 0 else float("inf"),
        batch=batch,
        iterations=len(latencies),
        windows=len(windows),
        stable=stable,
        window_means_ms=[round(m, 4) for m in means],
        load_avg_before=load_before,
        load_avg_after=_load_avg(),
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    """This process's resident memory now, in MiB, from /proc (None where /proc is absent)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
