"""How a stage module runs as `python -m pipeline.stages.<name>`: typer parses the paths, and a
pipeline error (bad params, bad data, bad template, ...) is one line on stderr and exit code 2
instead of a traceback. Also the errors every module raises, and `peek`, one params value read
before the imports that checking the whole file costs.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml


class PipelineError(Exception):
    """An error the user can fix; its message names the file, row, field or params key."""


class Interrupted(PipelineError):
    """Stopped by the user (Ctrl-C); the message says where and what a rerun does. Exit code 130."""


class TemplateError(PipelineError, ValueError):
    """A template could not render a row; the message names the template and row."""


def tool_env() -> dict[str, str]:
    """The environment for DVC and the stage commands it starts: this interpreter's bin folder first on
    PATH, so `dvc` (and its queue workers) and `python -m pipeline.<stage>` are this installation's."""
    return {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}


def peek(path: str | Path, key: str) -> Any:
    """One value of a params file by its dotted key ("train.allocator"), read without checking the file:
    None when the file, the key or valid YAML is missing. For what a program decides before the imports
    that checking costs; the stage checks the whole file after."""
    try:
        node = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def option(argv: list[str], name: str, default: str) -> str:
    """A program's option (`--params x` or `--params=x`) from its raw arguments, before typer parses them:
    for what a program decides before its heavy imports."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def without_bitsandbytes(quantization: dict | None, optimizer: str | None) -> bool:
    """A stage program whose params quantize no base (`train.quantization` null) and use no 8-bit optimizer
    (`train.optimizer` adamw) runs without bitsandbytes: PEFT and transformers import it whenever it is
    installed (seconds and tens of MB in every stage process: docs/speed.md#memory), and nothing else here
    uses it.
    It is marked absent (`sys.modules[name] = None`, Python's own way to make an import fail), so both take
    it for not installed. For whole processes only, before PEFT is imported: a library imported without it
    does not gain it later, so in-process callers (tests) keep it. Returns whether it did."""
    if "bitsandbytes" in sys.modules or quantization is not None or optimizer != "adamw":
        return False
    sys.modules["bitsandbytes"] = None
    return True


def error_line(e: PipelineError, params: str | Path | None = None) -> str:
    """The one line a PipelineError is shown as: `error: ...`, a message about `params.yaml:` naming the params
    file the program read instead when it read another (`--params`)."""
    text = " ".join(str(e).split())
    if params is not None and text.startswith("params.yaml:") and Path(params) != Path("params.yaml"):
        text = f"{params}:{text[len('params.yaml:'):]}"
    return f"error: {text}"


def command(fn: Callable, whole_process: bool = True) -> typer.Typer:
    """`fn` as a typer program: a PipelineError is one line on stderr and exit code 2. A `whole_process`
    (`python -m`) also leaves bitsandbytes out when its params need none; a program run inside another
    process (tests, the contract check) must not change that process's imports."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if whole_process and "params" in kwargs:  # read before the params are checked: that imports PEFT
            params = kwargs["params"]
            without_bitsandbytes(peek(params, "train.quantization"), peek(params, "train.optimizer"))
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("error: interrupted (Ctrl-C); outputs are written whole or not at all: none was half written",
                       err=True)
            sys.exit(130)
        except PipelineError as e:
            typer.echo(error_line(e, kwargs.get("params")), err=True)
            sys.exit(130 if isinstance(e, Interrupted) else 2)

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(wrapper)
    return app


def entry(fn: Callable) -> None:
    """Run `fn` as a command-line program."""
    # bitsandbytes warns on import that an optional CPU kernel package is missing: harmless
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    command(fn)()
