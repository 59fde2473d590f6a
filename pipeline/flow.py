"""Prefect flow: the DVC pipeline's stages as Prefect tasks, in the order of the DAG in dvc.yaml.

The stage list and order come from DVC (`dvc.yaml` read through DVC's own index), never written a
second time. DVC stays the source of truth for what is up to date: each task asks DVC for its
stage's status; an unchanged stage is skipped and says so, a changed one runs the command DVC
resolved for it, its output streamed into the Prefect run's logs, and `dvc commit` then records
it in dvc.lock as `dvc repro` does (the deps', params' and outputs' hashes). One runner
(`run_committed`) serves both flows. A failed stage fails the flow with the stage's own
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
from pipeline.core.stage import PipelineError, peek, tool_env

LAST_METRICS = Path(".dvc") / "tmp" / "peftflow-flow-metrics.json"
DVC_CALLS = threading.Lock()  # the fleet's adapters run at once; their DVC calls (status, commit) one at a time


class StageFailed(PipelineError, RuntimeError):
    """A pipeline stage exited with an error; the message is the stage's own error line."""


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def dag(root: Path) -> dict[str, set[str]]:
    """Every stage of the project's pipeline files (dvc.yaml and fleet/dvc.yaml: DVC's index holds both, and
    addresses the fleet's as `fleet/dvc.yaml:<stage>`), dependencies first, each with the addresses of the stages
    upstream of it: the one graph reader of both flows, DVC's own (addresses are made inside the project: DVC
    writes them relative to the working folder)."""
    import networkx as nx
    from dvc.stage import PipelineStage

    with dvc_repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return {s.addressing: {u.addressing for u in nx.descendants(graph, s) if isinstance(u, PipelineStage)}
                for s in reversed(list(nx.topological_sort(graph))) if isinstance(s, PipelineStage)}


def stage_order(root: Path) -> list[str]:
    """dvc.yaml's stages, dependencies first."""
    return [a for a in dag(root) if ":" not in a]


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
    """One stage of the pipeline, run if DVC says it changed (run_committed); "ran" or "skipped"."""
    return run_committed(root, stage)


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
    upstream_of = dag(root)
    fleet = [a for a in upstream_of if a.startswith(FLEET_DVC_YAML + ":")]
    upstream = set().union(*(upstream_of[a] for a in fleet))
    shared = [a for a in upstream_of if not split_stage(a)[1] and (a in upstream or a in fleet)]
    chains: dict[str, list[str]] = {}
    for a in fleet:
        adapter = split_stage(a)[1]
        if adapter:
            chains.setdefault(adapter, []).append(a)
    return shared, chains


def fleet_concurrency(root: Path) -> int:
    """fleet/params.yaml's `concurrency` (adapters run at once; 1 when unset), read after the fleet stage has run
    (its rules check it: an integer >= 1)."""
    return peek(root / FLEET_PARAMS, "concurrency") or 1


def stage_env(at_once: int) -> dict[str, str]:
    """The environment of a fleet stage's command: with other adapters' stages beside it, its threads sleep
    when they wait (allocator.beside_env: what the train stage chooses for itself on a busy machine)."""
    env = tool_env()
    return {**env, **beside_env(at_once, env)}


def run_committed(root: Path, stage: str, at_once: int = 1) -> str:
    """The one stage runner of every flow: run the stage (dvc.yaml's or the fleet's, by its DVC address) if DVC
    says it changed, as the command DVC resolved for it, its output streamed into the run's logs, then
    `dvc commit` it (see the module docstring); "ran" or "skipped". `at_once`: stage programs beside it."""
    log = get_run_logger()
    with DVC_CALLS, dvc_repo(root) as repo:
        why = repo.status(targets=[stage])
        (s,) = repo.stage.collect(stage)
        cmd, wdir = s.cmd, Path(s.wdir)
    if not why:
        log.info(f"{stage}: unchanged, skipped (DVC status is clean)")
        return "skipped"
    log.info(f"{stage}: changed ({json.dumps(why.get(stage, why), default=str)}), running: {cmd}")
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


def run_adapters(names: list[str], submit, limit: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Each adapter's `submit(name)` (a Prefect future), at most `limit` in flight; an adapter's failure stops
    only its own chain. Returns adapter -> what its future gave, and adapter -> its error (in `names`' order)."""
    waiting, running, states, failed = list(names), {}, {}, {}
    while waiting or running:
        while waiting and len(running) < limit:
            name = waiting.pop(0)
            running[submit(name)] = name
        done = next(as_completed(list(running)))
        name = running.pop(done)
        try:
            states[name] = done.result()
        except Exception as e:  # noqa: BLE001 - an adapter's failure is reported with the others at the end
            failed[name], states[name] = str(e), {}
            get_run_logger().error(f"adapter {name}: {e}")
    return {name: states[name] for name in names}, failed


def fleet_report(states: dict[str, dict[str, str]], failed: dict[str, str]) -> None:
    """The run's artifact; fails the run naming every failed adapter, or says when nothing had to run."""
    create_markdown_artifact(fleet_markdown(states, failed), key="peftflow-fleet",
                             description="each adapter of the fleet: its state and the stages that ran")
    if failed:
        raise StageFailed(f"{len(failed)} of {len(states)} adapters failed: "
                          + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    if not any(v == "ran" for chain in states.values() for v in chain.values()):
        get_run_logger().info(f"nothing to do: all {len(states)} adapters are up to date")


def changed_chains(root: Path, chains: dict[str, list[str]]) -> list[str]:
    """The adapters with a stage DVC's status names now, from one status of fleet/dvc.yaml (asked per stage, DVC
    builds its index of every stage each time: a no-op run was quadratic in the fleet's size); the others are up to
    date, their stages skipped without a task."""
    with DVC_CALLS, dvc_repo(root) as repo:
        stale = set(repo.status(targets=[FLEET_DVC_YAML]))
    todo = [name for name, chain in chains.items() if stale & set(chain)]
    get_run_logger().info(f"{len(chains) - len(todo)} of {len(chains)} adapters up to date (DVC status), "
                          f"{len(todo)} to run")
    return todo


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
    todo = changed_chains(where, chains)
    states, failed = run_adapters(todo, lambda name: run_adapter.submit(where, name, chains[name],
                                                                       min(limit, len(todo))), limit)
    states = {name: states.get(name) or dict.fromkeys(chains[name], "skipped") for name in chains}
    if push:
        transfer(where, "push", (FLEET_DVC_YAML,))
    fleet_report(states, failed)
    return states
