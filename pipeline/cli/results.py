"""`peftflow metrics`, `report` and `compare`: what a run gave, against another revision, across experiments.
Inputs: reports/ (or a fleet's), DVC's metrics and params diffs, `dvc exp show`. Outputs: tables on stdout, a
pull-request report folder, a sweep's markdown and plot."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.common import fleet_names, gguf_score, load_json, one_line_errors
from pipeline.core.layout import FLEET, adapter_dir, resolved_params
from pipeline.core.stage import peek
from pipeline.report import build as build_report
from pipeline.sweep import compare as compare_runs
from pipeline.sweep import label


def train_seconds(train_reports: Path) -> str:
    """The train run's seconds: resources.json (what it took); run.json in an experiment or an older run."""
    took = load_json(train_reports / "resources.json") or load_json(train_reports / "run.json") or {}
    return str(took.get("seconds", "?"))


def fleet_table(fleet: Path) -> Table:
    """One row per adapter of a fleet (fleet/resolved/<name>.yaml, fleet/<name>/reports/)."""
    table = Table("adapter", "task", "method", "train loss (steps)", "train s", "evaluate: base -> adapter", "gguf",
                  title=f"peftflow metrics: the fleet in {fleet}/")
    for name in fleet_names(fleet):
        resolved, reports = resolved_params(fleet, name), adapter_dir(fleet, name) / "reports"
        t = load_json(reports / "train" / "metrics.json") or {}
        e, g = load_json(reports / "evaluate" / "metrics.json") or {}, load_json(reports / "gguf.json") or {}
        key = next((k for k in ("accuracy", "eval_loss") if k in e.get("adapter", {})), None)
        score = f"{key} {e['base'][key]} -> {e['adapter'][key]}" if key else "not yet"
        files = g.get("llama_cpp", {})
        gguf = (", ".join(f"{f.split('.')[0]}: {gguf_score(c)}" for f, c in files.items())
                if files else g.get("reason", "not yet"))
        table.add_row(name, str(peek(resolved, "task")), str(peek(resolved, "train.method")),
                      f"{t['final_loss']} ({t['steps']})" if t else "not yet", train_seconds(reports / "train"),
                      score, gguf)
    return table


@one_line_errors
def metrics(reports: Path = typer.Option(Path("reports"), help="the pipeline's reports folder"),
            fleet: bool = typer.Option(False, help="the fleet's adapters instead (fleet/dvc.yaml): one row each"),
            root: Path = typer.Option(Path("."), help="--fleet: the DVC project folder")) -> None:
    """Print the latest metrics of the pipeline, or of every adapter of the fleet (after `dvc repro`)."""
    console = Console()
    if fleet:
        console.print(fleet_table(root / FLEET))
        return
    table = Table("stage", "metric", "base", "adapter", "gain", title="peftflow metrics")
    v = load_json(reports / "validate.json")
    if v:
        for split, r in v.items():
            table.add_row("validate", f"{split} accepted / rejected", "", f"{r['accepted']} / {r['rejected']}", "")
    t = load_json(reports / "train" / "metrics.json")
    if t:
        table.add_row("train", f"{t['method']}: final loss, {t['steps']} steps", "", str(t["final_loss"]), "")
        table.add_row("train", "trainable params / seconds", "",
                      f"{t['trainable_params']:,} / {train_seconds(reports / 'train')}", "")
    e = load_json(reports / "evaluate" / "metrics.json")
    if e:
        for k in ("accuracy", "macro_f1", "eval_loss", "perplexity"):
            if k in e["adapter"]:
                gain = e.get("gain", {}).get(k, "")
                table.add_row("evaluate", k, str(e["base"][k]), str(e["adapter"][k]), str(gain))
    x = load_json(reports / "export.json")
    if x:
        merged = x.get("merged")
        detail = f"max |merged - adapter| {x['max_abs_diff_vs_adapter']:.1e}" if merged else x.get("reason", "")
        table.add_row("export", "merged" if x.get("merged") else "adapter only", "", detail, "")
    g = load_json(reports / "gguf.json")
    if g:
        if not g.get("written"):
            table.add_row("gguf", "not written", "", g.get("reason", ""), "")
        for name, c in g.get("llama_cpp", {}).items():  # each file answered in llama.cpp (pytorch: the reference)
            size = g["files"][name]["bytes"] / 2**20
            what = "accuracy" if "accuracy" in c else "as PyTorch"
            table.add_row("gguf", f"{name} ({size:.0f} MiB) in llama.cpp: {what}",
                          str(g["pytorch"].get("accuracy", "")), str(gguf_score(c)), "")
    if not table.rows:
        console.print(f"no metrics under {reports}/ yet: run `dvc repro` first")
        raise typer.Exit(1)
    console.print(table)
    console.print(f"metrics: {reports}/*.json, {reports}/train/metrics.json, {reports}/evaluate/metrics.json; "
                  f"plots: {reports}/evaluate/confusion.png and `dvc plots show`")


def report(
    base: str = typer.Option("main", help="the revision to compare the working tree with"),
    out: Path = typer.Option(Path("pr-report"), help="folder for report.md and its images"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
    atol: float = typer.Option(0.0, help="a metric delta with |delta| <= atol + rtol |before| is marked as within"),
    rtol: float = typer.Option(0.0, help="relative part of that tolerance"),
) -> None:
    """Markdown report for a pull request: what changed first (params, metrics beyond the tolerance), the
    hardware class of both runs, changed plots; run facts last."""
    typer.echo(build_report(root, base, out, atol, rtol))
    typer.echo(f"written to {out / 'report.md'}", err=True)


@one_line_errors
def compare(
    name: str = typer.Option(None, "--name", "-n", help="only the experiments named NAME-* (a sweep)"),
    metric: str = typer.Option(None, help="adapter metric to compare (default: accuracy, else eval_loss)"),
    out: Path = typer.Option(None, help="output path without suffix (default: docs/results/sweep-NAME)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
) -> None:
    """Compare experiments from `dvc exp show --json`: mean ± spread over seeds per params point, against
    train time, as a markdown table and a plot; the best is named."""
    out = out or root / "docs" / "results" / f"sweep-{name or 'all'}"
    groups = compare_runs(root, out, name, metric)
    best = groups[0]
    typer.echo(f"compare: {len(groups)} points; best {label(best['point'])}: {best['metric']['mean']:.4f} ± "
               f"{best['metric']['std']:.4f} over {best['metric']['n']} seed(s); {out.with_suffix('.md')}, "
               f"{out.with_suffix('.png')}")
