"""`peftflow predict` and `serve`: answers from trained adapters, rendered with the template each was trained
with; in-process (PyTorch) for rows of a file or stdin, or over llama-server behind the OpenAI API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from pipeline.cli.common import fleet_adapters, later, one_line_errors
from pipeline.core.io import read_jsonl
from pipeline.core.layout import FLEET
from pipeline.core.stage import PipelineError, peek


@one_line_errors
def predict(
    adapter: list[str] = typer.Option(..., help="adapter folder, or NAME=FOLDER; repeat for several adapters"),
    base: Path = typer.Option(Path("models/base"), help="base model folder (the base stage's output)"),
    input: str = typer.Option("-", help="jsonl file of rows, or - for stdin (JSON objects or plain text lines)"),
    with_base: bool = typer.Option(False, "--with-base", help="also answer with the base model (adapter disabled)"),
    max_new_tokens: int = typer.Option(None, help="generation limit for free-text answers (default: params.yaml's "
                                                  "serve.max_new_tokens)"),
    params: Path = typer.Option(Path("params.yaml"), help="where the defaults come from (section serve)"),
    allow_other_base: bool = typer.Option(False, "--allow-other-base",
                                          help="load adapters onto base weights other than the recorded ones"),
    id_field: str = typer.Option(None, "--id", help="keep only this field of each input row beside the answers "
                                                   "(default: the whole row, as `input`)"),
) -> None:
    """Answer rows with each adapter, rendered with the template that adapter was trained with. Each output line:
    the row number, each adapter's answer by its name, and the input row (`input`) or its `--id` field."""
    limit, batch = max_new_tokens or peek(params, "serve.max_new_tokens"), peek(params, "serve.batch_size")
    if not isinstance(limit, int) or not isinstance(batch, int):
        raise PipelineError(f"predict: {params} has no serve.max_new_tokens and serve.batch_size (run where the "
                            "project's params.yaml is, or give --params)")
    named = dict(split_adapter(a) for a in adapter)
    taken = ({"row", "input", id_field} | ({"base"} if with_base else set())) & set(named)
    if taken:
        raise PipelineError(f"predict: an adapter may not be named {', '.join(sorted(taken))}: the output uses the "
                            "name for another field")
    p = later("pipeline.predict").Predictor(base, named, max_new_tokens=limit, batch_size=batch,
                                            allow_other_base=allow_other_base)
    prompt = next(iter(p.prompts.values()))
    rows = [stdin_row(line, prompt) for line in sys.stdin if line.strip()] if input == "-" else read_jsonl(input)
    missing = next((i for i, r in enumerate(rows) if id_field is not None and id_field not in r), None)
    if missing is not None:
        raise PipelineError(f"predict: {input} row {missing + 1} field '{id_field}': missing (--id names it)")
    answers = {name: p.predict(rows, name) for name in p.adapters}
    if with_base:
        answers["base"] = p.predict(rows, None)
    for i, row in enumerate(rows):
        kept = {id_field: row[id_field]} if id_field is not None else {"input": row}
        typer.echo(json.dumps({"row": i + 1, **{k: v[i] for k, v in answers.items()}, **kept}, ensure_ascii=False))


@one_line_errors
def serve(
    adapter: list[str] = typer.Argument(None, help="gguf stage folders (NAME=FOLDER or FOLDER, named by its task); "
                                                   "default: models/gguf"),
    port: int = typer.Option(8080, help="the port on 127.0.0.1"),
    threads: int = typer.Option(0, help="llama-server's threads (0: every core)"),
    slots: int = typer.Option(4, help="requests llama-server answers at once"),
    ctx: int = typer.Option(2048, help="context length of each slot"),
    cache_type: str = typer.Option("f16", help="llama-server's KV cache type (f16: its default; f32: answers "
                                               "closest to PyTorch's float32; q8_0: half the memory)"),
    max_tokens: int = typer.Option(None, help="default answer limit (default: params.yaml's serve.max_new_tokens)"),
    params: Path = typer.Option(Path("params.yaml"), help="where the default answer limit comes from"),
    fleet: bool = typer.Option(False, help="every adapter of the fleet (fleet/dvc.yaml), by name, beside any given"),
    root: Path = typer.Option(Path("."), help="--fleet: the DVC project folder"),
    log: Path = typer.Option(None, help="llama-server's log file (default: peftflow-serve-PORT-llama-server.log in "
                                        "the temporary folder)"),
) -> None:
    """Serve adapters over one base model with llama.cpp's llama-server, OpenAI-compatible on 127.0.0.1: the
    `model` field names the adapter, whose training template is applied to the user's text. llama-server is
    restarted if it dies (GET /health says how it is). Runs until SIGINT or SIGTERM (docs/serving.md)."""
    specs = [(n, Path(f)) if sep else (None, Path(n)) for n, sep, f in (a.partition("=") for a in adapter or
                                                                          ([] if fleet else ["models/gguf"]))]
    specs += fleet_adapters(root / FLEET) if fleet else []
    limit = max_tokens or peek(params, "serve.max_new_tokens") or 64
    srv = later("pipeline.serve")
    adapters = srv.load_adapters(specs)  # checked before anything starts
    typer.echo(f"serving {', '.join(a.name for a in adapters)} over {adapters[0].base} on "
               f"http://127.0.0.1:{port}/v1")
    srv.serve(adapters, port, threads or os.cpu_count() or 1, slots, ctx, limit, cache_type, log)


def split_adapter(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    return (name, Path(path)) if sep else (Path(spec).name, Path(spec))


def stdin_row(line: str, prompt) -> dict:
    """A JSON object as it is, or a plain line of text as the row its task expects."""
    line = line.strip()
    if line.startswith("{"):
        return json.loads(line)
    return later("pipeline.tasks").get(prompt.task).row_from_text(line, prompt)
