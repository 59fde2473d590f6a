"""Reproducibility as a checked property: the same commit gives the same dvc.lock in two fresh clones,
every stage's deps cover its imports, and `peftflow verify` names what differs."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, sh

from pipeline.verify import import_closure, missing_deps, verify


def test_every_stage_declares_its_whole_import_closure():
    assert missing_deps(ROOT) == {}
    # the closure follows lazy imports inside functions, not only the module's top
    assert "pipeline/lineage.py" in import_closure(ROOT, "pipeline.train")


def test_an_undeclared_project_import_fails_the_deps_check(tmp_path):
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    assert missing_deps(tmp_path) == {}
    validate = tmp_path / "pipeline" / "validate.py"
    validate.write_text(validate.read_text().replace(
        "def run(", "def _unused():\n    from pipeline import lineage  # noqa: F401\n\n\ndef run(", 1))
    missing = missing_deps(tmp_path)
    assert list(missing) == ["validate"] and "pipeline/lineage.py" in missing["validate"]
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "deps", "--root", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "stage validate: imports" in r.stdout


def outs(lock_file: Path) -> dict:
    lock = yaml.safe_load(lock_file.read_text())["stages"]
    return {o["path"]: o["md5"] for s in lock.values() for o in s["outs"]}


def test_two_fresh_clones_give_the_same_dvc_lock_and_verify_names_a_changed_byte(repo, tmp_path):
    clones = []
    for name in ("one", "two"):
        clone = tmp_path / name
        sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
        sh(clone, sys.executable, "-m", "dvc", "repro")
        clones.append(clone)
    one, two = clones
    assert (one / "dvc.lock").read_text() == (two / "dvc.lock").read_text()
    assert {"models/base", "models/adapter", "models/export", "models/gguf"} <= set(outs(one / "dvc.lock"))
    # timings are run facts, kept out of every hashed output
    assert "seconds" in (one / "reports" / "train" / "run.json").read_text()
    assert "seconds" not in (one / "reports" / "train" / "metrics.json").read_text()

    sh(one, "git", "add", "-A")
    sh(one, "git", "commit", "-qm", "pipeline run")
    rows = verify(one, ["validate", "train"], log=lambda m: None)
    assert rows and all(r.same for r in rows), [r for r in rows if not r.same]

    data = one / "data" / "example" / "sentiment_train.jsonl"
    text = data.read_text()
    i = text.index('"', text.index('"sentence"') + len('"sentence"') + 1) + 1  # first letter of the first sentence
    data.write_text(text[:i] + ("X" if text[i] != "X" else "Y") + text[i + 1:])
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", "validate", "--root", str(one)],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "validate" in r.stdout and "data/validated" in r.stdout and "differs" in r.stdout
    assert "train.jsonl" in r.stdout and "validation.jsonl" not in r.stdout
