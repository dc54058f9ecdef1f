"""Runtime selection by measurement: the fastest servable candidate (model x precision x runtime) on this machine
that keeps accuracy within budget, with the runner-up and their ratio, measured in the same run."""

from __future__ import annotations

from typing import Any

SERVABLE = ("onnx", "openvino")  # formats a server here can run (TensorRT needs a GPU; eager torch is not served)


def ran_in(row: dict[str, Any]) -> str:
    """The precision a row's runtime really computed in (rows from before execution precisions: the file's)."""
    return row.get("execution_precision") or row["precision"]


def _reference_accuracy(rows: list[dict[str, Any]]) -> float | None:
    """The best accuracy measured in FP32 arithmetic: what INT8 and BF16 candidates are held to (an FP32 file
    that OpenVINO ran in BF16 is a BF16 candidate, never the reference)."""
    measured = [r["accuracy"] for r in rows if ran_in(r) == "fp32" and r["accuracy"] is not None]
    return max(measured) if measured else None


def select_fastest(rows: list[dict[str, Any]], batch: int, max_accuracy_drop: float | None) -> dict[str, Any] | None:
    """Among benchmark rows at `batch`, the fastest servable one within `max_accuracy_drop` points of the best FP32
    accuracy; None when no row qualifies. Returns the pick, the runner-up, their P50 ratio, and each rejection."""
    reference = _reference_accuracy(rows)
    candidates, rejected = [], []
    for row in rows:
        if row["batch"] != batch or row["format"] not in SERVABLE or row["p50_ms"] is None:
            continue
        if max_accuracy_drop is not None and reference is not None:
            if row["accuracy"] is None:
                rejected.append({"key": row["key"], "reason": "accuracy not measured"})
                continue
            drop = 100 * (reference - row["accuracy"])
            if drop > max_accuracy_drop:
                reason = f"loses {drop:.2f} points (budget {max_accuracy_drop:g})"
                rejected.append({"key": row["key"], "reason": reason})
                continue
        candidates.append(row)
    if not candidates:
        return None
    ranked = sorted(candidates, key=lambda r: r["p50_ms"])
    pick, runner_up = ranked[0], (ranked[1] if len(ranked) > 1 else None)
    ratio = runner_up["p50_ms"] / pick["p50_ms"] if runner_up else None
    budget = (
        "no accuracy budget (accuracy not measured)"
        if reference is None or max_accuracy_drop is None
        else f"within {max_accuracy_drop:g} points of {100 * reference:.2f} %"
    )
    reason = f"fastest of {len(ranked)} servable candidate(s) at batch {batch} {budget}: P50 {pick['p50_ms']:.3f} ms"
    if runner_up:
        reason += f", {ratio:.2f}x faster than {runner_up['artifact']} ({runner_up['p50_ms']:.3f} ms)"
    return {
        "pick": pick,
        "runner_up": runner_up,
        "ratio": ratio,
        "reason": reason,
        "reference_accuracy": reference,
        "ranked": [{"key": r["key"], "artifact": r["artifact"], "p50_ms": r["p50_ms"]} for r in ranked],
        "rejected": rejected,
    }
