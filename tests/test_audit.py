"""`peftflow lineage` on real history: code-only commits after an output, a commit that changed it, a copy
deployed elsewhere, a stale workspace output, a tampered file, a DVC cache that lacks what the workspace has."""

import json
import shutil
import subprocess
import sys

import torch
from conftest import copy_repo, sh
from typer.testing import CliRunner

from pipeline import audit
from pipeline.cli import app


def lineage(root, path):
    """`peftflow lineage PATH --root ROOT`: (exit code, output)."""
    r = CliRunner().invoke(app, ["lineage", str(path), "--root", str(root)], env={"COLUMNS": "250"})
    return r.exit_code, r.output


def git(root, *args):
    return sh(root, "git", *args).strip()


def test_an_installed_version_other_than_the_recorded_one_is_named(trained):
    rec = json.loads((trained["adapter"] / "peftflow.json").read_text())
    assert audit.env_mismatches(rec) == []
    rec["env"]["packages"]["torch"] = "1.0.0"
    rec["env"]["packages"]["no-such-package"] = "0.1"
    assert audit.env_mismatches(rec) == [("no-such-package", "0.1", None), ("torch", "1.0.0", torch.__version__)]


def test_code_only_commits_after_an_output_leave_its_lineage_ok(history, tmp_path):
    """The adapter of the second commit, audited after two later commits that changed code the stages run
    (the lock's code-dep hashes moved by `dvc commit`, no output): checked against the newest lock, made in
    the second commit; the DVC cache emptied changes nothing (what is not in the cache is not modified)."""
    root = copy_repo(history["root"], tmp_path / "repo")
    for n, f in enumerate(("pipeline/core/io.py", "pipeline/stages/train.py")):
        (root / f).write_text((root / f).read_text() + f"# a comment, commit {n}\n")
        sh(root, sys.executable, "-m", "dvc", "commit", "-f", "-q")
        git(root, "commit", "-qam", f"code only {n}")
    assert "up to date" in sh(root, sys.executable, "-m", "dvc", "status")
    code, out = lineage(root, root / "models" / "adapter")
    assert code == 0, out
    assert f"made in commit {history['second']}" in out and "checked against the workspace's lock" in out
    assert "MISMATCH" not in out and out.rstrip().endswith("matches")
    shutil.rmtree(root / ".dvc" / "cache")
    for target in ("models/adapter", "models/export", "models/gguf/adapter-f16.gguf"):
        code, out = lineage(root, root / target)
        assert code == 0 and "MISMATCH" not in out, out


def test_a_deployed_copy_of_an_older_output_checks_against_its_own_commit_and_a_stale_workspace_fails(
        history, tmp_path):
    """The first commit's adapter (lr 2e-2; the second commit changed it): a copy outside the project is
    that commit's, whole (exit 0); the same folder in the workspace, where the lock now records another, is
    stale (exit 1), and so is a GGUF file of that commit in the workspace's models/gguf."""
    root = copy_repo(history["root"], tmp_path / "repo")
    git(root, "checkout", "-q", history["first"], "--", "dvc.lock")
    sh(root, sys.executable, "-m", "dvc", "checkout", "-q", "-f", "train", "gguf")
    deployed = shutil.copytree(root / "models" / "adapter", tmp_path / "deployed" / "adapter")
    git(root, "checkout", "-q", "HEAD", "--", "dvc.lock")
    code, out = lineage(root, deployed)
    assert code == 0, out
    assert f"made in commit {history['first']}" in out and f"checked against commit {history['first']}" in out
    assert f"git checkout {history['first']}" in out
    code, out = lineage(root, root / "models" / "adapter")  # the workspace holds the first commit's adapter
    assert code == 1 and "stale" in out and "dvc checkout" in out, out
    code, out = lineage(root, root / "models" / "gguf" / "adapter-f16.gguf")  # and its GGUF files
    assert code == 1 and "stale" in out, out


def test_a_changed_file_inside_an_adapter_folder_is_named(history, tmp_path):
    root = copy_repo(history["root"], tmp_path / "repo")
    for folder in (root / "models" / "adapter", shutil.copytree(root / "models" / "adapter", tmp_path / "copy")):
        weights = next(folder.glob("*.safetensors"))
        weights.chmod(0o644)
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x01
        weights.write_bytes(bytes(data))
        code, out = lineage(root, folder)
        assert code == 1 and f"changed since it was recorded: {weights.name}" in out, out


def test_a_gguf_copied_alone_names_the_commit_that_made_it_and_a_changed_byte_fails(history, tmp_path):
    root = history["root"]
    copy = tmp_path / "deployed" / "my-adapter.gguf"
    copy.parent.mkdir()
    shutil.copy(root / "models" / "gguf" / "adapter-f16.gguf", copy)
    code, out = lineage(root, copy)
    assert code == 0, out
    assert f"made in commit {history['second']}" in out and "made by stage gguf" in out
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0x01  # a byte of the last tensor
    copy.write_bytes(bytes(data))
    code, out = lineage(root, copy)
    assert code == 1 and "tensor bytes changed" in out


def test_lock_history_reads_every_commit_of_both_lock_files_newest_first(tmp_path):
    def git_(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git_("init", "-q")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: a\n")
    git_("add", "-A")
    git_("commit", "-qm", "one")
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train@chat:\n    cmd: b\n")
    (tmp_path / "notes.txt").write_text("not a lock")
    git_("add", "-A")
    git_("commit", "-qm", "two")
    (tmp_path / "notes.txt").write_text("still not a lock")
    git_("commit", "-qam", "three")
    history = audit.lock_history(tmp_path)
    assert [sorted(stages) for _, stages in history] == [["train", "train@chat"], ["train"]]
    assert history[0][1]["train@chat"]["cmd"] == "b"
