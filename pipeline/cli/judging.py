"""`peftflow eval`: lm-evaluation-harness on the base model and the adapter, from task files kept in the project
(their data local), written as DVC metrics and a plot; `--agreement`: lm-eval's accuracy against the evaluate
stage's, row by row, on the adapter's own validation rows (pipeline/lmeval.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.common import later, one_line_errors
from pipeline.core.io import atomic_write_json
from pipeline.core.stage import PipelineError


@one_line_errors
def lm_eval(
    tasks: Path = typer.Option(Path("evals"), help="a folder of lm-eval task files (YAML; data files local)"),
    task: list[str] = typer.Option(None, help="the tasks to run (default: every task the folder defines)"),
    adapter: Path = typer.Option(Path("models/adapter"), help="the adapter folder (loaded by lm-eval as `peft=`)"),
    base: Path = typer.Option(Path("models/base"), help="the base model folder the adapter was trained on"),
    out: Path = typer.Option(Path("reports/lm_eval"), help="where metrics.json, metrics.png (or agreement.json) go"),
    limit: int = typer.Option(None, help="at most this many rows of each task"),
    batch_size: int = typer.Option(8),
    chat_template: bool = typer.Option(True, help="render each prompt in the tokenizer's chat template"),
    agreement: bool = typer.Option(False, "--agreement", help="instead: the evaluate stage's rows and rules against "
                                                            "lm-eval's, row by row (exit 1 if a row differs)"),
    formatted: Path = typer.Option(Path("data/formatted"), help="--agreement: the format stage's rows"),
) -> None:
    """Run lm-eval tasks given as local files on the base model and on the adapter: one metrics file for
    `dvc metrics show` / `dvc metrics diff` and a bar plot. `--agreement`: an lm-eval task made from the
    adapter's formatted validation rows, lm-eval's `acc` against the evaluate stage's `loglik` rule."""
    for path in (adapter, base):
        if not path.is_dir():
            raise PipelineError(f"{path}: no such folder (run `dvc repro` first)")
    lmeval = later("pipeline.lmeval")
    if agreement:
        show_agreement(lmeval.agreement(base, adapter, formatted, out, batch_size, limit))
        return
    names = task or lmeval.task_names(tasks)
    if not names:
        raise PipelineError(f"{tasks}: no lm-eval task file (a YAML file with a `task` key)")
    metrics = lmeval.evaluate_tasks(base, adapter, tasks, names, batch_size, limit, chat_template)
    atomic_write_json(out / "metrics.json", metrics)
    lmeval.plot(metrics, out / "metrics.png")
    table = Table("task", "metric", "base", "adapter", title=f"lm-eval, {tasks} (dvc metrics show {out}/metrics.json)")
    for name, ms in metrics.items():
        for m, v in ms.items():
            table.add_row(name, m, f"{v['base']:.4f}" if v["base"] is not None else "–", f"{v['adapter']:.4f}")
    Console().print(table)


def show_agreement(r: dict) -> None:
    """The agreement in a few lines; exit 1 if any row's pick differs between lm-eval and the evaluate stage."""
    typer.echo(f"{r['rows']} rows: lm-eval acc {r['lm_eval']['acc']} / evaluate loglik {r['evaluate']['loglik']}; "
               f"lm-eval acc_norm (per character) {r['lm_eval']['acc_norm']} / evaluate loglik_norm (per token) "
               f"{r['evaluate']['loglik_norm']}; lm-eval's extra term per row (the prompt's trailing whitespace "
               f"scored with the answer): mean {r['shift']['mean']}, spread within a row "
               f"{r['shift']['max_spread_within_a_row']}")
    for row in r["differing_rows"]:
        typer.echo(f"  differs: {row}")
    if r["differing_rows"]:
        raise typer.Exit(1)
    typer.echo("every row: the same pick and the same log-likelihoods (up to that one term)")
