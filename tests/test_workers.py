"""The fleet on Prefect workers: a process work pool, two workers each in its own clone with its own DVC cache,
sharing only the Prefect server and an S3 remote (moto's, on 127.0.0.1) that also keeps the Prefect results;
then a third clone pulls the lot and every adapter's lineage checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, STAGES, add_remote, api, make_repo, sh

from pipeline import workers
from pipeline.core.stage import PipelineError

ADAPTER = {"task": "classification", "format": {"template": "prompts/sentiment.jinja"},
           "data": {"train": "data/example/sentiment_train.jsonl",
                    "validation": "data/example/sentiment_validation.jsonl"}}


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def start_worker(server: dict, s3: dict, clone: Path, log: Path) -> subprocess.Popen:
    """`prefect worker start --pool fleet --limit 1` from its own clone, as on a machine of its own (its own
    PREFECT_HOME; the S3 credentials from the environment)."""
    env = {**server["env"], **s3["env"], "PEFTFLOW_CLONE": str(clone), "PREFECT_HOME": str(clone.parent / "home"),
           "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "remote-file-system/peftflow-results",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "fleet", "--limit", "1"],
                            cwd=clone, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def test_two_workers_run_the_fleet_from_their_own_clones_and_a_third_clone_pulls_it(server, s3, tiny_base, tmp_path,
                                                                                    monkeypatch):
    from prefect.filesystems import RemoteFileSystem

    for k, v in s3["env"].items():
        monkeypatch.setenv(k, v)  # this process reads the workers' results from the bucket
    repo = make_repo(tmp_path / "repo", tiny_base)
    origin = tmp_path / "origin.git"
    sh(tmp_path, "git", "clone", "-q", "--bare", str(repo), str(origin))
    sh(repo, "git", "remote", "add", "origin", str(origin))
    clones = [tmp_path / f"w{i}" / "clone" for i in (1, 2)]
    for c in clones:  # cloned before the fleet is committed: each worker fetches the commit it is given
        sh(tmp_path, "git", "clone", "-q", str(origin), str(c))

    (repo / "fleet").mkdir()
    (repo / "fleet" / "dvc.yaml").write_text((ROOT / "fleet" / "dvc.yaml").read_text())
    adapters = {"a": {**ADAPTER, "train": {"method": "lora"}}, "b": {**ADAPTER, "train": {"method": "lora", "lr": 0.01}}}
    (repo / "fleet" / "params.yaml").write_text(yaml.safe_dump({"concurrency": 1, "adapters": adapters}))
    add_remote(repo, s3, "fleet")
    s3["client"].create_bucket(Bucket="results")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "a fleet of two, an S3 remote")
    with pytest.raises(PipelineError, match="not in origin"):  # not pushed yet: the worker's clone says so
        workers.to_commit(clones[0], sh(repo, "git", "rev-parse", "HEAD").strip())
    sh(repo, "git", "push", "-q", "origin", "HEAD")

    doc = yaml.safe_load((ROOT / "docs" / "prefect.yaml").read_text())
    doc["deployments"] = [d for d in doc["deployments"] if d["name"] == "fleet"]  # as documented, but one deployment
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    prefect = (sys.executable, "-m", "prefect")
    for args in (("work-pool", "create", "fleet", "--type", "process"),
                 ("--no-prompt", "deploy", "--all", "--prefect-file", str(tmp_path / "prefect.yaml"))):
        r = subprocess.run([*prefect, *args], cwd=repo, env=server["env"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    procs = [start_worker(server, s3, c, c.parent / "worker.log") for c in clones]
    try:
        with api(server["env"]):
            RemoteFileSystem(basepath="s3://results/prefect", settings={"client_kwargs": {"endpoint_url": s3["url"]}}
                             ).save("peftflow-results", overwrite=True)
            chains = workers.fleet_workers(root=str(repo))
    finally:
        for p in procs:  # both told at once; their runs are over, so a worker slow to stop is killed after 10 s
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:  # a worker that does not stop on SIGTERM (seen once, benchmark)
                p.kill()
                p.wait(30)
    logs = "".join((c.parent / "worker.log").read_text()[-2000:] for c in clones)
    assert sorted(chains) == ["a", "b"], logs
    assert all(set(chain.values()) == {"ran"} for chain in chains.values()), (chains, logs)
    ran = [{a for a in "ab" if (c / "fleet" / a / "models" / "adapter").is_dir()} for c in clones]
    assert sorted(map(sorted, ran)) == [["a"], ["b"]], "each worker ran one adapter, in its own clone"

    # this clone now records both adapters as if they had run here; committed, any clone pulls them
    lock = yaml.safe_load((repo / "fleet" / "dvc.lock").read_text())["stages"]
    assert {s for s in lock if "@" in s} == {f"{s}@{a}" for s in STAGES if s != "base" for a in "ab"}
    assert "base" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert (repo / "fleet" / "b" / "reports" / "evaluate" / "metrics.json").is_file()
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "the fleet, run by two workers")
    sh(repo, "git", "push", "-q", "origin", "HEAD")
    third = tmp_path / "third"
    sh(tmp_path, "git", "clone", "-q", str(origin), str(third))
    add_remote(third, s3, None)
    dvc(third, "pull", "-q", "--with-deps", "fleet/dvc.yaml")
    assert dvc(third, "status", "--with-deps", "fleet/dvc.yaml").strip() == "Data and pipelines are up to date."
    for a in "ab":
        out = sh(third, sys.executable, "-m", "pipeline.cli", "lineage", a)
        assert f"made by stage train@{a}" in out and "MISMATCH" not in out


def test_each_stage_address_names_the_lock_file_beside_its_pipeline_file():
    assert workers.lock_of("base") == "dvc.lock"
    assert workers.lock_of("fleet/dvc.yaml:fleet") == workers.lock_of("fleet/dvc.yaml:train@a") == "fleet/dvc.lock"


def test_the_flow_runs_only_a_commit_and_a_worker_needs_its_clone(repo, monkeypatch):
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n")
    with pytest.raises(PipelineError, match="uncommitted changes"):
        workers.committed(repo)
    monkeypatch.delenv(workers.CLONE, raising=False)
    with pytest.raises(PipelineError, match="PEFTFLOW_CLONE is not set"):
        workers.clone_of_worker(None)


def test_a_hand_back_lands_as_dvc_writes_it(tmp_path):
    """Entries replace their stage's or are appended, in each pipeline file's lock; files are written whole."""
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "dvc.lock").write_text("schema: '2.0'\nstages:\n  fleet:\n    cmd: old\n  train@b:\n"
                                                 "    cmd: b\n")
    entry = {"cmd": "python -m pipeline.stages.train", "outs": [{"path": "fleet/a/models/adapter", "hash": "md5"}]}
    workers.adopt(tmp_path, {"entries": {"fleet/dvc.yaml:fleet": {"cmd": "new"}, "fleet/dvc.yaml:train@a": entry,
                                         "base": {"cmd": "python -m pipeline.stages.base"}},
                             "files": {"fleet/a/reports/train/metrics.json": '{"loss": 0.5}\n'}})
    lock = yaml.safe_load((tmp_path / "fleet" / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["fleet", "train@b", "train@a"] and lock["stages"]["fleet"] == {"cmd": "new"}
    assert lock["stages"]["train@a"] == entry
    assert yaml.safe_load((tmp_path / "dvc.lock").read_text()) == {
        "schema": "2.0", "stages": {"base": {"cmd": "python -m pipeline.stages.base"}}}
    assert (tmp_path / "fleet" / "a" / "reports" / "train" / "metrics.json").read_text() == '{"loss": 0.5}\n'
