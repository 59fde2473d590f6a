"""The gguf stage on the tiny model: the file reads back as the merged model, the Modelfile gives
the training prompt, llama.cpp answers like PyTorch, and the cases it cannot handle say why."""

import json
import shutil

import pytest
import torch
from conftest import make_params

from pipeline.core.loading import load_tokenizer
from pipeline.core.prompting import Prompt
from pipeline.stages import export, gguf


@pytest.fixture(scope="module")
def merged(trained, tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "x"
    export.run(make_params(**{"export.atol": 1e-4, "export.check_rows": 4}), tiny_base, trained["adapter"], trained["tokenized"], out)
    return out


def params(**kw):
    return make_params(**{"gguf.tokenizer_pre": "gpt-2", "gguf.check_rows": 4, **kw})


def test_f32_file_reads_back_as_the_merged_model_with_tokenizer_and_template(trained, merged, tmp_path):
    m = gguf.run(params(**{"gguf.outtype": "f32"}), merged, trained["formatted"], trained["validated"], tmp_path / "g")
    assert m["written"] and m["max_abs_logit_diff_reread"] < 1e-4 and m["rows_checked"] == 4
    assert m["modelfile_rows_checked"] == 32
    from gguf import GGUFReader

    r = GGUFReader(tmp_path / "g" / "model-f32.gguf")
    field = {k: v.contents() for k, v in r.fields.items() if k not in ("tokenizer.ggml.merges",)}
    config = json.loads((merged / "config.json").read_text())
    assert field["general.architecture"] == "llama" and field["llama.block_count"] == config["num_hidden_layers"]
    assert field["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert len(field["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert field["tokenizer.ggml.eos_token_id"] == config["eos_token_id"]
    assert "<|im_start|>" in field["tokenizer.chat_template"]
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied embeddings are written once
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names


def test_query_and_key_rows_are_reordered_for_llama_cpp_and_back():
    w = torch.arange(4 * 2 * 3 * 5, dtype=torch.float32).reshape(4 * 2 * 3, 5)  # 4 heads of 6 rows
    out = gguf.qk_rows_for_llama_cpp(w, heads=4)
    # head 0: rows (0,3), (1,4), (2,5) become neighbours: the rotary pairs interleaved
    assert out[:6, 0].tolist() == [w[i, 0].item() for i in (0, 3, 1, 4, 2, 5)]
    assert sorted(out[:, 0].tolist()) == sorted(w[:, 0].tolist()) and not torch.equal(out, w)


@pytest.mark.parametrize("outtype,tolerance", [("f16", 0.05), ("q8_0", 0.5)])
def test_smaller_weight_types_stay_close(trained, merged, tmp_path, outtype, tolerance):
    m = gguf.run(params(**{"gguf.outtype": outtype}), merged, trained["formatted"], trained["validated"], tmp_path / "g")
    f32_bytes = sum(t.numel() * 4 for t in __import__("safetensors.torch").torch.load_file(
        str(merged / "model.safetensors")).values())
    assert 0 < m["max_abs_logit_diff_reread"] < tolerance and m["bytes"] < 0.6 * f32_bytes


def test_modelfile_sends_the_training_prompt(trained, merged, tmp_path):
    gguf.run(params(), merged, trained["formatted"], trained["validated"], tmp_path / "g")
    text = (tmp_path / "g" / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    go = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    row = json.loads((trained["validated"] / "validation.jsonl").read_text().splitlines()[3])
    prompt = json.loads((trained["formatted"] / "validation.jsonl").read_text().splitlines()[3])["prompt"]
    assert gguf.fill(go, row["sentence"]) == prompt
    # a template that uses the text twice has no single place for the user's message
    record = json.loads((merged / "peftflow.json").read_text())
    record["prompt"]["template_text"] = record["prompt"]["template_text"].replace("Sentence: {{ sentence }}",
                                                                                  "{{ sentence }} / {{ sentence }}")
    with pytest.raises(gguf.GgufError, match="exactly once"):
        gguf.modelfile("m.gguf", Prompt.from_record(record), load_tokenizer(merged), ["<|im_end|>"])


def test_modelfile_parity_names_the_row_that_differs():
    go = "<s>{{ .Prompt }}</s>{{ .Response }}"
    formatted = [{"row": 1, "prompt": "<s>a</s>"}, {"row": 2, "prompt": "<s>b </s>"}]
    with pytest.raises(gguf.GgufError, match="validation row 2"):
        gguf.modelfile_parity(go, "text", [{"row": 1, "text": "a"}, {"row": 2, "text": "b"}], formatted)


def test_what_cannot_be_written_says_why(trained, merged, tmp_path, tiny_base):
    with pytest.raises(gguf.GgufError, match="gguf.tokenizer_pre"):  # a non-GGUF base: its llama.cpp name is unknown
        gguf.run(make_params(), merged, trained["formatted"], trained["validated"], tmp_path / "g")
    assert not (tmp_path / "g").exists()
    other = tmp_path / "gpt2"
    shutil.copytree(merged, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(gguf.GgufError, match="GPT2LMHeadModel is not written"):
        gguf.run(params(), other, trained["formatted"], trained["validated"], tmp_path / "g")
    prompt_only = tmp_path / "prefix"
    prompt_only.mkdir()
    shutil.copy(merged / "peftflow.json", prompt_only / "peftflow.json")
    m = gguf.run(params(), prompt_only, trained["formatted"], trained["validated"], tmp_path / "g")
    assert not m["written"] and "nothing to write" in m["reason"]


def test_llama_cpp_tokenizes_and_answers_like_pytorch(trained, merged, tmp_path):
    # llama-cpp-python comes with `make test` (pip install -e '.[gguf]'); without it the stage says how to get it
    m = gguf.run(params(**{"gguf.outtype": "f32", "gguf.llama_cpp_rows": 16, "gguf.max_new_tokens": 6}), merged,
                 trained["formatted"], trained["validated"], tmp_path / "g")
    c = m["llama_cpp"]
    assert c["rows"] == 16 and c["token_agreement"] == 1.0 and c["answer_agreement"] == 1.0
    assert c["label_agreement"] == 1.0
