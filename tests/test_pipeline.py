"""Integration: `dvc repro` of the real dvc.yaml in a temporary git + DVC repository, on the tiny model."""

import json
import subprocess
import sys

import yaml

from conftest import TINY_TRAIN, sh

STAGES = ["base", "validate", "format", "tokenize", "train", "evaluate", "export"]


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


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


def test_kill_9_during_training_then_repro_resumes(repo):
    """SIGKILL the train stage after its first checkpoint; `dvc repro` resumes there and ends on
    the same step count, with every other stage's outputs intact."""
    import time

    import psutil

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(epochs=12, checkpoint_every=10)  # 240 rows / 8 = 30 batches per epoch: 360 steps
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, sys.executable, "-m", "dvc", "repro", "tokenize")
    env_path = f"{sys.executable.rsplit('/', 1)[0]}:{__import__('os').environ['PATH']}"
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "PATH": env_path})
    ckpt = repo / "checkpoints" / "train" / "checkpoint.json"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint was written"
    killed = [c for c in psutil.Process(proc.pid).children(recursive=True) if "pipeline.train" in " ".join(c.cmdline())]
    assert killed, "train process not found"
    for c in killed:
        c.kill()  # SIGKILL
    proc.wait(timeout=120)
    assert proc.returncode != 0
    step_at_kill = json.loads(ckpt.read_text())["step"]
    assert 10 <= step_at_kill < 360
    assert not (repo / "models" / "adapter").exists()

    out = sh(repo, sys.executable, "-m", "dvc", "repro")
    assert ran(out) == ["train", "evaluate", "export"]
    metrics = json.loads((repo / "reports" / "train" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= step_at_kill and metrics["steps"] == 360
    losses = (repo / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]
    assert [int(x.split("\t")[0]) for x in losses] == list(range(1, 361))  # one point per step, none twice
    assert "Data and pipelines are up to date" in sh(repo, sys.executable, "-m", "dvc", "status")
