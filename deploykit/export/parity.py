"""Does a converted model compute what its reference computes? FP32: logits within tolerance; INT8: same top-1."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.runtime import Session

if TYPE_CHECKING:
    from deploykit.data import DataBundle

KINDS = ("fp32", "int8")


def real_batches(bundle: DataBundle, sizes: list[int], split: str = "val") -> list[np.ndarray]:
    """One batch per size, cut from real (normalised, never augmented) samples; repeats them if the split is short."""
    from deploykit.data import sample_batch

    x, _ = sample_batch(bundle, max(sizes), split)
    x = x.numpy()
    pool = x[np.arange(max(sizes)) % len(x)]
    return [pool[:n] for n in sizes]


def check_parity(
    reference: Session,
    candidate: Session,
    batches: list[np.ndarray],
    kind: str = "fp32",
    *,
    rtol_scale: float = 1e-4,
    min_agreement: float = 0.99,
) -> dict[str, Any]:
    """Compare `candidate` with `reference` on `batches`; a mismatch is reported in the result, never raised.

    fp32: in every batch, max |candidate - reference| <= rtol_scale x max |reference| (the logits' scale).
    int8: the top-1 class agrees on at least `min_agreement` of all samples.
    The top-level max_abs_diff / scale / tolerance are those of the batch closest to (or furthest past) its limit.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if not batches:
        raise ValueError("check_parity needs at least one batch")
    per_batch, agree, samples = [], 0, 0
    for x in batches:
        ref, cand = reference.run(x), candidate.run(x)
        if ref.shape != cand.shape:  # a wrong shape is a failed parity, not a crash
            diff = float("inf")
        else:
            diff = float(np.max(np.abs(ref.astype(np.float64) - cand)))
            agree += int((ref.argmax(axis=1) == cand.argmax(axis=1)).sum())
        scale = float(np.max(np.abs(ref)))
        per_batch.append({"size": len(x), "max_abs_diff": diff, "scale": scale, "tolerance": rtol_scale * scale})
        samples += len(x)

    def excess(b: dict) -> float:  # difference / tolerance; NaN logits count as the worst possible batch
        diff, tol = b["max_abs_diff"], b["tolerance"]
        ratio = diff / tol if tol > 0 else (0.0 if diff == 0 else np.inf)
        return np.inf if np.isnan(ratio) else ratio

    worst = max(per_batch, key=excess)
    agreement = agree / samples
    passed = all(excess(b) <= 1.0 for b in per_batch) if kind == "fp32" else agreement >= min_agreement
    return {
        "kind": kind,
        "passed": bool(passed),
        "reference": reference.name,
        "candidate": candidate.name,
        "max_abs_diff": worst["max_abs_diff"],
        "scale": worst["scale"],
        "tolerance": worst["tolerance"],
        "rtol_scale": rtol_scale,
        "top1_agreement": agreement,
        "min_agreement": min_agreement,
        "batches": [b["size"] for b in per_batch],
        "per_batch": per_batch,
        "samples": samples,
    }
