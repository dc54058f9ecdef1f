"""Run the benchmark pipelines and write their latest results to BENCHMARKS.md.

    python bench/run_benchmarks.py                      # resnet18-latency, resnet50-latency, quickstart
    python bench/run_benchmarks.py pipelines/x.yaml     # any pipeline with a benchmark stage

Stages before `benchmark` come from the cache when unchanged; the benchmark and report stages are
always re-run, so the numbers are fresh. Every table carries the machine and its load: these
machines are shared, so compare the speedups (ratios measured in one run) before absolute times.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from sections import marked_sections  # the sections other bench scripts own

from deploykit.bench.select import SERVABLE, ran_in, select_fastest
from deploykit.files import atomic_write_text
from deploykit.machine import cpu_isa, cpu_model
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import load_pipeline
from deploykit.progress import Reporter
from deploykit.report.formatting import isa

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["pipelines/resnet18-latency.yaml", "pipelines/resnet50-latency.yaml", "pipelines/quickstart.yaml"]
# The targets for INT8 at batch 1 (P50, ms) on 2 threads of these CPUs.
LATENCY_TARGETS_MS = {"resnet18-latency": 5.5, "resnet50-latency": 14.0}


def _stage_meta(run_dir: Path, stage_type: str) -> dict | None:
    for meta_path in sorted(run_dir.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("type") == stage_type:
            return meta
    return None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _section(name: str, run_dir: Path) -> list[str]:
    bench = json.loads((run_dir / "benchmark" / "benchmark.json").read_text())
    machine = bench["machine"]
    lines = [
        f"## {name}",
        "",
        f"Machine: {machine['cpu']} ({isa(machine)}), {machine['cores']} cores, "
        f"{bench['settings'].get('threads') or machine['cores']} threads; "
        f"load average {machine['load_avg_before']} before, {machine['load_avg_after']} after. "
        f"Speedups are against {bench['baseline']} at the same batch, in the same run.",
        "",
        "| artifact | runs in | batch | P50 ms | P95 ms | P99 ms | throughput /s | speedup | size MB | accuracy "
        "| stable |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench["results"]:
        acc = None if r.get("accuracy") is None else 100 * r["accuracy"]
        lines.append(
            f"| {r['artifact']}{' (deployable)' if r['deployable'] else ''} | {ran_in(r)} | {r['batch']} | "
            f"{_fmt(r['p50_ms'])} | {_fmt(r['p95_ms'])} | {_fmt(r['p99_ms'])} | "
            f"{_fmt(r['throughput'], 1)} | {_fmt(r.get('speedup'))}x | {_fmt(r['size_bytes'] / 1e6)} | "
            f"{_fmt(acc, 2) + ' %' if acc is not None else 'n/a'} | {'yes' if r['stable'] else 'NO'} |"
        )
    quant = _stage_meta(run_dir, "quantize")
    if quant:
        m = quant["metrics"]
        synthetic = json.loads((run_dir / "run.json").read_text())["pipeline"]["data"]["dataset"] == "synthetic"
        accuracy = (
            "accuracy not measured (synthetic input)"
            if synthetic
            else f"val accuracy {_fmt(100 * m['fp32_accuracy'])} % -> {_fmt(100 * m['int8_accuracy'])} % "
            f"(drop {_fmt(m.get('accuracy_drop'))} points)"
        )
        lines += [
            "",
            f"INT8 ({m.get('method')}): {accuracy}, file {_fmt(m.get('size_ratio'), 3)}x the FP32 file, "
            f"deployable: {(bench['deployable'] or {}).get('label')} ({m.get('deployable_reason')}).",
        ]
    lines += _selection_lines(bench)
    target = LATENCY_TARGETS_MS.get(name)
    int8 = [r for r in bench["results"] if ran_in(r) == "int8" and r["batch"] == 1]
    if target and int8:
        p50 = int8[0]["p50_ms"]
        verdict = "met" if p50 <= target else "NOT met"
        lines += ["", f"Target: INT8 P50 at batch 1 <= {target} ms: {_fmt(p50)} ms, {verdict}."]
    return lines + [""]


def _selection_lines(bench: dict) -> list[str]:
    """The pick against the other candidates of the same run (issue 9's ratios), at the selection batch."""
    sel = bench.get("selection") or {}
    pick = next((r for r in bench["results"] if r["deployable"]), None)
    if not pick:
        return []
    rows = [r for r in bench["results"] if r["batch"] == pick["batch"] and r["p50_ms"]]

    def fastest(runs_on: str | None, precision: str) -> dict | None:
        found = [r for r in rows if runs_on in (None, r["runs_on"]) and ran_in(r) == precision]
        return min(found, key=lambda r: r["p50_ms"], default=None)

    lines = ["", f"Pick: {pick['artifact']} on {pick['runs_on']} ({sel.get('reason', 'the deployable model')})."]
    rivals = {"ORT INT8": fastest("onnxruntime", "int8"), "OpenVINO INT8": fastest("openvino", "int8"),
              "OpenVINO FP32": fastest("openvino", "fp32")}  # fmt: skip
    measured = {k: r for k, r in rivals.items() if r}
    if measured:
        best_name, best = min(measured.items(), key=lambda kv: kv[1]["p50_ms"])
        ratio = pick["p50_ms"] / best["p50_ms"]
        lines.append(
            f"Target: pick no slower than the best of ORT INT8 / OpenVINO INT8 / OpenVINO FP32 (ratio <= 1.02): "
            f"{ratio:.3f} against {best_name} ({_fmt(best['p50_ms'])} ms), {'met' if ratio <= 1.02 else 'NOT met'}."
        )
    eager, ort_fp32 = fastest("torch", "fp32"), fastest("onnxruntime", "fp32")
    if eager:
        speedup = eager["p50_ms"] / pick["p50_ms"]
        lines.append(f"Target: pick >= 4x PyTorch eager FP32: {speedup:.2f}x, {'met' if speedup >= 4 else 'NOT met'}.")
    if ort_fp32 and ran_in(pick).startswith("int8"):
        speedup = ort_fp32["p50_ms"] / pick["p50_ms"]
        lines.append(f"Target: INT8 pick >= 1.9x ORT FP32: {speedup:.2f}x, {'met' if speedup >= 1.9 else 'NOT met'}.")
    return lines + _bf16_lines(bench, rows, fastest)


def _bf16_lines(bench: dict, rows: list[dict], fastest: Callable[[str | None, str], dict | None]) -> list[str]:
    """Issue 18's ratios: BF16 against the fastest FP32 candidate, and the pick when INT8 is over budget."""
    bf16, fp32 = fastest(None, "bf16"), fastest(None, "fp32")
    int8 = min((r for r in rows if ran_in(r).startswith("int8")), key=lambda r: r["p50_ms"], default=None)
    if bf16 is None:
        reason = next((s["reason"] for s in bench.get("skipped", []) if s.get("key") == "bf16"), "not measured")
        return ["", f"BF16: {reason}."]
    lines = [""]
    servable = [r for r in rows if r["format"] in SERVABLE and not ran_in(r).startswith("int8")]
    without_int8 = select_fastest(servable, rows[0]["batch"], None) if servable else None
    if without_int8 and fp32:
        pick = without_int8["pick"]
        ratio = fp32["p50_ms"] / pick["p50_ms"]
        lines.append(
            f"Target: with INT8 over the accuracy budget (the INT8 rows left out), the pick is {pick['artifact']} "
            f"(runs in {ran_in(pick)}), {ratio:.2f}x the fastest FP32 candidate ({fp32['artifact']}, "
            f"{_fmt(fp32['p50_ms'])} ms): {'met' if ran_in(pick) == 'bf16' and ratio >= 4 else 'NOT met'} (>= 4x)."
        )
    if int8:
        ratio = bf16["p50_ms"] / int8["p50_ms"]
        lines.append(
            f"Target: the fastest INT8 ({int8['artifact']}, {_fmt(int8['p50_ms'])} ms) >= 1.5x the fastest BF16 "
            f"({bf16['artifact']}, {_fmt(bf16['p50_ms'])} ms): {ratio:.2f}x, {'met' if ratio >= 1.5 else 'NOT met'}."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipelines", nargs="*", default=DEFAULT, help="Pipeline files with a benchmark stage.")
    parser.add_argument("--runs-dir", default=str(REPO / "bench" / "runs"), help="Where the runs are written.")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="Markdown file to write.")
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME",
                        help="Report this pipeline's last benchmark as it is, without measuring again (repeatable).")
    args = parser.parse_args()

    sections = []
    for path in args.pipelines:
        cfg = load_pipeline(path).model_copy(update={"runs_dir": Path(args.runs_dir)})
        fresh = [s.stage_name for s in cfg.stages if s.stage == "benchmark"]
        if cfg.name not in args.reuse:
            with Reporter() as reporter:
                run_pipeline(cfg, force=fresh, reporter=reporter)
        sections += _section(cfg.name, Path(args.runs_dir) / cfg.name)
    header = [
        "# Benchmarks",
        "",
        f"Latest results of `python bench/run_benchmarks.py`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, on "
        f"{cpu_model()} with {isa({'isa': cpu_isa()})} (INT8 speed differs ~3x between AVX2-only and VNNI CPUs). "
        "Offline, one process, ONNX Runtime / PyTorch on CPU; percentiles over the last three stable "
        "measurement windows (perf_analyzer's method)."
        + (f" Reported from their last run, not measured again: {', '.join(args.reuse)}." if args.reuse else ""),
        "",
    ]
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    kept = "".join(f"\n{section}\n" for section in marked_sections(old))  # served and imagefolder numbers
    atomic_write_text(out, "\n".join(header + sections) + kept)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
