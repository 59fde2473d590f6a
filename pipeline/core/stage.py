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


def without_bitsandbytes(quantization: dict | None, optimizer: str | None) -> bool:
    """A stage program whose params quantize no base (`train.quantization` null) and use no 8-bit optimizer
    (`train.optimizer` adamw) runs without bitsandbytes: PEFT and transformers import it whenever it is
    installed (2.5 s and ~50 MB resident in every stage process, measured), and nothing else here uses it.
    It is marked absent (`sys.modules[name] = None`, Python's own way to make an import fail), so both take
    it for not installed. For whole processes only, before PEFT is imported: a library imported without it
    does not gain it later, so in-process callers (tests) keep it. Returns whether it did."""
    if "bitsandbytes" in sys.modules or quantization is not None or optimizer != "adamw":
        return False
    sys.modules["bitsandbytes"] = None
    return True


def entry(fn: Callable) -> None:
    """Run `fn` as a command-line program."""

    # bitsandbytes warns on import that an optional CPU kernel package is missing: harmless
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "params" in kwargs:  # read before the params are checked: that imports PEFT
            from pipeline.core.params import peek

            params = kwargs["params"]
            without_bitsandbytes(peek(params, "train.quantization"), peek(params, "train.optimizer"))
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(wrapper)
    app()
