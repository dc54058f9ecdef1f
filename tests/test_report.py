"""SLO targets and verdicts, and the report stage: Markdown, self-contained HTML, plots, missing pieces."""

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict
from test_bench import BENCH_FAST, tiny_pipeline  # also registers the stand-in stages

from deploykit.artifacts import StageRecord, StageResult
from deploykit.bench.targets import tensorrt_unavailable
from deploykit.errors import DeploykitError
from deploykit.loadtest.slo import SLO, SLO_TABLE, custom_slo, get_slo, verdict
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.engine import run_pipeline
from deploykit.pipeline.loader import parse_pipeline
from deploykit.pipeline.registry import Stage, register
from deploykit.report.content import histories

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ---- SLO tables and verdicts ---------------------------------------------------------------------------


def test_slo_table_matches_the_cheat_sheet():
    assert get_slo("image_classification") == SLO("image_classification", 10.0, 100.0, 50.0, "FPS")
    assert get_slo("text_classification") == SLO("text_classification", 5.0, 1000.0, 10.0, "QPS")
    assert get_slo("speech_recognition").throughput_unit == "streams"
    assert set(SLO_TABLE) == {
        "image_classification", "object_detection", "semantic_segmentation", "speech_recognition", "text_classification"
    }


def test_verdict_pass_with_exact_margins():
    v = verdict(get_slo("image_classification"), latency_ms=7.5, throughput=150.0, size_mb=12.5)
    assert v["passed"] and v["latency_percentile"] == "p95"
    lat, thr, size = v["criteria"]["latency"], v["criteria"]["throughput"], v["criteria"]["size"]
    assert (lat["measured"], lat["target"], lat["margin"], lat["margin_pct"]) == (7.5, 10.0, 2.5, 25.0)
    assert lat["passed"] and thr["passed"] and size["passed"]
    assert (thr["margin"], thr["margin_pct"], thr["comparison"]) == (50.0, 50.0, ">")
    assert (size["margin"], size["margin_pct"], size["unit"]) == (37.5, 75.0, "MB")


def test_verdict_fail_names_the_failing_criterion():
    v = verdict(get_slo("object_detection"), latency_ms=45.0, throughput=30.0, size_mb=150.0, latency_percentile="p99")
    assert not v["passed"]
    assert v["criteria"]["latency"]["margin"] == -15.0 and not v["criteria"]["latency"]["passed"]
    throughput = v["criteria"]["throughput"]
    assert throughput["margin"] == 0.0 and not throughput["passed"]  # exactly on target: "> 30" is strict
    assert v["criteria"]["size"]["passed"] and v["latency_percentile"] == "p99"


def test_unknown_task_and_bad_inputs_are_refused():
    with pytest.raises(DeploykitError, match="Unknown SLO task 'face_detection'.*image_classification"):
        get_slo("face_detection")
    with pytest.raises(DeploykitError, match="percentile"):
        verdict(get_slo("image_classification"), 1.0, 1.0, 1.0, latency_percentile="p90")
    with pytest.raises(DeploykitError, match="max_size_mb"):
        custom_slo("image_classification", max_size_mb=0)


def test_overrides_replace_only_what_is_given():
    slo = custom_slo("image_classification", max_latency_ms=2.0)
    assert (slo.max_latency_ms, slo.min_throughput, slo.max_size_mb) == (2.0, 100.0, 50.0)
    assert get_slo("image_classification").max_latency_ms == 10.0  # the table itself is untouched
    assert not verdict(slo, 7.5, 150.0, 12.5)["passed"]


# ---- the report stage ----------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Collects images and text; HTMLParser raises nothing on bad HTML, so the test checks the tag balance."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.open, self.text, self.scripts = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "script":
            self.scripts += 1
        elif tag not in ("meta", "br", "hr"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"unbalanced </{tag}>"

    def handle_data(self, data):
        self.text.append(data)


def table_rows(md: str, heading: str) -> list[str]:
    """The body rows of the first table after `heading`."""
    lines = md.split(heading, 1)[1].split("\n## ", 1)[0].splitlines()
    return [line for line in lines if line.startswith("| ")][1:]  # [0] is the header; the |---| line has no space


EVIL = "Tiny <script>alert('x')</script> & friends"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    stages = [
        {"stage": "stub_export"},
        {"stage": "stub_quantize"},  # its guard keeps the FP32 ONNX
        {"stage": "stub_tensorrt"},
        # The earlier stage's pick stands (no selection), and ONNX runs on ONNX Runtime only: rows stay fixed.
        {"stage": "benchmark", **BENCH_FAST, "isolate": False, "select": False, "onnx_runtimes": ["onnxruntime"]},
        {"stage": "report", "slo": {"max_size_mb": 0.5}},
    ]
    run_pipeline(tiny_pipeline(runs, stages, description=EVIL))
    return runs / "tiny" / "report"


def test_report_markdown_has_one_row_per_artifact_and_the_verdict(full_run):
    md = (full_run / "report.md").read_text()
    assert "| Artifact | Format | Accuracy | Params | MACs | Size (MB) | P50 ms (batch 1) |" in md
    assert [row.split(" | ")[0] for row in table_rows(md, "## Artifacts")] == [
        "| train (torch fp32)",
        "| stub_export (onnx fp32)",
        "| stub_quantize (onnx int8)",
        "| stub_tensorrt (tensorrt fp16)",
    ]
    assert "| stub_tensorrt (tensorrt fp16) | tensorrt fp16 |" in md and "| skipped |" in md
    assert "## SLO verdict" in md
    assert "Deployable artifact: stub_export (onnx fp32), picked by the stub_quantize stage: too slow" in md
    assert "| size |" in md and "FAIL" in md and "Overall: FAIL." in md  # 0.5 MB override: the ~1 MB model fails size
    assert "P95 at batch 1" in md
    assert "Finding: " in md and "### train" in md  # the training diagnostics
    assert "TensorRT is not installed" in md
    assert "The stub_quantize stage kept stub_export/onnx as the deployable model, not its own: too slow." in md
    assert "![Training and validation loss" in md and "(curves.png)" in md
    assert "## Quantization: per-layer SQNR" in md and "No ONNX Runtime quantization upstream" in md  # stubs only


def test_report_metrics_carry_the_verdict_and_rows(full_run):
    metrics = json.loads((full_run / "meta.json").read_text())["metrics"]
    assert metrics["deployable"] == "stub_export (onnx fp32)"
    v = metrics["verdict"]
    assert not v["passed"] and not v["criteria"]["size"]["passed"] and v["criteria"]["size"]["target"] == 0.5
    assert len(metrics["rows"]) == 4 and metrics["rows"][0]["speedup"] == 1.0
    assert [r["status"] for r in metrics["rows"]] == ["benchmarked", "benchmarked", "benchmarked", "skipped"]


def test_report_html_is_self_contained_and_escaped(full_run):
    html = (full_run / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    page = _Page()
    page.feed(html)
    page.close()
    assert page.open == [] and page.scripts == 0  # balanced, and the description's <script> stayed text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; friends" in html
    assert EVIL in "".join(page.text)
    assert len(page.images) == 2 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert base64.b64decode(page.images[0].split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert 'class="fail">FAIL' in html


def test_report_plots_are_png_files(full_run):
    meta = json.loads((full_run / "meta.json").read_text())
    assert {"report", "report_html", "curves", "tradeoff"} <= set(meta["artifacts"])
    for name in ("curves.png", "accuracy_vs_latency.png"):
        data = (full_run / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000


class _NoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@register("stub_untrained")
class StubUntrained(Stage):
    """A model directory without training history: what a user's own checkpoint looks like."""

    Config = _NoConfig

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.train import save_model
        from deploykit.zoo import build_model

        arch = ctx.arch()
        model = build_model(arch)
        save_model(model, arch, ctx.out_dir)
        return StageResult(artifacts={"checkpoint": "model.pt", "arch": "model.json"})


def test_report_without_benchmark_or_history_still_reports(tmp_path):
    cfg = parse_pipeline(
        {
            "name": "bare",
            "runs_dir": str(tmp_path),
            "data": {"dataset": "synthetic", "image_size": 8, "channels": 1, "num_samples": 20},
            "model": {"name": "resnet18", "options": {"stem": "cifar", "width_mult": 0.25}},
            "stages": [{"stage": "stub_untrained"}, {"stage": "report", "title": "Bare <b>run</b>"}],
        }
    )
    run_pipeline(cfg)
    out = tmp_path / "bare" / "report"
    md = (out / "report.md").read_text()
    assert md.startswith("# Bare <b>run</b>")
    assert "| stub_untrained (torch fp32) |" in md and "not benchmarked" in md
    assert "curves skipped" in md and "No benchmark stage ran" in md and "No verdict for stub_untrained" in md
    assert not (out / "curves.png").exists() and not (out / "accuracy_vs_latency.png").exists()
    html = (out / "report.html").read_text()
    assert "<title>Bare &lt;b&gt;run&lt;/b&gt;</title>" in html and "<img" not in html
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta["artifacts"]) == {"report", "report_html"} and meta["metrics"]["verdict"] is None
    if tensorrt_unavailable():
        assert "No TensorRT engine was built or benchmarked in this run" in md


def _record(name: str, type_: str, metrics: dict) -> StageRecord:
    return StageRecord(name, type_, Path(name), {"metrics": metrics, "artifacts": {}})


def test_histories_include_nested_training_steps():
    upstream = [
        _record("train", "train", {"history": [{"epoch": 1}]}),
        _record("quantize", "quantize", {"qat": {"history": [{"epoch": 1}], "val_acc": 0.9}}),
        _record("export", "export", {"history": []}),
    ]
    assert list(histories(upstream)) == ["train", "quantize qat"]


def test_report_config_validates_the_task():
    with pytest.raises(DeploykitError, match="slo_task"):
        tiny_pipeline(Path("runs"), [{"stage": "report", "slo_task": "face_detection"}])


def test_pareto_front_keeps_only_the_undominated_artifacts_across_precisions(tmp_path):
    from deploykit.report.content import _pareto_blocks, tradeoff_points
    from deploykit.report.plots import plot_tradeoff

    def row(name, p50, acc, mb, precision="fp32", ran=None):
        return {"artifact": name, "p50_ms": p50, "accuracy": acc, "size_bytes": mb * 1e6, "precision": precision,
                "execution_precision": ran}  # fmt: skip

    rows = [
        row("torch fp32", 20.0, 0.95, 4.0),  # slower, as accurate, bigger than onnx fp32: dominated
        row("onnx fp32", 10.0, 0.95, 4.0),
        row("ov fp32 in bf16", 5.0, 0.949, 4.0, ran="bf16"),  # the same file, run in bf16: faster, a hair less
        row("onnx int8", 4.0, 0.94, 1.0, "int8"),  # faster and smaller, a little less accurate: on the front
        row("ov int8", 4.0, 0.94, 1.2, "int8"),  # as fast and accurate as onnx int8 but bigger: dominated
        {"artifact": "trt", "p50_ms": None, "accuracy": None, "size_bytes": 1, "precision": "fp16"},  # not a point
    ]
    points = tradeoff_points(rows)
    assert {p.label: p.on_front for p in points} == {
        "torch fp32": False, "onnx fp32": True, "ov fp32 in bf16": True, "onnx int8": True, "ov int8": False,
    }  # fmt: skip
    table = _pareto_blocks(points)[1]
    assert table.headers[1] == "Runs in"
    assert [r[1] for r in table.rows] == ["int8", "bf16", "fp32"]  # the front crosses the three precisions
    plot_tradeoff(points, tmp_path / "t.png", "P50 ms", slo_latency_ms=10.0)
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
