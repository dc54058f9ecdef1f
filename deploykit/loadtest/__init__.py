"""Load testing against running servers, and the SLO target tables its verdicts (and the report's) use."""

from __future__ import annotations

from pathlib import Path


def inputs_note(samples: str | Path | None) -> str:
    """What a load test sends, for its result and console: random bytes are never sent, as random FP32 bytes
    hold NaN/Inf, which a server may rightly refuse (perf_analyzer's own default)."""
    return f"real samples from {samples}" if samples else "zeros (no samples given)"
