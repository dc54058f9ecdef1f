"""Benchmark one artifact, optionally in a fresh process (`python -m deploykit.bench.worker RESULT.json < JOB.json`).

A fresh process per artifact makes its peak memory its own (ru_maxrss of that process only) and stops one
runtime's allocations or thread pools from slowing the next artifact down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.bench.measure import current_rss_mb, measure, peak_rss_mb
from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_json

# A job is plain JSON so it crosses the process boundary unchanged:
#   path, runtime (None: the file's default), precision (None: the file's; bf16 on OpenVINO), batch_sizes,
#   input_shape ([C, H, W]), threads,
#   measure (keyword arguments of measure()),
#   accuracy (bool), accuracy_limit, data (the pipeline's data section, to rebuild the validation split),
#   task (the pipeline's task settings: its metric).


def bench_artifact(job: dict[str, Any], bundle: Any = None) -> dict[str, Any]:
    """Open the artifact, measure each batch size, then (if asked) the pipeline's metric on the validation split
    (of `bundle`, a DataBundle with its task, or else rebuilt from the job)."""
    from deploykit.runtime import evaluate_accuracy, open_artifact

    baseline_rss = current_rss_mb()
    session = open_artifact(
        Path(job["path"]), threads=job["threads"], runtime=job.get("runtime"), precision=job.get("precision")
    )
    rng = np.random.default_rng(0)  # latency does not depend on pixel values; the same input for every artifact
    inputs = [rng.standard_normal((batch, *job["input_shape"]), dtype=np.float32) for batch in job["batch_sizes"]]
    measurements = [measure(session, x, **job["measure"]).to_dict() for x in inputs]
    peak = peak_rss_mb()  # before the accuracy pass, whose batch size is not one that was measured
    accuracy = None
    if job["accuracy"]:
        if bundle is None:
            from deploykit.data import build_datasets
            from deploykit.data.config import DataConfig
            from deploykit.sources.task import build_task

            bundle = build_datasets(DataConfig.model_validate(job["data"]))
            bundle.task = build_task(job.get("task") or {})
        accuracy = evaluate_accuracy(session, bundle.val, limit=job["accuracy_limit"], task=bundle.task)
    return {
        "runtime": getattr(session, "name", None),
        "execution_precision": session.execution_precision,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "measurements": measurements,
        "accuracy": accuracy,
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": None if baseline_rss is None else round(baseline_rss, 1),
    }


def bench_isolated(job: dict[str, Any], timeout_s: float, omp_wait_policy: str | None = None) -> dict[str, Any]:
    """`bench_artifact` in a fresh Python process; its failure becomes a DeploykitError with its last error line.

    omp_wait_policy: OMP_WAIT_POLICY for that process (OpenMP reads it once, at start-up), None to inherit.
    """
    env = dict(os.environ)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    with tempfile.TemporaryDirectory(prefix="deploykit-bench-") as tmp:
        result = Path(tmp) / "result.json"
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "deploykit.bench.worker", str(result)],
                input=json.dumps(job),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=env,
            )
        except subprocess.TimeoutExpired:
            raise DeploykitError(
                f"Benchmarking {job['path']} took longer than {timeout_s:g} s: "
                "raise timeout_s, or lower max_windows or window_s."
            ) from None
        if proc.returncode != 0 or not result.is_file():
            lines = proc.stderr.strip().splitlines()
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            raise DeploykitError(
                f"Benchmarking {job['path']} failed in its worker process ({last}); "
                "run with isolate: false to see the traceback."
            )
        return json.loads(result.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    job = json.load(sys.stdin)
    try:
        result = bench_artifact(job)
    except DeploykitError as exc:  # a user-facing problem: one line, no traceback
        print(exc, file=sys.stderr)
        return 2
    atomic_write_json(argv[0], result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
