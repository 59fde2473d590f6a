"""Lineage records in adapters and exports, and the model card rendered from them."""

import json
import shutil

from pipeline import export, lineage
from pipeline.params import Export


def test_adapter_carries_lineage_in_folder_and_safetensors(trained, tmp_path):
    rec = json.loads((trained["adapter"] / "lineage.json").read_text())
    assert rec["stage"] == "train" and rec["seed"] == trained["params"].seed
    assert rec["params"]["train"]["method"] == "lora" and rec["params"]["train"]["lora"]["r"] == 8
    assert len(rec["base"]["weights_sha256"]) == 64 and rec["template"]["sha256"]
    assert rec["versions"]["torch"] and rec["versions"]["peft"] and rec["hardware"]["cpus"] >= 1
    assert rec["metrics"]["steps"] == trained["metrics"]["steps"]
    assert set(rec["git"]) == {"commit", "dirty", "dirty_files"}
    # the same record travels inside the weights file: a copy without lineage.json still has it
    copy = tmp_path / "copy"
    shutil.copytree(trained["adapter"], copy)
    (copy / "lineage.json").unlink()
    assert lineage.read(copy) == json.loads(json.dumps(rec, sort_keys=True, default=str))


def test_export_model_card_and_lineage(trained, tiny_base, tmp_path):
    evaluation = tmp_path / "metrics.json"
    evaluation.write_text(json.dumps({"rows": 32, "base": {"accuracy": 0.25, "macro_f1": 0.1},
                                      "adapter": {"accuracy": 0.875, "macro_f1": 0.8}}))
    p = trained["params"]
    export.run(Export(atol=1e-4, check_rows=4), tiny_base, trained["adapter"], trained["tokenized"], tmp_path / "x",
               params=p, evaluation=evaluation)
    rec = lineage.read(tmp_path / "x")
    assert rec["stage"] == "export" and rec["adapter"]["stage"] == "train"
    assert rec["metrics"]["evaluate"]["adapter"]["accuracy"] == 0.875
    card = (tmp_path / "x" / "README.md").read_text()
    assert "| accuracy | 0.25 | 0.875 |" in card
    assert "Classify a text into one of: negative, neutral, positive." in card
    assert "Apache-2.0" in card  # the license file beside the example data
    assert f"`{rec['adapter']['base']['weights_sha256']}`" in card
    assert "dvc repro export" in card
