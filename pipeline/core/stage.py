"""How a stage module runs as `python -m pipeline.<stage>`: typer parses the paths, and a
pipeline error (bad params, bad data, bad template, ...) is one line on stderr and exit code 2
instead of a traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

import typer


class PipelineError(Exception):
    """An error the user can fix; its message names the file, row, field or params key."""


def tool_env() -> dict[str, str]:
    """The environment for DVC and the stage commands it starts: this interpreter's bin folder first on
    PATH, so `dvc` (and its queue workers) and `python -m pipeline.<stage>` are this installation's."""
    return {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def entry(fn: Callable) -> None:
    """Run `fn` as a command-line program."""

    # bitsandbytes warns on import that an optional CPU kernel package is missing: harmless
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(wrapper)
    app()
