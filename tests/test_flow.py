"""The Prefect flow: stage order from dvc.yaml, and a real local Prefect server running the flow as a
scheduled deployment on the tiny pipeline (a run that skips everything, one that reruns what new data
changed, an experiment, failures) and from a work pool."""

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, STAGES, api, copy_repo, run_info, sh, wait_for

from pipeline import flow, workers
from pipeline.core.params import ParamsError
from pipeline.verify import verify


def test_stage_order_is_dvc_yaml_dag():
    order = flow.stage_order(ROOT)
    assert sorted(order) == sorted(STAGES)
    # every stage comes after the stages whose outputs it reads
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = {name: [str(o) for o in s.get("outs", [])] for name, s in spec.items()}
    for name, s in spec.items():
        for dep in s.get("deps", []):
            for other, produced in outs.items():
                if dep in produced:
                    assert order.index(other) < order.index(name), (other, name)


def test_work_pool_example_names_the_flow_and_its_parameters():
    """docs/prefect.yaml (the work-pool examples of docs/scaling.md) deploys these flows, as they are."""
    import inspect

    from prefect.client.schemas.schedules import CronSchedule
    from prefect.utilities.importtools import import_object

    doc = yaml.safe_load((ROOT / "docs" / "prefect.yaml").read_text())
    assert [d["entrypoint"] for d in doc["deployments"]] == ["pipeline/flow.py:pipeline",
                                                            "pipeline.workers:fleet_adapter"]
    for d, fn in zip(doc["deployments"], (flow.pipeline, workers.fleet_adapter), strict=True):
        found = import_object(d["entrypoint"] if ".py:" not in d["entrypoint"] else str(ROOT / d["entrypoint"]))
        assert found.name == fn.name and found.fn.__qualname__ == fn.fn.__qualname__  # a file path loads a copy
        assert set(d.get("parameters", {})) <= set(inspect.signature(fn.fn).parameters)
        assert d["work_pool"]["name"]
        for sched in d.get("schedules", []):
            CronSchedule(cron=sched["cron"], timezone=sched.get("timezone"))  # raises on a bad schedule


def test_metrics_markdown_deltas():
    md = flow.metrics_markdown({"train": "ran", "evaluate": "skipped"}, {"m:acc": 0.9, "m:new": 1.0}, {"m:acc": 0.8})
    assert "**1 of 2 stages ran** (train)" in md
    assert "| m:acc | 0.9 | 0.8 | +0.1 |" in md and "| m:new | 1 |  |  |" in md
    assert "**Nothing to do**" in flow.metrics_markdown({"a": "skipped"}, {}, {})


def test_scheduled_deployment_skips_what_is_done_and_runs_what_changed(server, history, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    repo = copy_repo(history["root"], tmp_path / "repo")  # every stage reproduced and committed
    serve = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "schedule", "--name", "test", "--interval", "3600",
                              "--root", str(repo)], cwd=ROOT, env=server["env"],
                             stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        with api(server["env"]):
            async def deployment():
                async with get_client() as client:
                    return await client.read_deployment_by_name("peftflow/test")

            dep = wait_for(lambda: asyncio.run(deployment()), "the deployment", 120)
            assert dep.schedules and dep.schedules[0].schedule.interval.total_seconds() == 3600
            assert dep.parameters["root"] == str(repo)

            info = asyncio.run(run_info(run_deployment("peftflow/test", timeout=300).id))
            assert info["state"] == "COMPLETED", (info, (tmp_path / "serve.log").read_text()[-3000:])
            assert sorted(info["tasks"]) == sorted(STAGES) and set(info["tasks"].values()) == {"COMPLETED"}
            assert "**Nothing to do**" in info["artifact"]
            assert all(f"| {s} | skipped |" in info["artifact"] for s in STAGES)

            # new data lands: the next run retrains (validate and everything after it)
            data = repo / "data" / "example" / "sentiment_train.jsonl"
            data.write_text(data.read_text() + '{"sentence": "Profit doubled in the third quarter .", '
                                               '"label": "positive"}\n')
            info = asyncio.run(run_info(run_deployment("peftflow/test", timeout=900).id))
            assert info["state"] == "COMPLETED", (info, (tmp_path / "serve.log").read_text()[-3000:])
            assert f"**{len(STAGES) - 1} of {len(STAGES)} stages ran**" in info["artifact"]
            assert "| base | skipped |" in info["artifact"] and "| train | ran |" in info["artifact"]
            assert "| reports/evaluate/metrics.json:adapter.accuracy |" in info["artifact"]
            assert sh_status(repo) == "Data and pipelines are up to date."

            info = asyncio.run(run_info(run_deployment("peftflow/test", timeout=300).id))
            assert info["state"] == "COMPLETED" and "**Nothing to do**" in info["artifact"]
            # the deltas column compares with the run before: nothing changed
            assert re.search(r"\| reports/train/metrics.json:steps \| (\d+) \| \1 \| \+0 \|", info["artifact"])

            # a params override run as a DVC experiment: only the stage that reads it reruns, and the experiment
            # is saved
            states = flow.pipeline(root=str(repo), overrides=["gguf.max_new_tokens=8"], experiment="gguf-8")
            assert [s for s, v in states.items() if v == "ran"] == ["gguf"]
            assert "gguf-8" in sh_dvc(repo, "exp", "list")
    finally:
        serve.terminate()
        serve.wait(30)


def test_work_pool_worker_runs_the_deployment_of_docs_prefect_yaml(server, history, tmp_path):
    """The work-pool example, deployed with `prefect deploy` as documented (paths pointed at the
    test repository, no schedule), run by a process worker: the flow runs in the worker, which
    reruns the one stage whose params changed."""
    from prefect.deployments import run_deployment

    repo = copy_repo(history["root"], tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gguf"]["rows"] = 3  # read by the last stage only
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    doc = yaml.safe_load((ROOT / "docs" / "prefect.yaml").read_text())
    dep = doc["deployments"][0]
    dep["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] = str(repo)
    dep["parameters"] |= {"root": str(repo), "pull": False, "push": False}  # no DVC remote in this test
    dep["work_pool"]["name"] = "test-pool"
    dep.pop("schedules")
    doc["deployments"] = [dep]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    prefect = (sys.executable, "-m", "prefect")

    def run(*args, timeout=300):
        r = subprocess.run([*prefect, *args], cwd=repo, env=server["env"], capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    run("work-pool", "create", "test-pool", "--type", "process")
    run("--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"))
    with api(server["env"]):
        scheduled = run_deployment(f"peftflow/{dep['name']}", timeout=0)  # queued for the pool
        run("worker", "start", "--pool", "test-pool", "--run-once", timeout=900)
        info = asyncio.run(run_info(scheduled.id))
    assert info["state"] == "COMPLETED", info
    assert sorted(info["tasks"]) == sorted(STAGES) and set(info["tasks"].values()) == {"COMPLETED"}
    assert "**1 of 8 stages ran** (gguf)" in info["artifact"]
    assert sh_status(repo) == "Data and pipelines are up to date."


def test_failed_stage_fails_the_flow_with_its_error(server, repo):
    bad = repo / "data" / "example" / "bad.jsonl"
    bad.write_text('{"sentence": "Sales rose .", "label": "positive"}\n{"sentence": "Costs fell .", "label": "up"}\n')
    before = (repo / "params.yaml").read_text()
    with api(server["env"]):
        with pytest.raises(ParamsError, match="train.lrr"):
            flow.pipeline(root=str(repo), overrides=["+train.lrr=0.1"])
        assert (repo / "params.yaml").read_text() == before  # a bad override changes nothing
        state = flow.pipeline(root=str(repo), overrides=["data.train=data/example/bad.jsonl"], return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "stage validate failed: error:" in message and "bad.jsonl" in message
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"base"}  # nothing after the failed stage ran
    # the rejected rows are kept for inspection, nothing else was written
    assert [f.name for f in (repo / "data" / "validated").iterdir()] == ["quarantine.jsonl"]
    assert "bad.jsonl" in (repo / "data" / "validated" / "quarantine.jsonl").read_text()


def sh_dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                          text=True).stdout.strip()


def sh_status(repo: Path) -> str:
    return sh_dvc(repo, "status")


def add_fleet(repo: Path, adapters: dict, concurrency: int = 2) -> None:
    """fleet/dvc.yaml and a fleet/params.yaml of these adapters in a tiny-model repository (conftest.make_repo)."""
    (repo / "fleet").mkdir(exist_ok=True)
    (repo / "fleet" / "dvc.yaml").write_text((ROOT / "fleet" / "dvc.yaml").read_text())
    (repo / "fleet" / "params.yaml").write_text(yaml.safe_dump({"concurrency": concurrency, "adapters": adapters}))


def sentiment(train: str) -> dict:
    return {"task": "classification", "format": {"template": "prompts/sentiment.jinja"}, "train": {"method": "lora"},
            "data": {"train": train, "validation": "data/example/sentiment_validation.jsonl"}}


def test_fleet_runs_each_adapter_on_its_own_and_a_failing_one_stops_only_itself(server, repo):
    """Two adapters at once: b's bad data fails b's validate (named in the failed run), a's chain runs to its GGUF
    and is recorded, its lineage found by its name; b taken out of the fleet, the next run runs nothing (a
    scheduled run with nothing changed) and pushes to a DVC remote (a folder); a fresh clone's run pulls a's
    outputs and runs nothing, and a's lineage checks there."""
    good = "data/example/sentiment_train.jsonl"
    bad = repo / "data" / "example" / "bad.jsonl"
    bad.write_text('{"sentence": "Sales rose .", "label": "positive"}\n{"sentence": "Costs fell .", "label": "up"}\n')
    b = {**sentiment("data/example/bad.jsonl"), "train": {"method": "lora", "lr": 0.01}}
    add_fleet(repo, {"a": sentiment(good), "b": b})
    with api(server["env"]):
        state = flow.fleet(root=str(repo), return_state=True)
        assert state.is_failed()
        message = str(state.result(raise_on_failure=False))
        assert message.startswith("1 of 2 adapters failed: b: stage fleet/dvc.yaml:validate@b failed: error:")
        lock = yaml.safe_load((repo / "fleet" / "dvc.lock").read_text())["stages"]
        assert {s for s in lock if s.endswith("@a")} == {f"{s}@a" for s in STAGES if s != "base"}
        assert not any(s.endswith("@b") for s in lock)
        status = sh_dvc(repo, "status", "fleet/dvc.yaml")
        assert "@b" in status and "@a" not in status  # what a's chain wrote is what fleet/dvc.lock records
        untracked = sh(repo, "git", "status", "--porcelain", "--untracked-files=all")
        assert "fleet/a/models/.gitignore" in untracked  # the outputs are gitignored as `dvc repro` does
        assert "fleet/a/models/adapter/" not in untracked and "fleet/a/data/tokenized/" not in untracked
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "fleet")
        out = sh(repo, sys.executable, "-m", "pipeline.cli", "lineage", "a")  # an adapter by its name
        assert "made by stage train@a" in out and "recorded in fleet/dvc.lock; made in commit" in out
        assert "dvc repro fleet/dvc.yaml:train@a" in out and "MISMATCH" not in out
        rows = verify(repo, ["train@a"])  # a fleet stage rerun in a scratch copy: what fleet/dvc.lock records
        assert {r.path for r in rows} >= {"fleet/a/models/adapter"} and all(r.same for r in rows), rows

        add_fleet(repo, {"a": sentiment(good)}, concurrency=1)  # b taken out: a is up to date, nothing runs
        sh(repo, sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(repo.parent / "store"))
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "the fleet without b, and a DVC remote")
        chains = flow.fleet(root=str(repo), push=True)
        assert list(chains) == ["a"] and set(chains["a"].values()) == {"skipped"}
        assert sh_dvc(repo, "status", "fleet/dvc.yaml") == "Data and pipelines are up to date."

        # a fresh clone pulls the fleet through the flow: every adapter's outputs, nothing trained
        clone = repo.parent / "clone"
        sh(repo.parent, "git", "clone", "-q", str(repo), str(clone))
        chains = flow.fleet(root=str(clone), pull=True)
        assert set(chains["a"].values()) == {"skipped"}
        assert (clone / "fleet" / "a" / "models" / "adapter" / "adapter_model.safetensors").exists()
        assert (clone / "fleet" / "a" / "models" / "gguf").is_dir()
    assert sh_dvc(clone, "status", "fleet/dvc.yaml") == "Data and pipelines are up to date."
    out = sh(clone, sys.executable, "-m", "pipeline.cli", "lineage", "a")
    assert "made by stage train@a" in out and "MISMATCH" not in out


def test_fleet_stages_beside_each_other_sleep_instead_of_spinning(monkeypatch):
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(k, raising=False)
    assert "GOMP_SPINCOUNT" not in flow.stage_env(1)
    assert flow.stage_env(2)["GOMP_SPINCOUNT"] == "0"
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")  # the user's own policy wins
    assert "GOMP_SPINCOUNT" not in flow.stage_env(2) and flow.stage_env(2)["OMP_WAIT_POLICY"] == "active"
