"""The `report` stage: one Markdown and one self-contained HTML report of the whole run, with plots."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Literal

from pydantic import Field

from deploykit.artifacts import StageResult
from deploykit.files import atomic_write_text
from deploykit.loadtest.slo import SLOSettings
from deploykit.machine import machine_info, versions
from deploykit.pipeline.context import StageContext
from deploykit.pipeline.registry import Stage, register


class ReportConfig(SLOSettings):
    """Report settings: the SLO it judges the deployable artifact against, and at which batch size."""

    latency_batch: int = Field(1, ge=1, description="Batch size whose latency the table shows and the verdict judges.")
    latency_percentile: Literal["p50", "p95", "p99"] = Field("p95", description="Latency percentile judged.")
    title: str | None = Field(None, description="Report title (default: the pipeline's name).")


@register("report")
class ReportStage(Stage):
    """Write report.md and report.html: artifacts table, stages, curves, diagnostics, SLO verdict, honest notes."""

    Config = ReportConfig

    def run(self, ctx: StageContext) -> StageResult:
        from deploykit.report import content, plots, render_html, render_markdown

        cfg = self.config
        bench_record = next((r for r in reversed(ctx.upstream) if r.artifact("benchmark") is not None), None)
        benchmark = json.loads(bench_record.artifact("benchmark").read_text(encoding="utf-8")) if bench_record else None
        inp = content.ReportInput(
            title=cfg.title or f"deploykit report: {ctx.pipeline.name}",
            description=ctx.pipeline.description,
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            upstream=ctx.upstream,
            benchmark=benchmark,
            machine=benchmark["machine"] if benchmark else machine_info(),
            versions=benchmark["versions"] if benchmark else versions(),
            slo=cfg.target(),
            latency_batch=cfg.latency_batch,
            latency_percentile=cfg.latency_percentile,
            metric_name=ctx.pipeline.metric_name,
            model=ctx.pipeline.model.label(),
            # recorded beside every model upstream (the engine's meta.json): no need to build the data again
            preprocessing=next((r.meta["preprocessing"] for r in reversed(ctx.upstream) if "preprocessing" in r.meta),
                               None),
        )
        rows = content.artifact_rows(ctx.upstream, benchmark, cfg.latency_batch)
        artifacts = {"report": "report.md", "report_html": "report.html"}
        if histories := content.histories(ctx.upstream):
            plots.plot_curves(histories, ctx.out_dir / content.CURVES_FILE, ctx.pipeline.metric_name)
            artifacts["curves"] = content.CURVES_FILE
        if points := content.tradeoff_points(rows):
            label = f"P50 latency at batch {cfg.latency_batch} (ms)"
            plots.plot_tradeoff(
                points, ctx.out_dir / content.TRADEOFF_FILE, label, inp.slo.max_latency_ms, ctx.pipeline.metric_name
            )
            artifacts["tradeoff"] = content.TRADEOFF_FILE
        blocks, metrics = content.build(inp, rows, "curves" in artifacts, "tradeoff" in artifacts)
        images = {name: (ctx.out_dir / name).read_bytes() for name in artifacts.values() if name.endswith(".png")}
        atomic_write_text(ctx.out_dir / "report.md", render_markdown(blocks))
        atomic_write_text(ctx.out_dir / "report.html", render_html(inp.title, blocks, images))
        verdict = metrics["verdict"]
        ctx.reporter.log(
            f"report: deployable {metrics['deployable']}, SLO {cfg.slo_task} "
            f"{'not judged' if verdict is None else 'PASS' if verdict['passed'] else 'FAIL'}"
        )
        return StageResult(artifacts=artifacts, metrics=metrics)
