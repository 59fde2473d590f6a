"""`peftflow flow`, `schedule`, `import-data` and `sweep`: running the pipeline (as a Prefect flow, on a
schedule, as a grid of DVC experiments) and bringing a pinned hub data file in."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import later, one_line_errors
from pipeline.core.stage import PipelineError
from pipeline.importing import import_data as run_import
from pipeline.sweep import sweep as run_sweep


def run_flow(
    set_: list[str] = typer.Option([], "--set-param", "-S", help="params override key=value, as `dvc exp run -S`"),
    experiment: str = typer.Option(None, help="save the run as a DVC experiment with this name"),
    pull: bool = typer.Option(False, help="`dvc pull` before the run (retried)"),
    push: bool = typer.Option(False, help="`dvc push` after the run (retried)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
    fleet: bool = typer.Option(False, help="run fleet/dvc.yaml instead: every adapter of the fleet (docs/fleet.md)"),
    concurrency: int = typer.Option(None, help="--fleet: adapters at once (default: fleet/params.yaml's; with "
                                    "--workers, all: the pool's workers take one each)"),
    workers: str = typer.Option(None, help="--fleet: hand each adapter to this deployment's workers instead "
                                "(`peftflow-fleet-adapter/fleet`, docs/scaling.md); runs the commit at HEAD"),
) -> None:
    """Run the pipeline's DVC stages as a Prefect flow: each stage a task, run or skipped by DVC."""
    if fleet:
        if set_ or experiment or (workers and (pull or push)):
            typer.echo("error: --fleet takes --concurrency, --pull, --push, --workers and --root (edit "
                       "fleet/params.yaml for params; workers pull and push themselves)", err=True)
            raise typer.Exit(2)
        if workers:
            chains = later("pipeline.workers").fleet_workers(root=str(root.resolve()), deployment=workers,
                                                             concurrency=concurrency)
        else:
            chains = later("pipeline.flow").fleet(root=str(root.resolve()), concurrency=concurrency, pull=pull,
                                                  push=push)
        for name, chain in chains.items():
            typer.echo(f"{name}: " + " ".join(f"{k.split(':')[-1].split('@')[0]}:{v}" for k, v in chain.items()))
        return
    states = later("pipeline.flow").pipeline(root=str(root.resolve()), overrides=set_, experiment=experiment,
                                             pull=pull, push=push)
    typer.echo(" ".join(f"{k}:{v}" for k, v in states.items()))


def schedule(
    name: str = typer.Option("nightly", help="deployment name"),
    cron: str = typer.Option(None, help='cron schedule, e.g. "0 2 * * *" (02:00 every night)'),
    interval: float = typer.Option(None, help="or: seconds between runs"),
    set_: list[str] = typer.Option([], "--set-param", "-S", help="params override key=value for every run"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
    fleet: bool = typer.Option(False, help="the fleet's flow (fleet/dvc.yaml) instead"),
) -> None:
    """Serve the flow as a deployment on the Prefect server in PREFECT_API_URL, with a schedule;
    runs until stopped. A run with unchanged data and params does nothing and says so."""
    if (cron is None) == (interval is None):
        typer.echo("error: give exactly one of --cron or --interval", err=True)
        raise typer.Exit(2)
    if fleet:
        later("pipeline.flow").fleet.serve(name=name, cron=cron, interval=interval,
                                           parameters={"root": str(root.resolve())},
                                           description="peftflow: every adapter of fleet/dvc.yaml as Prefect tasks")
        return
    later("pipeline.flow").pipeline.serve(name=name, cron=cron, interval=interval,
                   parameters={"root": str(root.resolve()), "overrides": list(set_)},
                   description="peftflow: the DVC stages of dvc.yaml as Prefect tasks")


@one_line_errors
def import_data(
    dataset: str = typer.Argument(..., help="dataset id on the Hugging Face hub, e.g. owner/name"),
    file: str = typer.Argument(..., help="the file in the dataset repository, e.g. data/train.jsonl"),
    revision: str = typer.Option(..., help="the commit (40 hex digits); branches and tags move, so they are refused"),
    out: Path = typer.Option(..., help="where the file goes in this project, e.g. data/hub/train.jsonl"),
    cache_dir: Path = typer.Option(None, help="a folder in the hub's cache layout (offline); default: HF_HUB_CACHE"),
) -> None:
    """Copy a pinned file of a hub dataset into the project and track it with DVC (source in OUT.dvc)."""
    meta = run_import(dataset, revision, file, out, cache_dir)
    typer.echo(f"import-data: {meta['source']} -> {out} (sha256 {meta['sha256'][:12]}); commit {out}.dvc, then "
               f"`dvc exp run -S data.train={out}` (or data.validation)")


@one_line_errors
def sweep(
    sets: list[str] = typer.Option(..., "--set", "-S", help="KEY=V1,V2,... (one axis of the grid) or KEY=VALUE; "
                                   "repeat for more axes; the same syntax as `dvc exp run -S`"),
    name: str = typer.Option(..., "--name", "-n", help="the experiments are named NAME-1, NAME-2, ..."),
    seeds: str = typer.Option("42,43,44", help="comma-separated seeds: every point runs once per seed"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="experiments at a time (1 keeps train times comparable)"),
    target: str = typer.Option("evaluate", help="the stage to reproduce up to"),
    wait: bool = typer.Option(True, help="wait for the queue, showing progress (--no-wait: run in the background)"),
    root: Path = typer.Option(Path("."), help="the DVC project folder"),
) -> None:
    """Queue a grid of params values times seeds as DVC experiments and run them (`dvc queue start -j N`)."""
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise PipelineError(f"--seeds {seeds!r}: expected integers separated by commas") from None
    done = run_sweep(root, name, sets, seed_list, jobs, target, wait, echo=typer.echo)
    if wait:
        typer.echo(f"sweep: {len(done)} experiments done; `peftflow compare --name {name}` compares them")
