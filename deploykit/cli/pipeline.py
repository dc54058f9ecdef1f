"""The pipeline commands: optimize, train, models, schema, version."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from deploykit.cli.app import ConfigOpt, ForceOpt, QuietOpt, UntilOpt, app, console, user_errors
from deploykit.errors import DeploykitError


def _summary(outcomes: list[Any]) -> Table:
    table = Table(title="deploykit run")
    for col in ("stage", "type", "status", "time", "key metrics"):
        table.add_column(col)
    for o in outcomes:
        shown = {k: v for k, v in o.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v:,}" for k, v in list(shown.items())[:5])
        table.add_row(o.name, o.type, o.status, f"{o.wall_time_s:.1f}s", text)
    return table


def _run(config: Path, force: list[str], until: str | None, quiet: bool) -> None:
    from deploykit.pipeline.engine import run_pipeline
    from deploykit.pipeline.loader import load_pipeline
    from deploykit.progress import Reporter

    cfg = load_pipeline(config)
    with Reporter(enabled=not quiet and sys.stderr.isatty()) as reporter:
        outcomes = run_pipeline(cfg, force=force, until=until, reporter=reporter)
    if os.environ.get("RANK", "0") == "0":
        console.print(_summary(outcomes))
        for o in outcomes:  # stages that judge (deploy): their verdict in one line
            if isinstance(o.metrics.get("passed"), bool):
                failed = "; ".join(o.metrics.get("checks_failed") or [])
                verdict = "[green]PASS[/green]" if o.metrics["passed"] else f"[red]FAIL[/red] ({failed})"
                console.print(f"{o.name}: {verdict}")
        console.print(f"outputs: {Path(cfg.runs_dir) / cfg.name}")


@app.command()
@user_errors
def optimize(config: ConfigOpt, force: ForceOpt = [], until: UntilOpt = None, quiet: QuietOpt = False) -> None:  # noqa: B006
    """Run a pipeline file's stages in order, re-using cached stages."""
    _run(config, force, until, quiet)


@app.command()
@user_errors
def train(config: ConfigOpt, force: ForceOpt = [], quiet: QuietOpt = False) -> None:  # noqa: B006
    """Run a pipeline up to its last train stage (works under `torchrun --nproc_per_node N -m deploykit train`)."""
    from deploykit.pipeline.loader import load_pipeline

    stages = [s for s in load_pipeline(config).stages if s.stage == "train"]  # type: ignore[attr-defined]
    if not stages:
        raise DeploykitError(f"Pipeline '{config}' has no train stage: add `- stage: train` to its stages.")
    _run(config, force, stages[-1].stage_name, quiet)


@app.command()
@user_errors
def models(
    image_size: Annotated[int, typer.Option(help="Input resolution for the MACs column.")] = 224,
    num_classes: Annotated[int, typer.Option(help="Classifier outputs.")] = 1000,
) -> None:
    """List the reference architectures with parameters and MACs."""
    from deploykit.zoo import model_table

    table = Table(title=f"deploykit model zoo ({image_size}x{image_size}, {num_classes} classes)")
    for col in ("name", "family", "params", "MACs", "native res."):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for row in model_table(image_size=image_size, num_classes=num_classes):
        table.add_row(row["name"], row["family"], f"{row['params']:,}", f"{row['macs'] / 1e9:.2f} G", str(row["default_resolution"]))
    console.print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline files (for editors and validation)."""
    from deploykit.pipeline.loader import json_schema

    print(json.dumps(json_schema(), indent=2))


@app.command()
def version() -> None:
    """Print deploykit's version."""
    from deploykit import __version__

    print(__version__)

