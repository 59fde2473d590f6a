"""`python -m pipeline.cli`: the `peftflow` command."""

from pipeline.cli import app

app()
