"""What the report says, gathered from the upstream stages' metas and the benchmark, as renderer-neutral blocks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from deploykit.artifacts import StageRecord, deployable
from deploykit.bench.select import ran_in
from deploykit.bench.targets import discover, tensorrt_unavailable
from deploykit.loadtest.slo import SLO, verdict
from deploykit.report import formatting as f
from deploykit.report.document import Block, Bullets, Heading, Image, Paragraph, Table

NOT_BENCHMARKED = "not benchmarked"
CURVES_FILE, TRADEOFF_FILE = "curves.png", "accuracy_vs_latency.png"


@dataclass
class TradeoffPoint:
    label: str
    latency_ms: float
    accuracy: float
    size_mb: float
    precision: str = "fp32"  # what the runtime said it ran in, so the front can cross precisions visibly
    on_front: bool = True

    def dominates(self, other: TradeoffPoint) -> bool:
        at_least = (self.latency_ms <= other.latency_ms, self.accuracy >= other.accuracy, self.size_mb <= other.size_mb)
        better = (self.latency_ms < other.latency_ms, self.accuracy > other.accuracy, self.size_mb < other.size_mb)
        return all(at_least) and any(better)


@dataclass
class ReportInput:
    title: str
    description: str
    date: str
    upstream: list[StageRecord]
    benchmark: dict[str, Any] | None  # benchmark.json of the newest benchmark stage, if any
    machine: dict[str, Any]  # of the benchmark when there is one, else of this stage
    versions: dict[str, str]
    slo: SLO
    latency_batch: int
    latency_percentile: str
    metric_name: str = "top-1"  # the pipeline's metric: what the Accuracy column and the budgets measure
    model: str = ""  # where the model came from: a zoo name, the user's factory, an ONNX file
    preprocessing: dict[str, Any] | None = None  # what a client must do to inputs (DataBundle.preprocessing)


def _metrics(record: StageRecord) -> dict[str, Any]:
    return record.meta.get("metrics", {})


# ---- the artifact table ---------------------------------------------------------------------------


def throughput_batch(benchmark: dict[str, Any] | None) -> int | None:
    return max(benchmark["settings"]["batch_sizes"]) if benchmark else None


def artifact_rows(
    upstream: list[StageRecord], benchmark: dict[str, Any] | None, latency_batch: int
) -> list[dict[str, Any]]:
    """One row per model artifact upstream: latency at `latency_batch`, throughput at the largest batch measured."""
    measured: dict[tuple[str, int], dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    if benchmark:
        measured = {(r["key"], r["batch"]): r for r in benchmark["results"]}
        skipped = {s["key"]: s["reason"] for s in benchmark["skipped"]}
    big = throughput_batch(benchmark)
    by_stage = {r.name: _metrics(r) for r in upstream}
    rows = []
    runtimes = tuple(benchmark["settings"].get("onnx_runtimes", ["onnxruntime"])) if benchmark else ("onnxruntime",)
    bf16 = bool(benchmark and benchmark["settings"].get("bf16_offered"))
    for target in discover(upstream, onnx_runtimes=runtimes, bf16=bf16):
        lat, thr = measured.get((target.key, latency_batch)), measured.get((target.key, big))
        any_row = lat or thr
        accuracy = any_row["accuracy"] if any_row else None
        if accuracy is None and target.format == "torch":  # the training-side number, on the same split
            accuracy = by_stage[target.stage].get("val_acc")
        status = "benchmarked" if any_row else "skipped" if target.key in skipped else NOT_BENCHMARKED
        rows.append(
            {
                **target.describe(),
                "accuracy": accuracy,
                "execution_precision": any_row.get("execution_precision") if any_row else None,
                "latency_batch": latency_batch,
                **{k: lat[k] if lat else None for k in ("p50_ms", "p95_ms", "p99_ms", "speedup")},
                "stable": all(r["stable"] for r in (lat, thr) if r),
                "throughput_batch": big,
                "throughput": thr["throughput"] if thr else None,
                "status": status,
                "skip_reason": skipped.get(target.key),
            }
        )
    return rows


def _runs_in(row: dict[str, Any]) -> str:
    """' (runs in bf16)' where the runtime computed in another precision than the file's, as it reported."""
    ran = row.get("execution_precision")
    return f" (runs in {ran})" if ran and ran != row["precision"] else ""


def _artifact_table(rows: list[dict[str, Any]], latency_batch: int, big: int | None, metric: str) -> Table:
    def cell(row: dict[str, Any], key: str, show: Callable[[float], str]) -> str:
        if row[key] is not None:
            return show(row[key]) + ("" if row["stable"] else " *")
        return f.NA if row["status"] == "benchmarked" else row["status"]  # n/a: measured, but not at this batch

    b = f"batch {latency_batch}"
    accuracy = "Accuracy" if metric == "top-1" else f"{metric} (%)"
    headers = ["Artifact", "Format", accuracy, "Params", "MACs", "Size (MB)"]
    headers += [f"P50 ms ({b})", f"P95 ms ({b})", f"P99 ms ({b})", f"Throughput /s (batch {big or 'n/a'})", "Speedup"]
    return Table(
        headers,
        [
            [
                r["artifact"],
                f"{r['format']} {r['precision']}" + _runs_in(r),
                f.percent(r["accuracy"]),
                f.count(r["params"]),
                f.count(r["macs"]),
                f.megabytes(r["size_bytes"]),
                *(cell(r, k, f.ms) for k in ("p50_ms", "p95_ms", "p99_ms")),
                cell(r, "throughput", f.rate),
                f.ratio(r["speedup"]),
            ]
            for r in rows
        ],
    )


# ---- stages ------------------------------------------------------------------------------------------

_HIDDEN = {"history", "diagnostics", "results", "skipped", "rows", "verdict", "note", "notes"}  # shown elsewhere
# Metric names that tend to carry a stage's result come first: prune ratios, KD gain, quantization drop.
_PRIORITY = ("method", "deployable", "val_acc", "precision", "acc", "drop", "gain", "ratio", "sparsity", "excluded",
             "speedup")
_MAX_METRICS, _MAX_NESTED = 10, 4


def _short(value: Any) -> str | None:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if len(value) <= 40 else value[:37] + "..."
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return "[" + ", ".join(_short(v) or "" for v in value) + "]" if len(value) <= 6 else f"{len(value)} items"
    return None


def key_metrics(metrics: dict[str, Any]) -> str:
    """The stage's headline numbers: scalars and small nested groups, the likely interesting ones first."""
    items: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if key in _HIDDEN or value is None:
            continue
        if isinstance(value, dict):  # a small group (e.g. parity) reads well flattened; a big one is noise here
            nested = list(value.items()) if len(value) <= _MAX_NESTED else []
        else:
            nested = [("", value)]
        for sub, v in nested:
            text = _short(v)
            if text is not None:
                items.append((f"{key}.{sub}" if sub else key, text))
    items.sort(key=lambda kv: next((i for i, p in enumerate(_PRIORITY) if p in kv[0]), len(_PRIORITY)))
    shown = ", ".join(f"{k}={v}" for k, v in items[:_MAX_METRICS])
    more = f" (+{len(items) - _MAX_METRICS} more in meta.json)" if len(items) > _MAX_METRICS else ""
    return shown + more or "-"


def _stages_table(upstream: list[StageRecord]) -> Table:
    return Table(
        ["Stage", "Type", "Wall time", "Finished", "Key metrics"],
        [
            [r.name, r.type, f.seconds(r.meta.get("wall_time_s")), str(r.meta.get("finished_at", f.NA)),
             key_metrics(_metrics(r))]
            for r in upstream
        ],
    )


# ---- training curves and diagnostics ---------------------------------------------------------------


def histories(upstream: list[StageRecord]) -> dict[str, list[dict[str, Any]]]:
    """Per-epoch histories of every stage that trained: train, prune's fine-tune, distill, quantize's QAT.

    A stage keeps its own under metrics["history"]; a training step inside it under metrics[<step>]["history"].
    """
    found = {}
    for record in upstream:
        for key, value in _metrics(record).items():
            history = value if key == "history" else value.get("history") if isinstance(value, dict) else None
            if isinstance(history, list) and history:
                found[record.name if key == "history" else f"{record.name} {key}"] = history
    return found


def _gradient_lines(gradients: dict[str, Any]) -> list[str]:
    lines = []
    for kind, key in (("exploding", "max_norm"), ("vanishing", "min_norm")):
        flagged = gradients.get(kind) or {}
        if flagged:
            layers = "; ".join(
                f"{name} ({key.replace('_', ' ')} {e[key]:.3g}, steps {e['first_step']}-{e['last_step']})"
                for name, e in flagged.items()
            )
            fixes = ", ".join(gradients.get("solutions", {}).get(kind, []))
            lines.append(f"{kind.capitalize()} gradients in {len(flagged)} layer(s): {layers}. Try: {fixes}.")
    if not lines and gradients.get("checks"):
        checks = gradients["checks"]
        times = f"{checks} time{'s' if checks != 1 else ''}"
        lines.append(f"Gradient norms were checked {times}: no layer exploding or vanishing.")
    return lines


def _diagnostics_blocks(upstream: list[StageRecord]) -> list[Block]:
    blocks: list[Block] = []
    for record in upstream:
        metrics = _metrics(record)
        diag = metrics.get("diagnostics")
        if not isinstance(diag, dict):
            continue
        items = []
        if "precision" in metrics:  # a training stage: what its forward and backward computed in, and why
            items.append(f"Trained in {metrics['precision']} ({metrics.get('precision_why', f.NA)}).")
        curves = diag.get("curves") or {}
        if curves:
            items.append(f"Finding: {curves.get('finding', f.NA)}. {curves.get('evidence', '')}".strip())
            if curves.get("solutions"):
                items.append("Suggested: " + "; ".join(curves["solutions"]) + ".")
        if spike := diag.get("val_loss_spike"):
            items.append(f"Warning: {spike['evidence']} Suggested: {'; '.join(spike['solutions'])}.")
        items += _gradient_lines(diag.get("gradients") or {})
        blocks += [Heading(record.name, 3), Bullets(items or ["No diagnostics recorded."])]
    return blocks or [Paragraph("No stage recorded training diagnostics.")]


def _sensitivity_row(layer: dict[str, Any], kept: set[str]) -> list[str]:
    db = [f"{layer[key]:.1f}" for key in ("sqnr_in_db", "sqnr_out_db", "loss_db")]
    return [layer["node"], layer.get("module") or f.NA, layer["op_type"], *db, "yes" if layer["node"] in kept else ""]


def _sensitivity_blocks(upstream: list[StageRecord]) -> list[Block]:
    """Per quantize stage, the layers that lost the most SQNR between their input and output, and which stayed FP32."""
    blocks: list[Block] = []
    for record in upstream:
        metrics = _metrics(record)
        layers = metrics.get("sensitivity")
        if not layers:
            continue
        kept = set(metrics.get("excluded_nodes") or [])
        trials = (metrics.get("calibration") or {}).get("trials") or []
        if trials:
            tried = ", ".join(f"{t['method']} {f.percent(t['accuracy'])}" for t in trials)
            chosen = metrics["calibration"]["method"]
            line = f"{record.name}: calibration tried (val top-1 with every layer INT8): {tried}; kept {chosen}."
            if metrics["calibration"].get("bias_corrected_layers"):
                line += f" Bias correction: {metrics['calibration']['bias_corrected_layers']} layer(s)."
            blocks.append(Paragraph(line))
        blocks += [
            Paragraph(
                f"{record.name}: the {len(layers)} layers that lose the most signal-to-quantization-noise ratio (SQNR, "
                "dB, higher is better) between their input and output, measured on training samples; the top ones are "
                "kept in FP32 first when INT8 costs too much accuracy."
            ),
            Table(
                ["ONNX node", "PyTorch module", "Op", "SQNR in (dB)", "SQNR out (dB)", "Lost (dB)", "Kept FP32"],
                [_sensitivity_row(layer, kept) for layer in layers],
            ),
        ]
    return blocks


# ---- the SLO verdict ----------------------------------------------------------------------------------


def choose_deployable(
    rows: list[dict[str, Any]], upstream: list[StageRecord]
) -> tuple[dict[str, Any] | None, str]:
    """The row of the run's one deployable model (the same file the deploy stage serves), and why it is that one."""
    ref = deployable(upstream)
    if ref is None:
        return None, "no model artifact upstream"
    row = next((r for r in rows if r["key"] == ref.key), None)
    return row, ref.why


def slo_verdict(row: dict[str, Any] | None, inp: ReportInput) -> dict[str, Any] | None:
    latency_key = f"{inp.latency_percentile}_ms"
    if row is None or row[latency_key] is None or row["throughput"] is None:
        return None
    return verdict(inp.slo, row[latency_key], row["throughput"], row["size_bytes"] / 1e6, inp.latency_percentile)


def _verdict_blocks(
    row: dict[str, Any] | None, why: str, result: dict[str, Any] | None, inp: ReportInput, big: int | None
) -> list[Block]:
    slo, pct = inp.slo, inp.latency_percentile.upper()
    intro = Paragraph(
        f"Targets for {slo.task}: latency < {slo.max_latency_ms:g} ms, throughput > {slo.min_throughput:g} "
        f"{slo.throughput_unit}, size < {slo.max_size_mb:g} MB. Latency is judged on the {pct} at batch "
        f"{inp.latency_batch}, throughput at batch {big or f.NA} (offline, one process), size in MB of 10^6 bytes."
    )
    if row is None:
        return [intro, Paragraph(f"No verdict: {why}.")]
    if result is None:
        reason = row["skip_reason"] or (
            NOT_BENCHMARKED if row["status"] == NOT_BENCHMARKED else "not measured at the batch sizes the verdict uses"
        )
        return [intro, Paragraph(f"No verdict for {row['artifact']} ({why}): {reason.rstrip('.')}.")]
    basis = {"latency": f" ({pct}, batch {inp.latency_batch})", "throughput": f" (batch {big})"}
    table_rows = [
        [
            name,
            f"{c['measured']:.4g} {c['unit']}{basis.get(name, '')}",
            f"{c['comparison']} {c['target']:g} {c['unit']}",
            f"{c['margin']:+.4g} {c['unit']} ({c['margin_pct']:+.1f}%)",
            "PASS" if c["passed"] else "FAIL",
        ]
        for name, c in result["criteria"].items()
    ]
    return [
        intro,
        Paragraph(f"Deployable artifact: {row['artifact']}, {why}."),
        Table(["Criterion", "Measured", "Target", "Margin", "Result"], table_rows),
        Paragraph(f"Overall: {'PASS' if result['passed'] else 'FAIL'}."),
    ]


# ---- served (the deploy stage) --------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return f.NA if value is None else f"{value:.3f}"


def served_blocks(upstream: list[StageRecord], rows: list[dict[str, Any]]) -> list[Block]:
    """The deploy stage's numbers on the real server, beside the offline latency of the same artifact."""
    record = next((r for r in reversed(upstream) if r.type == "deploy"), None)
    if record is None:
        return [Paragraph("No deploy stage ran: the model was not served, load-tested or validated.")]
    m = _metrics(record)
    model = m["served_model"]
    offline = next((r for r in rows if r["key"] == model["key"] and r["p50_ms"] is not None), None)
    blocks: list[Block] = [
        Paragraph(
            f"{model['label']} ({model['file']}, sha256 {model['sha256'][:12]}) served as '{m['model']}' on "
            f"{m['engine']}: {m['checks_passed']} checks passed, "
            f"{m['checks_warned']} warned, {len(m['checks_failed'])} failed"
            + (f" ({'; '.join(m['checks_failed'])})" if m["checks_failed"] else "")
            + f". Overall: {'PASS' if m['passed'] else 'FAIL'}."
        )
    ]
    served = m.get("served") or []
    if not served:
        return blocks
    table_rows = [
        [
            str(level["users"]),
            _ms(level["p50_ms"]),
            _ms(level["p95_ms"]),
            _ms(level["p99_ms"]),
            f"{level['throughput_rps']:.1f}",
            f"{100 * level['error_rate']:.2f}%",
            _ms(level["server"].get("queue_ms")),
            _ms(level["server"].get("compute_ms")),
            f"{level['server']['avg_batch_size']:.2f}" if level["server"].get("avg_batch_size") else f.NA,
        ]
        for level in served
    ]
    headers = ["Users", "P50 ms", "P95 ms", "P99 ms", "Req/s", "Errors", "Queue ms", "Compute ms", "Avg batch"]
    blocks.append(Table(headers, table_rows))
    if offline is not None and offline["latency_batch"] == 1:
        gap = served[0]["p50_ms"] - offline["p50_ms"]
        blocks.append(
            Paragraph(
                f"At {served[0]['users']} user(s) the served P50 is {served[0]['p50_ms']:.3f} ms against "
                f"{offline['p50_ms']:.3f} ms offline in one process (batch 1): the server, protocol and client "
                f"add {gap:.3f} ms. Queue and compute are Triton's own per-request averages from its Prometheus counters."
            )
        )
    return blocks


# ---- honesty notes ---------------------------------------------------------------------------------


def _benchmark_notes(bench: dict[str, Any] | None) -> list[str]:
    if bench is None:
        return ["No benchmark stage ran before this report: latency, throughput, speedup and SLO verdict are missing."]
    baseline = bench["baseline"] or "no baseline (no trained PyTorch model was benchmarked)"
    notes = [
        f"Speedups are P50-latency ratios against {baseline}, measured in the same run at the same batch size; "
        "on a shared machine they are steadier than absolute times."
    ]
    notes += [f"{s['artifact']} was not benchmarked: {s['reason'].rstrip('.')}." for s in bench["skipped"]]
    for r in bench["results"]:
        if not r["stable"]:
            means = ", ".join(f"{m:.3g}" for m in r["window_means_ms"])
            notes.append(
                f"{r['artifact']} at batch {r['batch']} did not settle within {r['windows']} windows "
                f"(means {means} ms): marked *, treat as noisy."
            )
    machine = bench["machine"]
    load, cores = machine.get("load_avg_before") or [], machine.get("cores") or 0
    load_after = machine.get("load_avg_after") or [0.0]
    if load and cores and max(load[0], load_after[0]) > cores:
        notes.append(
            f"The machine was busy while benchmarking (load average {f.load(load)} before, {f.load(load_after)} after, "
            f"on {cores} cores): absolute latencies are inflated; compare the ratios."
        )
    return notes


def _stage_notes(upstream: list[StageRecord], rows: list[dict[str, Any]]) -> list[str]:
    """Notes stages wrote themselves (e.g. unstructured pruning's), and picks that kept an earlier model."""
    notes = []
    for record in upstream:
        metrics = _metrics(record)
        own = [metrics["note"]] if isinstance(metrics.get("note"), str) else list(metrics.get("notes") or [])
        notes += [f"{record.name}: {note}" for note in own]
        pick = record.meta.get("deployable")
        if pick and pick["stage"] != record.name:  # the stage judged its own model and kept an earlier one
            notes.append(
                f"The {record.name} stage kept {pick['stage']}/{pick['role']} as the deployable model, not its own: "
                f"{pick['reason'].rstrip('.')}."
            )
    if not any(r["format"] == "tensorrt" for r in rows) and (why := tensorrt_unavailable()):
        notes.append(f"No TensorRT engine was built or benchmarked in this run: {why.rstrip('.')}.")
    return notes


# ---- the whole report --------------------------------------------------------------------------------


def _run_info(inp: ReportInput) -> Bullets:
    m = inp.machine
    load = f"load average {f.load(m.get('load_avg_before') or m.get('load_avg'))}"
    if m.get("load_avg_after"):
        load += f" before benchmarking, {f.load(m['load_avg_after'])} after"
    threads = inp.benchmark["settings"]["threads"] if inp.benchmark else m.get("torch_threads")
    return Bullets(
        [
            f"Run date: {inp.date}",
            f"Machine: {m.get('cpu', f.NA)} ({f.isa(m)}), {m.get('cores', f.NA)} cores, {threads} threads used; "
            f"GPU: {m.get('gpu') or 'none'}; {load}",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in inp.versions.items()),
        ]
    )


def tradeoff_points(rows: list[dict[str, Any]]) -> list[TradeoffPoint]:
    """Every artifact with a measured latency and accuracy, marked whether it is on the Pareto front
    (no other point is as fast, as accurate and as small, and better in one of the three)."""
    points = [
        TradeoffPoint(r["artifact"], r["p50_ms"], r["accuracy"], r["size_bytes"] / 1e6, ran_in(r))
        for r in rows
        if None not in (r["p50_ms"], r["accuracy"])
    ]
    for p in points:
        p.on_front = not any(q.dominates(p) for q in points)
    return points


def _pareto_blocks(points: list[TradeoffPoint]) -> list[Block]:
    front = sorted((p for p in points if p.on_front), key=lambda p: p.latency_ms)
    if not front:
        return []
    dominated = len(points) - len(front)
    return [
        Paragraph(
            f"Pareto front ({len(front)} of {len(points)} artifacts; the {dominated} grey one(s) are beaten on "
            "latency, accuracy and size at once by an artifact on it):"
        ),
        Table(
            ["Artifact", "Runs in", "P50 ms", "Accuracy", "Size (MB)"],
            [[p.label, p.precision, f.ms(p.latency_ms), f.percent(p.accuracy), f"{p.size_mb:.2f}"] for p in front],
        ),
    ]


def _source_blocks(inp: ReportInput) -> list[Block]:
    """The model's source, the metric every model is judged by, and the preprocessing its clients must apply."""
    lines = [f"Model: {inp.model}." if inp.model else None, f"Metric: {inp.metric_name} (higher is better)."]
    if inp.preprocessing:
        lines += [f"Preprocessing, {k}: {v}." for k, v in inp.preprocessing.items()]
    return [Heading("Model, metric and preprocessing"), Bullets([line for line in lines if line])]


def build(
    inp: ReportInput, rows: list[dict[str, Any]], curves_drawn: bool, tradeoff_drawn: bool
) -> tuple[list[Block], dict[str, Any]]:
    """The report's blocks and the stage's metrics (the verdict summary and the table rows from `artifact_rows`)."""
    big = throughput_batch(inp.benchmark)
    chosen, why = choose_deployable(rows, inp.upstream)
    result = slo_verdict(chosen, inp)
    curves: Block = Image(CURVES_FILE, "Training and validation loss and accuracy per epoch")
    tradeoff: Block = Image(TRADEOFF_FILE, "Accuracy against latency and size, the Pareto front in colour")
    notes = _benchmark_notes(inp.benchmark) + _stage_notes(inp.upstream, rows)
    if not curves_drawn:
        curves = Paragraph("No training history upstream: curves skipped.")
    if not tradeoff_drawn:
        tradeoff = Paragraph("No artifact has both a measured latency and an accuracy: plot skipped.")
    blocks: list[Block] = [Heading(inp.title, 1)]
    if inp.description:
        blocks.append(Paragraph(inp.description))
    blocks += [
        _run_info(inp),
        Heading("Artifacts"),
        _artifact_table(rows, inp.latency_batch, big, inp.metric_name),
        *_source_blocks(inp),
        Heading("Stages"),
        _stages_table(inp.upstream),
        Heading("Training curves"),
        curves,
        Heading("Accuracy vs latency"),
        tradeoff,
        *(_pareto_blocks(tradeoff_points(rows)) if tradeoff_drawn else []),
        Heading("Training diagnostics"),
        *_diagnostics_blocks(inp.upstream),
        Heading("Quantization: per-layer SQNR"),
        *(_sensitivity_blocks(inp.upstream) or [Paragraph("No ONNX Runtime quantization upstream: nothing ranked.")]),
        Heading("SLO verdict"),
        *_verdict_blocks(chosen, why, result, inp, big),
        Heading("Served"),
        *served_blocks(inp.upstream, rows),
        Heading("Notes"),
        Bullets(notes),
    ]
    metrics = {
        "deployable": chosen["artifact"] if chosen else None,
        "deployable_key": chosen["key"] if chosen else None,
        "deployable_sha256": chosen["sha256"] if chosen else None,
        "verdict": result,
        "slo": asdict(inp.slo),
        "rows": rows,
    }
    return blocks, metrics
