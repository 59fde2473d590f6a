"""Integration: `dvc repro` of the real dvc.yaml in a temporary git + DVC repository, on the tiny model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_TRAIN, raw_params

STAGES = ["base", "validate", "format", "tokenize", "train", "evaluate", "export"]


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture
def repo(tmp_path, tiny_base) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, r / name)
    shutil.copytree(ROOT / "pipeline", r / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "prompts", r / "prompts")
    (r / "data" / "example").mkdir(parents=True)
    for f in (ROOT / "data" / "example").glob("sentiment_*.jsonl"):
        shutil.copy(f, r / "data" / "example" / f.name)
    params = raw_params(**{**TINY_TRAIN, "base.model": str(tiny_base), "base.gguf_file": None,
                           "train.epochs": 1, "data.train": "data/example/sentiment_train.jsonl",
                           "data.validation": "data/example/sentiment_validation.jsonl"})
    (r / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(r, "git", "init", "-q")
    sh(r, sys.executable, "-m", "dvc", "init", "-q")
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "init")
    return r


def test_dvc_repro_runs_all_then_nothing_then_only_what_changed(repo):
    out = sh(repo, sys.executable, "-m", "dvc", "repro")
    assert ran(out) == STAGES
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == TINY_TRAIN["train.lr"]
    assert (repo / "models" / "export" / "model.safetensors").exists()
    metrics = json.loads((repo / "reports" / "evaluate" / "metrics.json").read_text())
    assert "gain" in metrics and metrics["rows"] == 60

    out = sh(repo, sys.executable, "-m", "dvc", "repro")
    assert ran(out) == []
    assert "Data and pipelines are up to date" in sh(repo, sys.executable, "-m", "dvc", "status")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 1e-3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(repo, sys.executable, "-m", "dvc", "repro")
    assert ran(out) == ["train", "evaluate", "export"]


def test_bad_params_fail_with_one_line(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["validate"]["max_reject"] = 0.1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "pipeline.validate", "--train", "data/example/sentiment_train.jsonl",
                        "--validation", "data/example/sentiment_validation.jsonl", "--out", "v", "--metrics", "m.json"],
                       cwd=repo, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: params.yaml: unknown key 'validate.max_reject'. "
                                                 "Did you mean 'max_reject_ratio'? Valid keys: label_field, "
                                                 "max_chars, max_reject_ratio, min_chars, text_field.")
