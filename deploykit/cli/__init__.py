"""The `deploykit` command: a thin face over the same functions the tests call.

Each module registers its commands on the one typer app; importing them here assembles it.
"""

from deploykit.cli import deploy, pipeline  # noqa: F401  (register the commands)
from deploykit.cli.app import app

__all__ = ["app"]
