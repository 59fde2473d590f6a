"""Integration: `dvc repro` of the real dvc.yaml in a temporary git + DVC repository, on the tiny model."""

import json
import subprocess
import sys

import yaml
from conftest import STAGES, TINY_TRAIN, copy_repo, sh


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_dvc_repro_runs_all_then_nothing_then_only_what_changed(history):
    repo, (first_run, second_run) = history["root"], history["runs"]
    assert ran(first_run) == STAGES
    lock = yaml.safe_load(sh(repo, "git", "show", f"{history['first']}:dvc.lock"))
    assert set(lock["stages"]) == set(STAGES)
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.lr"] == TINY_TRAIN["train.lr"]
    assert (repo / "models" / "export" / "model.safetensors").exists()
    metrics = json.loads((repo / "reports" / "evaluate" / "metrics.json").read_text())
    assert "gain" in metrics and metrics["rows"] == 60
    # train.lr changed: the stages that read it and those after them ran, nothing before
    assert ran(second_run) == ["train", "evaluate", "export", "gguf"]

    out = sh(repo, sys.executable, "-m", "dvc", "repro")
    assert ran(out) == []
    assert "Data and pipelines are up to date" in sh(repo, sys.executable, "-m", "dvc", "status")


def test_bad_params_fail_with_one_line(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["validate"]["max_reject"] = 0.1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "pipeline.stages.validate", "--train", "data/example/sentiment_train.jsonl",
                        "--validation", "data/example/sentiment_validation.jsonl", "--out", "v", "--metrics", "m.json"],
                       cwd=repo, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("error: params.yaml: unknown key 'validate.max_reject'. "
                                                 "Did you mean 'max_reject_ratio'? Valid keys: label_field, "
                                                 "max_chars, max_reject_ratio, min_chars, text_field.")



def test_remote_round_trip_reproduces_the_adapter_without_training(history, tmp_path):
    dvc = (sys.executable, "-m", "dvc")
    repo = copy_repo(history["root"], tmp_path / "repo")
    sh(repo, *dvc, "remote", "add", "-d", "store", str(tmp_path / "remote"))  # a local folder stands in for S3/GCS/SSH
    sh(repo, "git", "commit", "-qam", "remote")
    assert "pushed" in sh(repo, *dvc, "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models" / "adapter").exists()
    sh(clone, *dvc, "pull")
    adapter = "models/adapter/adapter_model.safetensors"
    assert (clone / adapter).read_bytes() == (repo / adapter).read_bytes()
    out = sh(clone, *dvc, "repro")
    assert ran(out) == [] and "Data and pipelines are up to date" in sh(clone, *dvc, "status")


def test_an_edit_reruns_only_the_stages_that_import_the_file(history, tmp_path):
    """A comment in pipeline/stages/gguf.py reruns gguf alone; one in pipeline/core/varlen.py (only training
    imports it) reruns train, whose adapter comes out the same bytes, so nothing after it reruns."""
    repo = copy_repo(history["root"], tmp_path / "repo")
    for f, expected in (("pipeline/stages/gguf.py", ["gguf"]), ("pipeline/core/varlen.py", ["train"])):
        with open(repo / f, "a") as out:
            out.write("# an edit that changes no behaviour\n")
        assert ran(sh(repo, sys.executable, "-m", "dvc", "repro")) == expected, f
    assert "Data and pipelines are up to date" in sh(repo, sys.executable, "-m", "dvc", "status")
    sh(repo, "git", "diff", "--exit-code", "--", "models", "reports/evaluate")  # (no tracked output moved)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    before = yaml.safe_load(sh(repo, "git", "show", "HEAD:dvc.lock"))["stages"]
    assert lock["train"]["outs"] == before["train"]["outs"] and lock["export"] == before["export"]
