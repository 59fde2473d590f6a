"""`peftflow import-data`: a hub dataset's file pinned to a commit, offline from a folder in the hub's
cache layout, tracked by DVC with its source; refused for a moving revision or when it cannot be had."""

import json

import pytest
import yaml
from conftest import EXAMPLE, make_params, sh
from typer.testing import CliRunner

from pipeline import audit
from pipeline.cli import app
from pipeline.core import lineage
from pipeline.core.io import read_records
from pipeline.core.stage import PipelineError
from pipeline.importing import import_data

SHA = "3f2a9c0d5e7b1a4c6d8e0f2a4b6c8d0e1f3a5b7c"


@pytest.fixture
def offline(monkeypatch):
    """No network: huggingface_hub answers from the cache folder only (as on this project's machines)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path):
    """A folder in the hub's cache layout holding one dataset at one commit."""
    snap = tmp_path / "hub" / "datasets--acme--chats" / "snapshots" / SHA / "data"
    snap.mkdir(parents=True)
    (snap / "train.jsonl").write_bytes((EXAMPLE / "chat_train.jsonl").read_bytes())
    (tmp_path / "hub" / "datasets--acme--chats" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--acme--chats" / "refs" / "main").write_text(SHA)
    return tmp_path / "hub"


@pytest.fixture
def project(tmp_path):
    import sys

    r = tmp_path / "project"
    r.mkdir()
    sh(r, "git", "init", "-q")
    sh(r, sys.executable, "-m", "dvc", "init", "-q")
    return r


def test_a_pinned_file_comes_from_the_hub_cache_offline_and_is_tracked(offline, hub_cache, project):
    import sys

    out = project / "data" / "hub" / "train.jsonl"
    meta = import_data("acme/chats", SHA, "data/train.jsonl", out, hub_cache, root=project)
    assert out.read_bytes() == (EXAMPLE / "chat_train.jsonl").read_bytes()
    assert meta["source"] == f"hf://datasets/acme/chats@{SHA}/data/train.jsonl"
    spec = yaml.safe_load((project / "data" / "hub" / "train.jsonl.dvc").read_text())
    assert spec["meta"] == meta and spec["outs"][0]["md5"] == lineage.md5_file(out)
    assert audit.data_source(out) == meta and audit.data_source(EXAMPLE / "chat_train.jsonl") is None
    assert "train.jsonl" in (project / "data" / "hub" / ".gitignore").read_text()  # the file is DVC's, not git's
    assert "up to date" in sh(project, sys.executable, "-m", "dvc", "status")
    assert len(read_records(out)) == 120


def test_what_cannot_be_had_or_moves_is_refused_in_one_line(offline, hub_cache, project):
    out = project / "data" / "hub" / "train.jsonl"
    with pytest.raises(PipelineError, match=rf"hf://datasets/acme/chats@{SHA}/data/test.jsonl is not in .* "
                                            r"\(offline\); on a connected machine run `huggingface-cli download"):
        import_data("acme/chats", SHA, "data/test.jsonl", out, hub_cache, root=project)
    with pytest.raises(PipelineError, match=r"revision 'main' of acme/chats is not a commit .* a branch or tag moves"):
        import_data("acme/chats", "main", "data/train.jsonl", out, hub_cache, root=project)
    assert not out.exists() and not (project / "data" / "hub").exists()

    r = CliRunner().invoke(app, ["import-data", "acme/other", "train.jsonl", "--revision", SHA, "--out", str(out),
                                 "--cache-dir", str(hub_cache)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: import-data: ")


def test_parquet_conversations_read_as_lists(tmp_path):
    """Hub datasets are mostly parquet; a `messages` column of structs must come back as Python lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import tasks

    rows = [json.loads(x) for x in (EXAMPLE / "chat_validation.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "v.parquet")
    back = read_records(tmp_path / "v.parquet")
    assert [r.data for r in back] == rows and back[0].row == 1
    assert tasks.get("chat").normalize(make_params(task="chat"), back[0].data) == rows[0]


def test_the_lineage_names_the_imported_source(offline, hub_cache, project):
    out = project / "data" / "hub" / "train.jsonl"
    meta = import_data("acme/chats", SHA, "data/train.jsonl", out, hub_cache, root=project)
    lock = {"validate": {"cmd": "x", "deps": [{"path": "data/hub/train.jsonl", "md5": lineage.md5_file(out)}],
                         "outs": [{"path": "data/validated", "md5": "0" * 32 + ".dir"}]}}
    chain = audit.upstream(lock, ["data/validated"])  # what `peftflow lineage` walks from a train stage's deps
    paths = [d["path"] for entry in chain.values() for d in entry["deps"]]
    assert audit.data_sources(project, paths) == {"data/hub/train.jsonl": meta}


def test_the_command_runs_as_a_module_too(tmp_path):
    """`python -m pipeline.cli import-data` (not only the `peftflow` entry point) knows the command."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "import-data", "acme/chats", "train.jsonl",
                        "--revision", "main", "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "revision 'main' of acme/chats is not a commit" in r.stderr
    assert not (tmp_path / "x.jsonl").exists()
