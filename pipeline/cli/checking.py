"""`peftflow lineage`, `verify` and `contract`: the audit of an artifact (folder, GGUF, server), a rerun of
stages against dvc.lock, and dvc.yaml against what the stages' code reads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline import audit
from pipeline.cli.common import later, one_line_errors
from pipeline.core.layout import FLEET, adapter_dir, resolved_params
from pipeline.verify import verify as run_verify


@one_line_errors
def lineage(
    path: str = typer.Argument(..., help="an adapter or export folder, a GGUF file, a `peftflow serve` URL, or the "
                                         "name of an adapter of the fleet (its adapter folder)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
) -> None:
    """Print the chain adapter -> train data -> raw data -> base model with every hash checked
    against the workspace and the DVC cache, and the commands that reproduce it (for a server: for each
    adapter it serves). Exit code 1 if anything differs."""
    if path.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(path.rstrip("/") + "/v1/models", timeout=10) as r:
            served = json.loads(r.read())["data"]
        failed = [m["id"] for m in served if not lineage_of(m["gguf"], root, f"adapter '{m['id']}': ")]
        if failed:
            raise typer.Exit(1)
        return
    if not Path(path).exists() and resolved_params(root / FLEET, path).exists():
        path = str(adapter_dir(root / FLEET, path) / "models" / "adapter")  # a fleet adapter by its name
    if not lineage_of(path, root):
        raise typer.Exit(1)


def lineage_of(path: str, root: Path, label: str = "") -> bool:
    """Print one artifact's lineage; whether every hash and package version matched."""
    if path.endswith(".gguf"):
        r = audit.check_gguf(Path(path), later("pipeline.core.llamacpp").read_stamp(Path(path)), root)
    else:
        r = audit.check(Path(path), root)
    return audit.show(r, path, label)


def verify(
    stages: list[str] = typer.Argument(None, help="stages to rerun (default: all of dvc.yaml's; a fleet adapter's "
                                                  "by its lock name, train@chat)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
    keep: Path = typer.Option(None, help="rerun in this folder and keep it (default: a temporary one)"),
) -> None:
    """Rerun stages in a scratch copy of the workspace and compare every output hash with dvc.lock: one
    row per output (same / differs, with the files inside a folder that differ). Exit code 1 on any
    difference."""
    console = Console()
    undeclared = later("pipeline.dvcspec").differences(root)
    for line in undeclared:
        console.print(f"[red]{line}[/red]")
    try:
        rows = run_verify(root, stages or None, keep, log=lambda m: console.print(m, style="dim"))
    except (ValueError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    table = Table("stage", "output", "result", "files that differ", title="outputs against dvc.lock")
    for r in rows:
        result = "same" if r.same else f"[red]differs[/red] {r.detail}"
        table.add_row(r.stage, r.path, result, "\n".join(r.files[:10]) + (" …" if len(r.files) > 10 else ""))
    console.print(table)
    bad = [r for r in rows if not r.same]
    if bad or undeclared:
        console.print(f"[red]{len(bad)} of {len(rows)} outputs differ from dvc.lock[/red]")
        raise typer.Exit(1)
    console.print(f"all {len(rows)} outputs are the same as in dvc.lock")


def contract(
    write: bool = typer.Option(False, "--write", help="rewrite each stage's params and code deps in dvc.yaml, and "
                                                     "fleet/dvc.yaml from it"),
    table: str = typer.Option(None, help="print the table project file -> stages that rerun, for this task"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
) -> None:
    """Check that each stage's dvc.yaml params and code deps are exactly what its code reads and runs (the
    keys it, its task and its method declare; its import closure and the plug-ins it loads). Exit code 1
    if not; --write makes dvc.yaml say so."""
    dvcspec = later("pipeline.dvcspec")
    if table:
        typer.echo("| project file | stages that rerun when it changes |\n|---|---|")
        for f, stages in dvcspec.file_stages(root, table).items():
            typer.echo(f"| `{f}` | {', '.join(stages)} |")
        return
    if write:
        mended = dvcspec.write(root)
        typer.echo(f"dvc.yaml: {len(mended)} line(s) mended" + "".join(f"\n  {m}" for m in mended))
        return
    lines = dvcspec.differences(root)
    for line in lines:
        typer.echo(line)
    if lines:
        typer.echo("run `peftflow contract --write` to make dvc.yaml say what the code does")
        raise typer.Exit(1)
    typer.echo("every stage's dvc.yaml params and code deps are what its code reads and runs")
