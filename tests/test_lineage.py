"""Lineage records in adapters and exports, and the model card rendered from them."""

import json
import shutil

from conftest import ROOT, section

from pipeline.core import lineage
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
    # the packages of the stage's pins file (env/train.txt) and only those, at their installed versions
    pins = (ROOT / "env" / "train.txt").read_text().splitlines()
    assert sorted(rec["env"]["packages"]) == sorted(x.split("==")[0] for x in pins if x and not x.startswith("#"))
    assert "pytest" not in rec["env"]["packages"] and "prefect" not in rec["env"]["packages"]
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
