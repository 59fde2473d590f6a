"""What the `peftflow` command groups share: the one lazy load of a heavy module, one-line errors, JSON
reports read if present, and a fleet's adapters by name. Imports no command group."""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import typer

from pipeline.core.layout import adapter_dir, adapter_names
from pipeline.core.stage import PipelineError, error_line


def later(module: str) -> ModuleType:
    """A command's module that imports PyTorch, transformers or Prefect (seconds), loaded when that command runs,
    so `peftflow --help` and the light commands answer at once: the CLI's one lazy load, like the plug-in
    registries' (the CLI is no DVC stage: nothing depends on its import closure)."""
    return importlib.import_module(module)


def one_line_errors(fn: Callable) -> Callable:
    """A command whose PipelineError is one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            typer.echo(error_line(e, kwargs.get("params")), err=True)
            raise typer.Exit(2) from None

    return wrapper


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def gguf_score(c: dict) -> float:
    """A GGUF file's figure in llama.cpp: its accuracy (classification), else its answers as PyTorch's (near ties
    counted where measured)."""
    return c.get("accuracy", c.get("agreement_within_ties", c["answer_agreement"]))


def fleet_names(fleet: Path) -> list[str]:
    """The fleet's adapters (those the `fleet` stage has written params for); an error before its first run."""
    names = adapter_names(fleet)
    if not names:
        raise PipelineError(f"{fleet}/resolved: no adapters yet; run `dvc repro {fleet}/dvc.yaml` first")
    return names


def fleet_adapters(fleet: Path) -> list[tuple[str, Path]]:
    """(name, its gguf stage folder) for every adapter of a fleet (fleet/resolved/<name>.yaml)."""
    return [(name, adapter_dir(fleet, name) / "models" / "gguf") for name in fleet_names(fleet)]
