"""Prefect flow: the DVC pipeline's stages as Prefect tasks, in the order of the DAG in dvc.yaml.

The stage list and order come from DVC (`dvc.yaml` read through DVC's own index), never written a
second time. DVC stays the source of truth for what is up to date: each task asks DVC for its
stage's status; an unchanged stage is skipped and says so, a changed one runs as
`dvc repro --single-item <stage>`, which updates dvc.lock exactly as `dvc repro` would, with its
output streamed into the Prefect run's logs. A failed stage fails the flow with the stage's own
error line, and nothing after it runs. Retries are only on I/O: `dvc pull` / `dvc push`.

Flow parameters: `overrides` (`key=value`, applied to params.yaml the way `dvc exp run -S` does,
then checked by the strict params parser), `experiment` (save the result as a DVC experiment of
that name), `pull` / `push` (a DVC remote before and after).

The fleet (`fleet`, docs/fleet.md) runs fleet/dvc.yaml: the shared stages first (dvc.yaml's `base`, the
`fleet` stage), then each adapter's chain as one Prefect task, at most `concurrency` adapters at a time
(fleet/params.yaml's `concurrency` unless given). DVC's `repro` holds the project's lock for its whole run,
so two cannot run at once: an adapter's stage runs the command DVC resolved for it, then `dvc commit`s it
(what `dvc repro` records: the deps', params' and outputs' hashes in fleet/dvc.lock), the DVC calls of
all adapters one at a time. A failing adapter stops its own chain only; the run fails at the end, naming
every failed adapter and its stage's error line.

Inputs: a DVC project folder (`root`). Outputs: the stages' outputs and dvc.lock; a Prefect
markdown artifact with each stage's state and the metrics with deltas against the previous flow
run (kept in `.dvc/tmp/peftflow-flow-metrics.json`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed

from pipeline import contract, methods, tasks
from pipeline.audit import dvc_repo
from pipeline.core.allocator import beside_env
from pipeline.core.io import atomic_write_json
from pipeline.core.layout import FLEET_DVC_YAML, FLEET_PARAMS, lock_name, split_stage
from pipeline.core.stage import PipelineError, tool_env
from pipeline.stages import fleet as fleet_stage

LAST_METRICS = Path(".dvc") / "tmp" / "peftflow-flow-metrics.json"
DVC_CALLS = threading.Lock()  # the fleet's adapters run at once; their DVC calls (status, commit) one at a time


class StageFailed(PipelineError, RuntimeError):
    """A pipeline stage exited with an error; the message is the stage's own error line."""


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def stage_order(root: Path) -> list[str]:
    """The pipeline's stages, dependencies first, as DVC reads them from dvc.yaml (not fleet/dvc.yaml's: DVC's
    index holds every pipeline file of the project, and names theirs `fleet/dvc.yaml:<stage>`)."""
    import networkx as nx
    from dvc.stage import PipelineStage

    with dvc_repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return [s.name for s in reversed(list(nx.topological_sort(graph)))
                if isinstance(s, PipelineStage) and s.addressing == s.name]


def changed(root: Path, stage: str) -> dict:
    """DVC's status of one stage (empty when it is up to date)."""
    with dvc_repo(root) as repo:
        return repo.status(targets=[stage])


def apply_overrides(root: Path, overrides: list[str]) -> None:
    """Apply `key=value` overrides to params.yaml exactly as `dvc exp run -S` does; an override
    that makes the params invalid (a typo, a wrong type) is refused and params.yaml is kept."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    path = root / "params.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "params.yaml"
        shutil.copy(path, trial)
        dvc_apply(str(trial), list(overrides))
        p = contract.load(trial)  # raises ParamsError naming the key: as every stage checks it,
        methods.check(p.train, tasks.get(p.task).dpo)  # and as the train stage checks its method
        shutil.copy(trial, path.with_suffix(".yaml.tmp"))
        path.with_suffix(".yaml.tmp").replace(path)


def read_metrics(root: Path) -> dict[str, float]:
    """Every numeric metric DVC knows of, flattened to `file:key.key`."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if not prefix.endswith(":") else f"{prefix}{k}", v)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[prefix] = value

    with dvc_repo(root) as repo:
        for rev in repo.metrics.show().values():
            for file, content in rev.get("data", {}).items():
                walk(f"{file}:", content.get("data", {}))
    return flat


def metrics_markdown(states: dict[str, str], now: dict[str, float], before: dict[str, float]) -> str:
    ran = [s for s, v in states.items() if v == "ran"]
    head = (f"**{len(ran)} of {len(states)} stages ran** ({', '.join(ran)})" if ran
            else f"**Nothing to do**: all {len(states)} stages were up to date.")
    lines = [head, "", "| stage | state |", "|---|---|", *[f"| {s} | {v} |" for s, v in states.items()], "",
             "| metric | value | previous run | delta |", "|---|---:|---:|---:|"]
    for key in sorted(now):
        old = before.get(key)
        delta = "" if old is None else f"{now[key] - old:+.4g}"
        lines.append(f"| {key} | {now[key]:.4g} | {'' if old is None else f'{old:.4g}'} | {delta} |")
    return "\n".join(lines) + "\n"


@task(task_run_name="{stage}")
def run_stage(root: Path, stage: str) -> str:
    """Run one stage if DVC says it changed; returns "ran" or "skipped"."""
    log = get_run_logger()
    why = changed(root, stage)
    if not why:
        log.info(f"{stage}: unchanged, skipped (DVC status is clean)")
        return "skipped"
    log.info(f"{stage}: changed ({json.dumps(why.get(stage, why), default=str)}), running")
    proc = subprocess.Popen(dvc("repro", "--single-item", stage), cwd=root, env=tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    errors = []
    for line in proc.stdout:  # stream the stage's output into the run's logs as it comes
        line = line.rstrip()
        if line:
            log.info(line)
        if line.startswith(("error:", "ERROR:")):
            errors.append(line)
    if proc.wait():
        own = [e for e in errors if e.startswith("error:")]
        raise StageFailed(f"stage {stage} failed: {(own or errors or ['exit code ' + str(proc.returncode)])[0]}")
    return "ran"


@task(retries=3, retry_delay_seconds=[5, 30, 120])
def transfer(root: Path, direction: str, targets: tuple[str, ...] = ()) -> None:
    """`dvc pull` / `dvc push` against the default remote (network I/O: retried); `targets`: a pipeline file's
    stages and those they read (the fleet's: fleet/dvc.yaml with dvc.yaml's `base`), else every stage."""
    args = ["pull", "--allow-missing"] if direction == "pull" else ["push"]
    if targets:
        args += ["--with-deps", *targets]
    proc = subprocess.run(dvc(*args), cwd=root, env=tool_env(), capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"dvc {direction} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")


@task
def save_experiment(root: Path, name: str) -> str:
    proc = subprocess.run(dvc("exp", "save", "--force", "--name", name), cwd=root, env=tool_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise StageFailed(f"dvc exp save failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


@flow(name="peftflow", log_prints=True)
def pipeline(root: str = ".", overrides: list[str] | None = None, experiment: str | None = None,
             pull: bool = False, push: bool = False) -> dict[str, str]:
    """Run the pipeline's DVC stages in DAG order; returns each stage's state (ran / skipped)."""
    where = Path(root).resolve()
    if overrides:
        apply_overrides(where, overrides)
    if pull:
        transfer(where, "pull")
    states = {}
    for stage in stage_order(where):
        states[stage] = run_stage(where, stage)
    if "ran" not in states.values():
        get_run_logger().info(f"nothing to do: all {len(states)} stages are up to date")
    if experiment:
        save_experiment(where, experiment)
    if push:
        transfer(where, "push")
    previous = where / LAST_METRICS
    before = json.loads(previous.read_text()) if previous.exists() else {}
    now = read_metrics(where)
    create_markdown_artifact(metrics_markdown(states, now, before), key="peftflow-metrics",
                             description="stage states and metrics, with deltas against the previous flow run")
    previous.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(previous, now)
    return states


# ---- the fleet ------------------------------------------------------------------------------------------

def fleet_order(root: Path) -> tuple[list[str], dict[str, list[str]]]:
    """fleet/dvc.yaml's stages, dependencies first: the shared ones (the `fleet` stage and the dvc.yaml stages
    it and the adapters read, as `base`), and adapter name -> its chain (`fleet/dvc.yaml:train@<name>`, ...)."""
    import networkx as nx
    from dvc.stage import PipelineStage

    with dvc_repo(root) as repo:
        graph = repo.index.graph
        fleet = [s for s in graph if isinstance(s, PipelineStage) and s.addressing.startswith(FLEET_DVC_YAML + ":")]
        upstream = set().union(*(nx.descendants(graph, s) for s in fleet))  # edges point to what a stage reads
        order = [s for s in reversed(list(nx.topological_sort(graph))) if isinstance(s, PipelineStage)]
        shared = [s.addressing for s in order if not split_stage(s.name)[1] and (s in upstream or s in fleet)]
        chains: dict[str, list[str]] = {}
        for s in order:
            adapter = split_stage(s.name)[1]
            if s in fleet and adapter:
                chains.setdefault(adapter, []).append(s.addressing)
        return shared, chains


def fleet_concurrency(root: Path) -> int:
    """fleet/params.yaml's `concurrency` (adapters run at once; 1 when unset), checked by the fleet stage's rules."""
    return fleet_stage.read_fleet(root / FLEET_PARAMS)[1]


def stage_env(at_once: int) -> dict[str, str]:
    """The environment of a fleet stage's command: with other adapters' stages beside it, its threads sleep
    when they wait (allocator.beside_env: what the train stage chooses for itself on a busy machine)."""
    env = tool_env()
    return {**env, **beside_env(at_once, env)}


def run_committed(root: Path, stage: str, at_once: int = 1) -> str:
    """Run one fleet stage if DVC says it changed: its command as DVC resolved it, then `dvc commit` (see the
    module docstring); "ran" or "skipped"."""
    log = get_run_logger()
    with DVC_CALLS, dvc_repo(root) as repo:
        why = repo.status(targets=[stage])
        (s,) = repo.stage.collect(stage)
        cmd, wdir = s.cmd, Path(s.wdir)
    if not why:
        log.info(f"{stage}: unchanged, skipped (DVC status is clean)")
        return "skipped"
    log.info(f"{stage}: changed, running: {cmd}")
    proc = subprocess.Popen(cmd, shell=True, cwd=wdir, env=stage_env(at_once), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    errors = []
    for line in proc.stdout:  # into the adapter's task log as it comes
        line = line.rstrip()
        if line:
            log.info(line)
        if line.startswith("error:"):
            errors.append(line)
    if proc.wait():
        raise StageFailed(f"stage {stage} failed: {(errors or ['exit code ' + str(proc.returncode)])[0]}")
    with DVC_CALLS, dvc_repo(root) as repo:
        repo.commit(stage, force=True)
    return "ran"


@task(task_run_name="{adapter}")
def run_adapter(root: Path, adapter: str, stages: list[str], at_once: int = 1) -> dict[str, str]:
    """One adapter's chain, in order; its first failing stage stops it (and only it). `at_once`: the adapters
    the flow runs at a time."""
    return {stage: run_committed(root, stage, at_once) for stage in stages}


def fleet_markdown(states: dict[str, dict[str, str]], failed: dict[str, str]) -> str:
    ran = sum(v == "ran" for chain in states.values() for v in chain.values())
    lines = [f"**{len(states)} adapters, {ran} stages ran, {len(failed)} failed**", "",
             "| adapter | state | stages that ran |", "|---|---|---|"]
    for name, chain in states.items():
        what = f"failed: {failed[name]}" if name in failed else "ok"
        lines.append(f"| {name} | {what} | {', '.join(lock_name(s) for s, v in chain.items() if v == 'ran')} |")
    return "\n".join(lines) + "\n"


@flow(name="peftflow-fleet", log_prints=True)
def fleet(root: str = ".", concurrency: int | None = None, pull: bool = False,
          push: bool = False) -> dict[str, dict[str, str]]:
    """Run fleet/dvc.yaml: the shared stages, then every adapter's chain, `concurrency` at a time; returns
    adapter -> its stages' states. `pull` / `push`: the DVC remote before and after (what the adapters that
    succeeded made is pushed). Fails at the end if an adapter failed, naming each."""
    where = Path(root).resolve()
    if pull:
        transfer(where, "pull", (FLEET_DVC_YAML,))
    shared, chains = fleet_order(where)
    for stage in shared:
        run_stage(where, stage)
    limit = max(1, concurrency or fleet_concurrency(where))
    waiting, running, states, failed = list(chains), {}, {}, {}
    while waiting or running:
        while waiting and len(running) < limit:
            name = waiting.pop(0)
            running[run_adapter.submit(where, name, chains[name], min(limit, len(chains)))] = name
        done = next(as_completed(list(running)))
        name = running.pop(done)
        try:
            states[name] = done.result()
        except Exception as e:  # an adapter's failure stops its own chain only
            failed[name], states[name] = str(e), {}
            get_run_logger().error(f"adapter {name}: {e}")
    states = {name: states[name] for name in chains}
    if push:
        transfer(where, "push", (FLEET_DVC_YAML,))
    create_markdown_artifact(fleet_markdown(states, failed), key="peftflow-fleet",
                             description="each adapter of the fleet: its state and the stages that ran")
    if failed:
        raise StageFailed(f"{len(failed)} of {len(chains)} adapters failed: "
                          + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    if not any(v == "ran" for chain in states.values() for v in chain.values()):
        get_run_logger().info(f"nothing to do: all {len(chains)} adapters are up to date")
    return states
