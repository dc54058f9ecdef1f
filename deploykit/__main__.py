"""`python -m deploykit` (and `torchrun -m deploykit train ...`) runs the CLI."""

from deploykit.cli import app

app()
