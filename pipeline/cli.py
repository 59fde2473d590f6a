"""The `peftflow` command: helpers around the DVC pipeline (the stages themselves run from
dvc.yaml as `python -m pipeline.<stage>`).

  peftflow metrics   print the latest metrics of every stage as one table, and where they are
  peftflow predict   answer rows with one or more adapters, rendered as they were trained
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


@app.callback()
def _root() -> None:
    """Reproducible PEFT fine-tuning: run the pipeline with `dvc repro`."""


@app.command()
def metrics(reports: Path = typer.Option(Path("reports"), help="the pipeline's reports folder")) -> None:
    """Print the latest metrics of the pipeline (after `dvc repro`)."""
    console = Console()
    table = Table("stage", "metric", "base", "adapter", "gain", title="peftflow metrics")
    v = _load(reports / "validate.json")
    if v:
        for split, r in v.items():
            table.add_row("validate", f"{split} accepted / rejected", "", f"{r['accepted']} / {r['rejected']}", "")
    t = _load(reports / "train" / "metrics.json")
    if t:
        table.add_row("train", f"{t['method']}: final loss, {t['steps']} steps", "", str(t["final_loss"]), "")
        table.add_row("train", "trainable params / seconds", "", f"{t['trainable_params']:,} / {t['seconds']}", "")
    e = _load(reports / "evaluate" / "metrics.json")
    if e:
        for k in ("accuracy", "macro_f1", "eval_loss", "perplexity"):
            if k in e["adapter"]:
                gain = e.get("gain", {}).get(k, "")
                table.add_row("evaluate", k, str(e["base"][k]), str(e["adapter"][k]), str(gain))
    x = _load(reports / "export.json")
    if x:
        merged = x.get("merged")
        detail = f"max |merged - adapter| {x['max_abs_diff_vs_adapter']:.1e}" if merged else x.get("reason", "")
        table.add_row("export", "merged" if x.get("merged") else "adapter only", "", detail, "")
    if not table.rows:
        console.print(f"no metrics under {reports}/ yet: run `dvc repro` first")
        raise typer.Exit(1)
    console.print(table)
    console.print(f"metrics: {reports}/*.json, {reports}/train/metrics.json, {reports}/evaluate/metrics.json; "
                  f"plots: {reports}/evaluate/confusion.png and `dvc plots show`")


@app.command()
def predict(
    adapter: list[str] = typer.Option(..., help="adapter folder, or NAME=FOLDER; repeat for several adapters"),
    base: Path = typer.Option(Path("models/base"), help="base model folder (the base stage's output)"),
    input: str = typer.Option("-", help="jsonl file of rows, or - for stdin (JSON objects or plain text lines)"),
    with_base: bool = typer.Option(False, "--with-base", help="also answer with the base model (adapter disabled)"),
    max_new_tokens: int = typer.Option(64, help="generation limit for instruction adapters"),
) -> None:
    """Answer rows with each adapter, rendered with the template that adapter was trained with."""
    import logging
    import sys

    from transformers.utils import logging as hf_logging

    from pipeline.io import read_jsonl
    from pipeline.predict import Predictor
    from pipeline.stage import PipelineError

    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        named = dict(_split_adapter(a) for a in adapter)
        p = Predictor(base, named, max_new_tokens=max_new_tokens)
        text_field = next(iter(p.records.values())).get("text_field", "sentence")
        if input == "-":
            rows = [_stdin_row(line, text_field) for line in sys.stdin if line.strip()]
        else:
            rows = read_jsonl(input)
        answers = {name: p.predict(rows, name) for name in p.adapters}
        if with_base:
            answers["base"] = p.predict(rows, None)
    except PipelineError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    for i, _ in enumerate(rows):
        typer.echo(json.dumps({"row": i + 1, **{k: v[i] for k, v in answers.items()}}, ensure_ascii=False))


def _split_adapter(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    return (name, Path(path)) if sep else (Path(spec).name, Path(spec))


def _stdin_row(line: str, text_field: str) -> dict:
    line = line.strip()
    if line.startswith("{"):
        return json.loads(line)
    return {text_field: line, "input": "", "instruction": line}


if __name__ == "__main__":
    app()
