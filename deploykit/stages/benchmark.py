"""The `benchmark` stage: latency percentiles, throughput, accuracy, size and memory of every model upstream."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.markup import escape

from deploykit.artifacts import MODEL_ROLES, Pick, StageRecord, StageResult, deployable
from deploykit.bench.select import select_fastest
from deploykit.bench.targets import Target, discover, unavailable_reason
from deploykit.errors import DeploykitError
from deploykit.files import atomic_write_json, atomic_write_text
from deploykit.machine import bf16_unsupported, machine_info, versions
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register

Role = Literal["checkpoint", "onnx", "onnx_int8", "onnx_fp16", "openvino", "openvino_int8", "trt_fp16", "trt_int8"]
_SUMMARY_KEYS = ("artifact", "runs_on", "batch", "p50_ms", "p95_ms", "p99_ms", "throughput", "speedup", "accuracy", "stable")


class BenchmarkConfig(BaseModel):
    """Offline benchmark settings (perf_analyzer's method: warm-up, then windows until three agree)."""

    model_config = ConfigDict(extra="forbid")
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 16], min_length=1, description="Batch sizes to measure each artifact at."
    )
    threads: int | None = Field(None, ge=1, description="ORT/torch intra-op threads (default: all cores).")
    warmup: int = Field(10, ge=0, description="Untimed runs before the measurement windows.")
    window_s: float = Field(1.0, gt=0.0, description="Length of one measurement window in seconds.")
    stability: float = Field(0.10, gt=0.0, description="The last three window means must agree within this fraction.")
    max_windows: int = Field(10, ge=3, description="Stop after this many windows even if unstable (and report it).")
    accuracy: bool = Field(True, description="Measure top-1 accuracy of each artifact on the validation split.")
    accuracy_limit: int | None = Field(None, ge=1, description="Evaluate accuracy on at most this many samples.")
    isolate: bool = Field(True, description="Benchmark each artifact in a fresh process: its peak memory is its own.")
    timeout_s: float = Field(1800.0, gt=0.0, description="Time limit for one artifact's worker process, in seconds.")
    # On a shared, oversubscribed machine torch's spinning OpenMP threads made a 3 ms forward take ~1 s;
    # passive waiting kept it at ~3.5 ms. A dedicated server is better served by the default (spinning).
    omp_wait_policy: Literal["passive", "active"] | None = Field(
        None, description="OMP_WAIT_POLICY of the isolated workers (torch's OpenMP); None keeps the default."
    )
    repeats: int = Field(
        1, ge=1, description="Rounds over all artifacts, interleaved; each result is the round with the median P50."
    )
    include: list[Role] | None = Field(None, description="Artifact roles to benchmark (default: all found upstream).")
    onnx_runtimes: list[Literal["onnxruntime", "openvino"]] = Field(
        ["onnxruntime", "openvino"],
        min_length=1,
        description="Runtimes each ONNX file is timed on; OpenVINO runs ONNX Runtime's QDQ files as they are "
        "(skipped with the reason where it is not installed).",
    )
    bf16: bool = Field(
        True,
        description="On CPUs with AVX-512 BF16 or AMX-BF16, also time (and judge) whatever OpenVINO runs with its "
        "float layers in BF16; elsewhere the report says why there is no BF16 row.",
    )
    select: bool = Field(
        True,
        description="Pick the deployable model by measurement: the fastest servable candidate (model x precision x "
        "runtime) within max_accuracy_drop; false keeps the earlier stages' pick.",
    )
    select_batch: int = Field(1, ge=1, description="Batch size whose P50 the selection compares (one of batch_sizes).")
    max_accuracy_drop: float | None = Field(
        1.0, description="Selection: largest val top-1 loss against the best FP32 model, in points; null: no budget."
    )

    @field_validator("batch_sizes")
    @classmethod
    def _unique_sorted(cls, v: list[int]) -> list[int]:
        return sorted(set(v))

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkConfig:
        if self.omp_wait_policy and not self.isolate:
            raise ValueError("omp_wait_policy applies to isolated workers only: set isolate: true or drop it")
        if self.select and self.select_batch not in self.batch_sizes:
            raise ValueError(f"select_batch {self.select_batch} is not one of batch_sizes {self.batch_sizes}")
        return self


@register("benchmark")
class BenchmarkStage(Stage):
    """Measure P50/P95/P99 latency, throughput, accuracy, size and peak memory of every model artifact upstream."""

    Config = BenchmarkConfig

    def run(self, ctx: StageContext) -> StageResult:
        cfg = self.config
        missing = bf16_unsupported(machine_info())
        bf16_reason = f"{missing}, so it has no BF16 candidates" if missing else None
        if not cfg.bf16:
            bf16_reason = "bf16: false in the benchmark stage"
        targets = discover(ctx.upstream, cfg.include, tuple(cfg.onnx_runtimes), bf16=bf16_reason is None)
        if not targets:
            raise DeploykitError(
                f"Stage '{ctx.name}' found no model artifact ({', '.join(cfg.include or MODEL_ROLES)}) upstream: "
                "add a train or export stage before it."
            )
        shape = ctx.input_shape()
        reasons = {t.key: unavailable_reason(t) for t in targets}
        skipped = [{**t.describe(), "reason": reasons[t.key]} for t in targets if reasons[t.key]]
        if bf16_reason and cfg.bf16:
            skipped.append({"artifact": "BF16", "key": "bf16", "reason": bf16_reason})
        runnable = [t for t in targets if not reasons[t.key]]
        for entry in skipped:
            ctx.reporter.log(f"[yellow]skipping {escape(entry['artifact'])}:[/yellow] {escape(entry['reason'])}")  # '[gpu]' is no markup

        machine, threads = machine_info(), cfg.threads or os.cpu_count() or 1
        results = self._run_rounds(ctx, runnable, shape, threads)
        rows = _rows(runnable, results, cfg.batch_sizes, self._isolate(ctx))
        # the trained FP32 model; without one (an ONNX source), the FP32 ONNX file on ONNX Runtime
        baseline = next((t for t in runnable if t.role == "checkpoint"), None) or next(
            (t for t in runnable if t.role == "onnx" and t.runs_on == "onnxruntime" and not t.exec_precision), None
        )
        _add_speedups(rows, baseline)
        selection = select_fastest(rows, cfg.select_batch, cfg.max_accuracy_drop) if cfg.select else None
        pick = _pick(selection) if selection else None
        chosen = deployable([*ctx.upstream, _record_of(ctx, pick)]) if pick else deployable(ctx.upstream)
        for row in rows:
            row["deployable"] = chosen is not None and row["key"] == chosen.key
        if selection:
            ctx.reporter.log(f"selected {selection['pick']['artifact']}: {selection['reason']}")
        load_after = machine_info().get("load_avg", [])
        report = {
            "machine": {**machine, "load_avg_before": machine.get("load_avg", []), "load_avg_after": load_after},
            "versions": versions(),
            "settings": {
                **cfg.model_dump(mode="json"), "threads": threads, "input_shape": list(shape),
                "bf16_offered": bf16_reason is None, "metric": ctx.pipeline.metric_name,
            },  # fmt: skip
            "baseline": baseline.label if baseline else None,
            "deployable": {"key": chosen.key, "label": chosen.label, "why": chosen.why} if chosen else None,
            "selection": selection and {k: v for k, v in selection.items() if k not in ("pick", "runner_up")},
            "speedup_basis": "P50 latency of the baseline / P50 latency of the artifact, same batch size, same run",
            "results": rows,
            "skipped": skipped,
        }
        atomic_write_json(ctx.out_dir / "benchmark.json", report)
        atomic_write_text(ctx.out_dir / "benchmark.md", _markdown(report))
        metrics = {
            "baseline": report["baseline"],
            "deployable": chosen.label if chosen else None,
            "selection_ratio": selection["ratio"] if selection else None,
            "runner_up": selection["runner_up"]["artifact"] if selection and selection["runner_up"] else None,
            "results": [{k: r[k] for k in _SUMMARY_KEYS} for r in rows],
            "skipped": [{"artifact": s["artifact"], "reason": s["reason"]} for s in skipped],
            "unstable": sum(not r["stable"] for r in rows),
            "load_avg_before": report["machine"]["load_avg_before"],
            "load_avg_after": load_after,
        }
        artifacts = {"benchmark": "benchmark.json", "benchmark_table": "benchmark.md"}
        return StageResult(artifacts=artifacts, metrics=metrics, deployable=pick)

    def _run_rounds(
        self, ctx: StageContext, targets: list[Target], shape: tuple[int, ...], threads: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Every target once per round, rounds interleaved: a neighbour's burst of load hits all artifacts alike."""
        from deploykit.bench.worker import bench_artifact, bench_isolated

        cfg = self.config
        results: dict[str, list[dict[str, Any]]] = {t.key: [] for t in targets}
        settings = cfg.model_dump(include={"warmup", "window_s", "stability", "max_windows"})
        with ctx.reporter.task(f"benchmark {ctx.name}", total=len(targets) * cfg.repeats) as bar:
            for round_index in range(cfg.repeats):
                for target in targets:
                    accuracy = cfg.accuracy and round_index == 0  # accuracy does not change between rounds
                    job = {
                        "path": str(target.model_path),
                        "runtime": target.runtime,
                        "precision": target.exec_precision,
                        "batch_sizes": cfg.batch_sizes,
                        "input_shape": list(shape),
                        "threads": threads,
                        "measure": settings,
                        "accuracy": accuracy,
                        "accuracy_limit": cfg.accuracy_limit,
                        "data": ctx.pipeline.data.model_dump(mode="json"),
                        "task": ctx.pipeline.task_json(),
                    }
                    if self._isolate(ctx):
                        result = bench_isolated(job, cfg.timeout_s, cfg.omp_wait_policy)
                    else:
                        result = bench_artifact(job, ctx.data() if accuracy else None)
                    results[target.key].append(result)
                    first = result["measurements"][0]
                    ctx.reporter.log(
                        f"{target.label}: P50 {first['p50_ms']:.3f} ms at batch {first['batch']}"
                        f"{'' if first['stable'] else ' (unstable)'}"
                    )
                    bar.advance()
        return results


    def _isolate(self, ctx: StageContext) -> bool:
        """Worker processes cannot rebuild a model, data or metric handed over as a Python object (deploykit.optimize):
        then every artifact is measured in this process."""
        return self.config.isolate and not ctx.pipeline.in_process_objects()


def _pick(selection: dict[str, Any]) -> Pick:
    row = selection["pick"]
    return Pick(row["stage"], row["role"], selection["reason"], runtime=row["runs_on"], precision=row["precision_hint"])


def _record_of(ctx: StageContext, pick: Pick) -> StageRecord:
    """This stage as later stages will see it, as far as its pick goes."""
    return StageRecord(ctx.name, "benchmark", ctx.out_dir, {"deployable": asdict(pick)})


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose P50 is the median (the lower one of an even count): one burst of load cannot pick it."""
    return sorted(rounds, key=lambda m: m["p50_ms"])[(len(rounds) - 1) // 2]


def _rows(
    targets: list[Target], results: dict[str, list[dict[str, Any]]], batch_sizes: list[int], isolated: bool
) -> list[dict[str, Any]]:
    """One self-contained row per artifact x batch size."""
    rows = []
    for target in targets:
        rounds = results[target.key]
        for i in range(len(batch_sizes)):
            per_round = [r["measurements"][i] for r in rounds]
            rows.append(
                {
                    **target.describe(),
                    "runtime": rounds[0]["runtime"],
                    "execution_precision": rounds[0]["execution_precision"],  # what the runtime said it ran in
                    "omp_wait_policy": rounds[0]["omp_wait_policy"],
                    "accuracy": rounds[0]["accuracy"],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
                    "baseline_rss_mb": rounds[0]["baseline_rss_mb"],
                    "isolated": isolated,  # False: peak_rss_mb is the whole pipeline process's
                    **_median_round(per_round),
                    "rounds_p50_ms": [m["p50_ms"] for m in per_round],
                }
            )
    return rows


def _add_speedups(rows: list[dict[str, Any]], baseline: Target | None) -> None:
    base = {r["batch"]: r["p50_ms"] for r in rows if baseline and r["key"] == baseline.key}
    for row in rows:
        ref = base.get(row["batch"])
        row["speedup"] = ref / row["p50_ms"] if ref and row["p50_ms"] > 0 else None


def _markdown(report: dict[str, Any]) -> str:
    from deploykit.report import formatting as f
    from deploykit.report.markdown import table

    m = report["machine"]
    metric = report["settings"].get("metric", "top-1")
    headers = ["Artifact", "Runs in", "Batch", "P50 ms", "P95 ms", "P99 ms", "Throughput /s", "Speedup",
               "Accuracy" if metric == "top-1" else metric, "Size MB"]  # fmt: skip
    rows = [
        [r["artifact"] + (" (deployable)" if r["deployable"] else ""), r["execution_precision"], str(r["batch"]),
         *(f.ms(r[k]) for k in ("p50_ms", "p95_ms", "p99_ms")), f.rate(r["throughput"]),
         f.ratio(r["speedup"]), f.percent(r["accuracy"]), f.megabytes(r["size_bytes"]), f"{r['peak_rss_mb']:.0f}",
         "yes" if r["stable"] else "NO"]
        for r in report["results"]
    ]
    lines = [
        f"# Benchmark ({report['settings']['threads']} threads)",
        "",
        f"Machine: {m.get('cpu')} ({f.isa(m)}), {m.get('cores')} cores; load average {f.load(m['load_avg_before'])} before, "
        f"{f.load(m['load_avg_after'])} after. Speedup: P50 ratio against {report['baseline'] or f.NA}.",
        "",
        table([*headers, "Peak RSS MB", "Stable"], rows),
        "",
        *(f"- {s['artifact']} skipped: {s['reason'].rstrip('.')}." for s in report["skipped"]),
    ]
    return "\n".join(lines).rstrip() + "\n"
