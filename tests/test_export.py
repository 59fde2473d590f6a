import json

import pytest
import torch
from conftest import make_params, prompt_of

from pipeline.core.loading import load_base_model
from pipeline.core.modeling import device, left_pad
from pipeline.stages import export


def test_merged_model_matches_adapter(trained, tiny_base, tmp_path):
    m = export.run(make_params(**{"export.atol": 1e-4, "export.check_rows": 4}), tiny_base, trained["adapter"], trained["tokenized"], tmp_path / "x")
    assert m["merged"] and m["max_abs_diff_vs_adapter"] <= 1e-4 < m["max_abs_diff_vs_base"]
    out = tmp_path / "x"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "peftflow.json").read_text())["adapter"]["params"]["train"]["method"] == "lora"
    # the saved merged model is a plain transformers checkpoint that differs from the base
    merged, base = load_base_model(out, device()), load_base_model(tiny_base, device())
    batch = left_pad([{"input_ids": [5, 6, 7, 8]}], 0, torch.device("cpu"))
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=batch["input_ids"]).logits, base(input_ids=batch["input_ids"]).logits)


def test_untrained_adapter_fails_loudly(trained, tiny_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base_model(tiny_base, device()), LoraConfig(r=4, target_modules=["q_proj"]))  # B = 0
    model.save_pretrained(tmp_path / "noop")
    (tmp_path / "noop" / "peftflow.json").write_text((trained["adapter"] / "peftflow.json").read_text())
    with pytest.raises(export.ExportError, match="does not change the base model"):
        export.run(make_params(), tiny_base, tmp_path / "noop", trained["tokenized"], tmp_path / "x")
    assert not (tmp_path / "x").exists()



def test_full_fine_tune_is_evaluated_against_its_base_and_exported_whole(trained, tiny_base, tmp_path):
    from conftest import make_params

    from pipeline.stages import evaluate, train

    p = make_params(**{"train.method": "full", "train.lr": 2e-3, "train.epochs": 1})
    train.run(p, trained["tokenized"], prompt_of(trained["tokenized"]), tiny_base, tmp_path / "a", tmp_path / "live", tmp_path / "c")
    assert (tmp_path / "a" / "model.safetensors").exists() and not (tmp_path / "a" / "adapter_config.json").exists()
    args = (trained["formatted"], trained["tokenized"])
    full = evaluate.run(p, tiny_base, tmp_path / "a", *args, tmp_path / "ev", trained["validated"])
    lora = evaluate.run(trained["params"], tiny_base, trained["adapter"], *args, tmp_path / "ev2", trained["validated"])
    # the base rows are the untouched base model's (the same as under a LoRA adapter); the tune differs
    assert full["base"] == lora["base"] and full["base_5shot"] == lora["base_5shot"]
    m = export.run(make_params(**{"export.atol": 1e-4, "export.check_rows": 4}), tiny_base, tmp_path / "a", trained["tokenized"], tmp_path / "x")
    assert m["merged"] and m["max_abs_diff_vs_adapter"] == 0.0 and m["max_abs_diff_vs_base"] > 1e-4
    assert (tmp_path / "x" / "model.safetensors").exists() and not (tmp_path / "x" / "adapter_config.json").exists()


def test_the_merge_check_allows_float32_rounding_in_proportion_to_the_logit():
    """export.atol plus RTOL of each logit: a 5e-3 rounding on a logit of 100 is float32 summing otherwise, the
    same on a logit of 1 is a wrong merge; an exact merge passes at any tolerance."""
    import torch

    big = torch.tensor([[100.0, -80.0, 3.0]])
    assert export.within(big + torch.tensor([[5e-3, -5e-3, 0.0]]), big, 1e-3)
    assert not export.within(big + torch.tensor([[0.0, 0.0, 5e-3]]), big, 1e-3)
    assert export.within(big, big, 0.0) and not export.within(big + 1e-2, big, 1e-3)


def test_a_fleet_adapters_model_card_reproduces_its_own_stage(trained, tiny_base, tmp_path):
    p = make_params(**{"export.atol": 1e-4, "export.check_rows": 2})
    export.run(p, tiny_base, trained["adapter"], trained["tokenized"], tmp_path / "x", stage="export@chat")
    card = (tmp_path / "x" / "README.md").read_text()
    assert "dvc repro fleet/dvc.yaml:export@chat" in card and "dvc repro export\n" not in card
    export.run(p, tiny_base, trained["adapter"], trained["tokenized"], tmp_path / "y")
    assert "dvc repro export" in (tmp_path / "y" / "README.md").read_text()
