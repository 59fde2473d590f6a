"""The `peftflow` command: helpers around the DVC pipeline (the stages themselves run from
dvc.yaml as `python -m pipeline.<stage>`).

  peftflow metrics   print the latest metrics of every stage as one table, and where they are
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


if __name__ == "__main__":
    app()
