"""Service-level targets per task (the advanced cheat sheet's "Performance Targets") and pass/fail verdicts.

Every comparison is strict, as the table states it: latency < target, throughput > target, size < target.
Latency is judged on a percentile (P95 by default), never on a single timing. Sizes are in MB (10^6 bytes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deploykit.errors import DeploykitError

PERCENTILES = ("p50", "p95", "p99")


@dataclass(frozen=True)
class SLO:
    task: str
    max_latency_ms: float
    min_throughput: float
    max_size_mb: float
    throughput_unit: str  # what a unit of throughput is for this task: FPS, streams, QPS


SLO_TABLE: dict[str, SLO] = {
    slo.task: slo
    for slo in (
        SLO("image_classification", 10.0, 100.0, 50.0, "FPS"),
        SLO("object_detection", 30.0, 30.0, 200.0, "FPS"),
        SLO("semantic_segmentation", 50.0, 20.0, 100.0, "FPS"),
        SLO("speech_recognition", 100.0, 10.0, 200.0, "streams"),
        SLO("text_classification", 5.0, 1000.0, 10.0, "QPS"),
    )
}


def get_slo(task: str) -> SLO:
    """The cheat sheet's targets for `task`."""
    try:
        return SLO_TABLE[task]
    except KeyError:
        raise DeploykitError(f"Unknown SLO task '{task}': choose one of {', '.join(SLO_TABLE)}.") from None


def custom_slo(
    task: str,
    *,
    max_latency_ms: float | None = None,
    min_throughput: float | None = None,
    max_size_mb: float | None = None,
) -> SLO:
    """`task`'s targets with some replaced by a pipeline's own numbers (None keeps the table's value)."""
    overrides = {"max_latency_ms": max_latency_ms, "min_throughput": min_throughput, "max_size_mb": max_size_mb}
    chosen = {k: float(v) for k, v in overrides.items() if v is not None}
    bad = [k for k, v in chosen.items() if not v > 0]
    if bad:
        raise DeploykitError(f"SLO override {bad[0]}={chosen[bad[0]]:g} is invalid: use a number greater than 0.")
    return dataclasses.replace(get_slo(task), **chosen)


def _criterion(measured: float, target: float, unit: str, higher_is_better: bool) -> dict[str, Any]:
    margin = measured - target if higher_is_better else target - measured  # positive: headroom left
    return {
        "measured": measured,
        "target": target,
        "unit": unit,
        "comparison": ">" if higher_is_better else "<",
        "margin": margin,
        "margin_pct": 100.0 * margin / target,
        "passed": margin > 0,
    }


def verdict(
    slo: SLO, latency_ms: float, throughput: float, size_mb: float | None, latency_percentile: str = "p95"
) -> dict[str, Any]:
    """Pass/fail per criterion (latency, throughput, size) and overall; margins are positive when a target is met.

    `latency_ms` is the `latency_percentile` (P95 by default) of the measured latencies, as the result records.
    `size_mb=None` (a load test against a server whose model file is not at hand) leaves the size criterion out.
    """
    if latency_percentile not in PERCENTILES:
        raise DeploykitError(
            f"Latency percentile '{latency_percentile}' is unknown: use one of {', '.join(PERCENTILES)}."
        )
    criteria = {
        "latency": _criterion(latency_ms, slo.max_latency_ms, "ms", higher_is_better=False),
        "throughput": _criterion(throughput, slo.min_throughput, slo.throughput_unit, higher_is_better=True),
    }
    if size_mb is not None:
        criteria["size"] = _criterion(size_mb, slo.max_size_mb, "MB", higher_is_better=False)
    return {
        "task": slo.task,
        "latency_percentile": latency_percentile,
        "criteria": criteria,
        "passed": all(c["passed"] for c in criteria.values()),
    }


# ---- pipeline settings: which row a stage judges against -------------------------------------------------


class SLOOverrides(BaseModel):
    """A pipeline's own targets; unset ones keep the task's values from the SLO table."""

    model_config = ConfigDict(extra="forbid")
    max_latency_ms: float | None = Field(None, gt=0.0, description="Latency target in ms (on latency_percentile).")
    min_throughput: float | None = Field(None, gt=0.0, description="Throughput target in samples per second.")
    max_size_mb: float | None = Field(None, gt=0.0, description="Model size target in MB (10^6 bytes).")


class SLOSettings(BaseModel):
    """Which row of the SLO target table a stage judges against, and the pipeline's own overrides."""

    model_config = ConfigDict(extra="forbid")
    slo_task: str = Field("image_classification", description=f"SLO target table row: one of {', '.join(SLO_TABLE)}.")
    slo: SLOOverrides = Field(default_factory=SLOOverrides, description="Override some of the task's targets.")

    @field_validator("slo_task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in SLO_TABLE:
            raise ValueError(f"unknown slo_task {v!r}: choose one of {', '.join(SLO_TABLE)}")
        return v

    def target(self) -> SLO:
        """The task's row of the table with this pipeline's overrides."""
        return custom_slo(self.slo_task, **self.slo.model_dump())
