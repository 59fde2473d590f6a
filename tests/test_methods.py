"""Every PEFT method from params: trains the tiny model with falling loss, saves, and reloads with
identical logits. QLoRA runs here on the CPU (bitsandbytes 4-bit and 8-bit)."""

import math

import pytest
import torch
from conftest import fit, make_params, prompt_of, recipe_on, save
from datasets import load_from_disk

from pipeline import methods
from pipeline.core.loading import load_base_model
from pipeline.core.modeling import device, left_pad
from pipeline.core.params import ParamsError
from pipeline.core.scoring import eval_loss
from pipeline.methods.adapters import load_adapter
from pipeline.stages import train

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
       "bnb_4bit_compute_dtype": "bfloat16"}

METHODS = {
    "lora": {"train.lora": LORA},
    "rslora": {"train.lora": {**LORA, "use_rslora": True}},
    "dora": {"train.lora": {**LORA, "use_dora": True}},
    "qlora-4bit": {"train.lora": LORA, "train.quantization": NF4},
    "qlora-8bit": {"train.lora": LORA, "train.quantization": {"load_in_8bit": True}},
    "loraplus": {"train.lora": LORA, "train.loraplus_lr_ratio": 16.0, "train.lr": 5e-3},
    "adalora": {"train.method": "adalora", "train.adalora": {"init_r": 8, "target_r": 4, "tinit": 2, "tfinal": 4,
                                                            "deltaT": 2, "target_modules": ["q_proj", "v_proj"]}},
    "ia3": {"train.method": "ia3", "train.ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"],
                                                "feedforward_modules": ["down_proj"]}, "train.lr": 5e-2},
    "prefix_tuning": {"train.method": "prefix_tuning", "train.prefix_tuning": {"num_virtual_tokens": 8, "prefix_projection": True,
                                                                          "encoder_hidden_size": 64}, "train.lr": 1e-2},
    "prompt_tuning": {"train.method": "prompt_tuning", "train.prompt_tuning": {"num_virtual_tokens": 8},
                      "train.lr": 5e-2},
    "p_tuning": {"train.method": "p_tuning", "train.p_tuning": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}},
    "loha": {"train.method": "loha", "train.loha": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
    "lokr": {"train.method": "lokr", "train.lokr": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
    "vera": {"train.method": "vera", "train.vera": {"r": 16, "target_modules": ["q_proj", "k_proj"]}, "train.lr": 5e-2},
    "full": {"train.method": "full", "train.lr": 2e-3},
    "bitfit-norms": {"train.method": "bitfit", "train.bitfit": {"norms": True}, "train.lr": 5e-2},
    "lora-adamw8bit": {"train.lora": LORA, "train.optimizer": "adamw_8bit"},
    "qlora-paged-adamw8bit": {"train.lora": LORA, "train.quantization": NF4, "train.optimizer": "paged_adamw_8bit"},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_and_reloads(name, prepared, tiny_base, tmp_path):
    p = make_params(**{"train.epochs": 3, **METHODS[name]})
    model, metrics, recipe = fit(p, prepared["tokenized"], tiny_base, tmp_path / "live", tmp_path / "ckpt")
    save(recipe, p, metrics, prepared["tokenized"], tiny_base, tmp_path / "adapter")
    losses = [float(x.split("\t")[1]) for x in
              (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]]
    assert len(losses) == metrics["steps"] == 24 and all(math.isfinite(x) for x in losses)
    # the loss over the training rows fell: trained adapter vs the base model it started from
    data = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in load_from_disk(str(prepared["tokenized"] / "train"))]
    model.eval()
    after = eval_loss(model, data, 16)
    if name in ("full", "bitfit-norms"):  # the base's own weights trained: the base is loaded again to compare
        before = eval_loss(load_base_model(tiny_base, device()), data, 16)
        trained = sum(q.numel() for q in model.parameters() if q.requires_grad)
        assert metrics["trainable_params"] == trained and (trained == metrics["total_params"]) == (name == "full")
    else:
        with model.disable_adapter():
            before = eval_loss(model, data, 16)
        assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert after < 0.9 * before, (before, after)
    rows = [{"input_ids": [5, 9, 17, 33, 41, 2]}, {"input_ids": [7, 8, 9]}]
    batch = left_pad(rows, 0, device())
    reloaded = load_adapter(tiny_base, tmp_path / "adapter")
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with reloaded.disable_adapter():
            base = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    n = batch["input_ids"].shape[1]  # prompt learning prepends virtual tokens: compare the real positions
    a, b, base = a[:, -n:], b[:, -n:], base[:, -n:]
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(b, base, atol=1e-4)


def test_adalora_total_step_comes_from_the_run():
    p = make_params(**METHODS["adalora"])
    assert methods.get("adalora").config(p.train, 123, "llama").total_step == 123


def test_quantization_keys_are_checked():
    with pytest.raises(ParamsError, match="train.quantization.load_in_4bits.*Did you mean 'load_in_4bit'"):
        make_params(**{"train.quantization": {"load_in_4bits": True}})


def test_target_presets_per_architecture():
    from pipeline.core.stage import PipelineError
    from pipeline.methods.peft import resolve_targets

    assert resolve_targets({"target_modules": "attention"}, "llama")["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_targets({"target_modules": "attention+mlp"}, "gpt2")["target_modules"] == ["c_attn", "c_proj", "c_fc", "mlp.c_proj"]
    assert resolve_targets({"target_modules": "all-linear"}, "llama")["target_modules"] == "all-linear"
    with pytest.raises(PipelineError, match="preset 'mlp' is not defined for model type 'bloom'"):
        resolve_targets({"target_modules": "mlp"}, "bloom")
    p = make_params(**{"train.lora": {"r": 4, "target_modules": "attention+mlp"}})
    assert sorted(methods.get("lora").config(p.train, 10, "llama").target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("name", ["prompt_tuning", "qlora-4bit"])
def test_export_of_prompt_learning_and_qlora(name, prepared, tiny_base, tmp_path):
    from pipeline.stages import export

    p = make_params(**{"train.epochs": 1, **METHODS[name]})
    train.run(p, prepared["tokenized"], prompt_of(prepared["tokenized"]), tiny_base, tmp_path / "adapter", tmp_path / "live", tmp_path / "ckpt")
    m = export.run(make_params(**{"export.atol": 1e-4}), tiny_base, tmp_path / "adapter", prepared["tokenized"], tmp_path / "x")
    if name == "prompt_tuning":
        assert not m["merged"] and "cannot be merged" in m["reason"]
        assert (tmp_path / "x" / "adapter_model.safetensors").exists()
        # with the adapter disabled the base answers: scored from a KV cache, as the full scoring does
        import numpy as np

        from pipeline.core.io import read_jsonl
        from pipeline.core.loading import load_tokenizer
        from pipeline.core.scoring import Scorer, full_logprobs
        from pipeline.methods.adapters import trained_method

        model, tok = load_adapter(tiny_base, tmp_path / "adapter"), load_tokenizer(tiny_base)
        rows = read_jsonl(prepared["formatted"] / "validation.jsonl")[:8]
        method = trained_method(tmp_path / "adapter")
        assert method.prompt_learning and not method.mergeable
        scorer = Scorer(model, tok, 4, method.prompt_learning)
        with scorer.base() as base:
            assert not base.prompt_learning
            base_cached, base_full = base.choices(rows).total, full_logprobs(model, tok, rows, 4).total
        assert scorer.prompt_learning and np.abs(base_cached - base_full).max() < 1e-3
        assert np.abs(scorer.choices(rows).total - base_cached).max() > 1e-3  # the adapter differs
    else:  # QLoRA merges into the full-precision base
        assert m["merged"] and m["max_abs_diff_vs_adapter"] <= 1e-4 < m["max_abs_diff_vs_base"]
        assert (tmp_path / "x" / "model.safetensors").exists()


def test_bitfit_trains_only_biases_and_says_when_there_are_none(prepared, tiny_base, tmp_path):
    from conftest import build_tiny_base

    from pipeline.core.stage import PipelineError

    p = make_params(**{"train.method": "bitfit", "train.lr": 5e-2, "train.epochs": 1})
    with pytest.raises(PipelineError, match="LlamaForCausalLM has no bias parameters.*train.bitfit.norms: true"):
        fit(p, prepared["tokenized"], tiny_base, tmp_path / "live", tmp_path / "ckpt")
    with pytest.raises(ParamsError, match="unknown key 'train.bitfit.norm'.*Did you mean 'norms'"):
        make_params(**{"train.method": "bitfit", "train.bitfit": {"norm": True}})
    biased = build_tiny_base(tmp_path / "biased", bias=True)  # same tokenizer, so the tokenized data fits
    model, metrics, recipe = fit(p, prepared["tokenized"], biased, tmp_path / "live", tmp_path / "ckpt")
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trained and all(n.endswith(".bias") for n in trained)
    assert metrics["trainable_params"] == sum(q.numel() for n, q in model.named_parameters() if n in trained)
    save(recipe, p, metrics, prepared["tokenized"], biased, tmp_path / "adapter")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "adapter" / "bitfit.safetensors"))) == trained  # only what was trained
    reloaded = load_adapter(biased, tmp_path / "adapter")
    batch = left_pad([{"input_ids": [5, 9, 17, 33]}], 0, device())
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"]).logits
        assert torch.allclose(a, reloaded(input_ids=batch["input_ids"]).logits, atol=1e-5)
        with reloaded.disable_adapter():
            assert not torch.allclose(a, reloaded(input_ids=batch["input_ids"]).logits, atol=1e-4)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_adalora_step_has_peft_s_orthogonal_regularization(tiny_base, prepared, shared_prefix):
    """PEFT adds AdaLoRA's orthogonal regularization to a loss its forward computes from labels; the train
    loop computes its own loss and must add the same term: same loss and gradients as PEFT's forward."""
    from test_batching import rows_of

    p = make_params(**METHODS["adalora"])
    method = methods.get("adalora")
    rows = rows_of(prepared, 6)
    out = {}
    for way in ("loop", "peft"):
        torch.manual_seed(0)
        model = method.build(load_base_model(tiny_base, device()), p.train, 20).train()
        for n, q in model.named_parameters():  # lora_B and lora_E start at zero: move them off it
            if "lora_" in n:
                q.data.normal_(0, 0.5)
        if way == "loop":
            loss, _ = recipe_on(model, "adalora", shared_prefix, None, **{k: v for k, v in METHODS["adalora"].items()
                                                                           if k != "train.method"},
                                **{"train.method": "adalora"}).step([rows])
        else:  # one row per forward (no padding); the rows' losses weighted by their labelled tokens make
            # the step's mean NLL, and the term each loss carries comes out once
            counts = [sum(x != -100 for x in r["labels"][1:]) for r in rows]
            total = sum(c * model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
                        for r, c in zip(rows, counts, strict=True)) / sum(counts)
            total.backward()
            loss = total.item()
        out[way] = (loss, {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad})
    (mine, g1), (theirs, g2) = out["loop"], out["peft"]
    assert method.penalty(model) > 0.01  # the term is there to compare
    assert mine == pytest.approx(theirs, rel=1e-5)
    for name, g in g1.items():
        assert (g - g2[name]).abs().max() <= 1e-4 * g.abs().max() + 1e-7, name
