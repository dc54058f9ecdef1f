"""The `deploykit` typer app, its consoles, and the wrapper that turns a DeploykitError into one sentence."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from deploykit.errors import DeploykitError

app = typer.Typer(
    help="Train, compress, export, serve and validate PyTorch models from one YAML pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline YAML file.")]
ForceOpt = Annotated[list[str], typer.Option("--force", help="Re-run this stage and every stage after it (repeatable).")]
UntilOpt = Annotated[str | None, typer.Option("--until", help="Stop after this stage.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a DeploykitError as its one sentence and exit 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeploykitError as e:
            err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
