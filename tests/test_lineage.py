"""Lineage records in adapters and exports, and the model card rendered from them."""

import json
import shutil

import torch
from conftest import ROOT, section

from pipeline.core import lineage
from pipeline.core.io import file_digest
from pipeline.stages import export


def test_adapter_carries_one_content_only_record_in_folder_and_safetensors(trained, tmp_path):
    rec = json.loads((trained["adapter"] / "peftflow.json").read_text())
    assert rec["stage"] == "train" and rec["params"]["seed"] == trained["params"].seed
    assert rec["prompt"]["task"] == "classification" and len(rec["prompt"]["template_sha256"]) == 64
    assert rec["params"]["train"]["method"] == "lora" and rec["params"]["train"]["lora"]["r"] == 8
    assert len(rec["base"]["weights_sha256"]) == 64
    # the data it was made from: each raw file's md5 and rows, its license, and the hashes of its inputs
    assert rec["data"]["train"]["md5"] == lineage.md5_file(trained["validated"].parent / "raw_train.jsonl")
    assert rec["data"]["train"]["accepted"] == 64 and rec["data"]["license"].startswith("Apache-2.0")
    assert rec["inputs"][str(trained["tokenized"])] == lineage.md5_dir(trained["tokenized"])
    # no code hash and no other stage's record: an edit to code or to another stage's params changes nothing here
    assert "deps" not in rec and "upstream" not in rec
    assert rec["env"]["packages"]["torch"].startswith("2.13.0") and rec["env"]["packages"]["peft"]
    assert rec["env"]["lock_sha256"] == file_digest(ROOT / "requirements.lock")
    assert rec["hardware"]["cpu_isa"] and rec["hardware"]["torch_threads"] >= 1
    assert rec["determinism"]["deterministic_algorithms"] is True
    assert rec["metrics"]["steps"] == trained["metrics"]["steps"]
    # nothing that differs between two runs of the same inputs: no commit, time, host, speed or memory
    assert not {"git", "seconds", "tokens_per_second", "peak_rss_mb", "resumed_from_step"} & (set(rec) | set(rec["metrics"]))
    assert not (trained["adapter"] / "lineage.json").exists()
    # the same record travels inside the weights file: a copy without peftflow.json still has it
    copy = tmp_path / "copy"
    shutil.copytree(trained["adapter"], copy)
    (copy / "peftflow.json").unlink()
    assert lineage.read(copy) == json.loads(json.dumps(rec, sort_keys=True, default=str))


def test_an_installed_version_other_than_the_recorded_one_is_named(trained):
    rec = json.loads((trained["adapter"] / "peftflow.json").read_text())
    assert lineage.env_mismatches(rec) == []
    rec["env"]["packages"]["torch"] = "1.0.0"
    rec["env"]["packages"]["no-such-package"] = "0.1"
    assert lineage.env_mismatches(rec) == [("no-such-package", "0.1", None), ("torch", "1.0.0", torch.__version__)]


def test_export_model_card_and_lineage(trained, tiny_base, tmp_path):
    evaluation = tmp_path / "metrics.json"
    evaluation.write_text(json.dumps({"rows": 32, "base": {"accuracy": 0.25, "macro_f1": 0.1},
                                      "adapter": {"accuracy": 0.875, "macro_f1": 0.8}}))
    p = trained["params"].model_copy(update={"export": section("export", atol=1e-4, check_rows=4)})
    export.run(p, tiny_base, trained["adapter"], trained["tokenized"], tmp_path / "x", evaluation=evaluation)
    rec = lineage.read(tmp_path / "x")
    assert rec["stage"] == "export" and rec["adapter"]["stage"] == "train"
    assert rec["metrics"]["evaluate"]["adapter"]["accuracy"] == 0.875
    card = (tmp_path / "x" / "README.md").read_text()
    assert "| accuracy | 0.25 | 0.875 |" in card
    assert "Classify a text into one of: negative, neutral, positive." in card
    assert "License of the data: Apache-2.0" in card  # params.yaml's data.license, carried from validate
    assert f"`{rec['adapter']['base']['weights_sha256']}`" in card
    assert "dvc repro export" in card


def test_a_gguf_copied_alone_names_the_commit_that_made_it_and_a_changed_byte_fails(history, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = history["root"]
    copy = tmp_path / "deployed" / "my-adapter.gguf"
    copy.parent.mkdir()
    shutil.copy(root / "models" / "gguf" / "adapter-f16.gguf", copy)
    r = CliRunner().invoke(app, ["lineage", str(copy), "--root", str(root)], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert f"recorded in dvc.lock at commit {history['second']}" in r.output and "made by stage gguf" in r.output
    data = bytearray(copy.read_bytes())
    data[-5] ^= 0x01  # a byte of the last tensor
    copy.write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["lineage", str(copy), "--root", str(root)], env={"COLUMNS": "250"})
    assert r.exit_code == 1 and "tensor bytes changed" in r.output


def test_lock_history_reads_every_commit_of_both_lock_files_newest_first(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: a\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train@chat:\n    cmd: b\n")
    (tmp_path / "notes.txt").write_text("not a lock")
    git("add", "-A")
    git("commit", "-qm", "two")
    (tmp_path / "notes.txt").write_text("still not a lock")
    git("commit", "-qam", "three")
    history = lineage.lock_history(tmp_path)
    assert [sorted(stages) for _, stages in history] == [["train", "train@chat"], ["train"]]
    assert history[0][1]["train@chat"]["cmd"] == "b"
