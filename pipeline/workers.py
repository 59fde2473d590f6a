"""The fleet on Prefect workers: each adapter's chain of stages run in another clone, on another machine.

Two flows, one deployment (docs/prefect.yaml's `fleet`, on a process work pool; docs/scaling.md):

- `fleet_adapter` runs where a worker starts it, in that worker's own clone of the repository (the worker's
  `$PEFTFLOW_CLONE`). It sets the clone's tracked files to the commit it is given (fetching it from `origin`
  when needed; what an earlier run there changed was handed back already), `dvc pull`s what the adapter's
  stages read and what the remote holds of their outputs, runs the stages DVC finds changed
  (`flow.run_committed`: the command, then `dvc commit`), `dvc push`es their outputs and returns what the
  stages recorded: their lock entries, and their git-tracked outputs (metrics, plots, samples: `cache:
  false`, never on a DVC remote).
- `fleet_workers` runs in the clone you work in. From a clean commit that `origin` has, it hands every
  adapter of fleet/params.yaml to the deployment (the pool's workers take one adapter each, as many at
  once as there are workers; `concurrency` caps the runs in flight) and writes what each returns into
  this clone, the lock entries with DVC's own YAML writer: fleet/dvc.lock then records every adapter as
  `dvc repro fleet/dvc.yaml` would have here. Commit it; any clone then `dvc pull`s the lot.

What a worker returns travels as a Prefect result, so the workers persist results where every machine
reads them: `PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK` names a block (a remote-file-system block on the
DVC remote's bucket, say). The shared stages (`base`, `fleet`) run in a worker whose commit leaves them
stale (every worker makes the same bytes; pushing an object the remote has is a no-op) and come back the
same way. A failing adapter fails its own flow run only; the run fails at the end naming each.

Inputs: a DVC project folder, a git clone whose `origin` the workers fetch from, with a default DVC
remote. Outputs: fleet/dvc.lock, dvc.lock and the adapters' git-tracked outputs in that folder.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment

from pipeline.audit import dvc_repo, lock_stages
from pipeline.core.io import atomic_write_text
from pipeline.core.layout import lock_name
from pipeline.core.stage import PipelineError
from pipeline.flow import DVC_CALLS, StageFailed, fleet_order, fleet_report, run_adapters, run_committed, transfer

DEPLOYMENT = "peftflow-fleet-adapter/fleet"  # the flow's name / docs/prefect.yaml's deployment
CLONE = "PEFTFLOW_CLONE"  # a worker's own clone of the repository (its environment's)


def git(root: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if r.returncode:
        raise PipelineError(f"git {' '.join(args)} in {root}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout.strip()


def lock_of(address: str) -> str:
    """The lock file beside the pipeline file of a stage address: `fleet/dvc.yaml:fleet` -> fleet/dvc.lock, `base`
    -> dvc.lock."""
    pipeline_file = address.rpartition(":")[0]
    return str(Path(pipeline_file).with_name("dvc.lock")) if pipeline_file else "dvc.lock"


def to_commit(root: Path, rev: str) -> None:
    """The worker's clone at `rev`, its tracked files as committed (an earlier run's lock and metrics there were
    handed back already); `git fetch origin` first when the clone lacks the commit."""
    if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=root, capture_output=True).returncode:
        git(root, "fetch", "-q", "origin")
        if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=root, capture_output=True).returncode:
            raise PipelineError(f"worker clone {root}: commit {rev[:12]} is not in origin: `git push` it, then run "
                                "the fleet again")
    git(root, "checkout", "-q", "--force", "--detach", rev)


def handback(root: Path, stages: list[str]) -> dict:
    """What these stages recorded in this clone: their lock entries (by address) and the text of their git-tracked
    outputs (by path from the root)."""
    lock, files = lock_stages(root), {}
    with dvc_repo(root) as repo:
        for address in stages:
            (stage,) = repo.stage.collect(address)
            for out in (o for o in stage.outs if not o.use_cache):
                path = Path(out.fs_path)
                for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                    if f.is_file():
                        files[str(f.relative_to(root))] = f.read_text(encoding="utf-8")
    return {"entries": {address: lock[lock_name(address)] for address in stages}, "files": files}


def clone_of_worker(root: str | None) -> Path:
    """The worker's clone: `root`, else the worker's PEFTFLOW_CLONE (a process worker starts runs in a folder of
    its own)."""
    if not (root or os.environ.get(CLONE)):
        raise PipelineError(f"{CLONE} is not set for this worker: start it as `{CLONE}=/path/to/its/clone prefect "
                            "worker start --pool fleet` (docs/scaling.md)")
    return Path(root or os.environ[CLONE]).resolve()


@flow(name="peftflow-fleet-adapter", persist_result=True, log_prints=True)
def fleet_adapter(adapter: str, rev: str, root: str | None = None) -> dict:
    """In a worker's clone: one adapter's chain (and the shared stages it reads) at commit `rev`, its inputs pulled
    and its outputs pushed; returns {"states": stage -> ran/skipped, "entries": ..., "files": ...}."""
    where = clone_of_worker(root)
    to_commit(where, rev)
    shared, chains = fleet_order(where)
    if adapter not in chains:
        raise PipelineError(f"fleet/params.yaml at {rev[:12]} has no adapter {adapter!r} (it has: {', '.join(chains)})")
    stages = shared + chains[adapter]
    transfer(where, "pull", (stages[-1],))
    states = {stage: run_committed(where, stage) for stage in stages}
    transfer(where, "push", tuple(stages))
    return {"states": states, **handback(where, stages)}


def adopt(root: Path, result: dict) -> None:
    """A worker's hand-back written into this clone: the git-tracked outputs, then the lock entries, each lock file
    updated as DVC updates it (its YAML writer; entries replaced or appended by stage name)."""
    from dvc.utils.serialize import modify_yaml

    for path, text in result["files"].items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / path, text)
    by_lock: dict[str, dict] = {}
    for address, entry in result["entries"].items():
        by_lock.setdefault(lock_of(address), {})[lock_name(address)] = entry
    for lock, entries in by_lock.items():
        with modify_yaml(root / lock) as data:
            if not data:
                data["schema"] = "2.0"
            data.setdefault("stages", {}).update(entries)


@task(task_run_name="{adapter}")
def dispatch(root: Path, adapter: str, rev: str, deployment: str) -> dict[str, str]:
    """One adapter run by a worker of the deployment's pool; what it recorded is adopted here. Its stages' states."""
    get_run_logger().info(f"{adapter}: handed to {deployment}, waiting for a worker")
    run = run_deployment(deployment, parameters={"adapter": adapter, "rev": rev}, timeout=None, poll_interval=2)
    if not run.state.is_completed():
        raise StageFailed(f"on a worker: {run.state.message or run.state.name}")
    try:
        result = run.state.result()
    except Exception as e:  # noqa: BLE001 - the storage is the likely cause: say so
        raise PipelineError(f"the worker's result for {adapter} cannot be read here ({e}): the workers must keep "
                            "results where every machine reads them (PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, "
                            "docs/scaling.md)") from e
    with DVC_CALLS:
        adopt(root, result)
    return result["states"]


def committed(root: Path) -> str:
    """HEAD, refusing a work tree whose tracked files differ from it: the workers run commits."""
    if git(root, "status", "--porcelain", "--untracked-files=no"):
        raise PipelineError(f"{root} has uncommitted changes: the workers run a commit, so commit (and `git push`) "
                            "them first")
    return git(root, "rev-parse", "HEAD")


@flow(name="peftflow-fleet-workers", log_prints=True)
def fleet_workers(root: str = ".", deployment: str = DEPLOYMENT,
                  concurrency: int | None = None) -> dict[str, dict[str, str]]:
    """Every adapter of the fleet handed to the workers of `deployment`'s pool, at most `concurrency` in flight (all,
    unset); returns adapter -> its stages' states, and leaves their records in this clone."""
    where = Path(root).resolve()
    rev = committed(where)
    _, chains = fleet_order(where)
    states, failed = run_adapters(list(chains), lambda name: dispatch.submit(where, name, rev, deployment),
                                  max(1, concurrency or len(chains)))
    fleet_report(states, failed)
    return states
