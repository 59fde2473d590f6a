"""The gguf stage on the tiny model: llama.cpp's own converters and llama-quantize write the files, llama.cpp
answers like PyTorch (merged, and base + LoRA adapter), every file carries its lineage, the Modelfile gives
the training prompt, and the cases it cannot handle say why."""

import json
import shutil

import pytest
from conftest import ARCHITECTURES, build_tiny_base, make_params, prepare
from gguf import GGUFReader

from pipeline.core import llamacpp
from pipeline.core.loading import load_tokenizer
from pipeline.core.prompting import Prompt
from pipeline.stages import export, gguf, train


@pytest.fixture(scope="module")
def merged(trained, tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "x"
    export.run(make_params(**{"export.atol": 1e-4, "export.check_rows": 4}), tiny_base, trained["adapter"],
               trained["tokenized"], out)
    return out


def params(**kw):
    return make_params(**{"gguf.tokenizer_pre": "gpt-2", "gguf.quantize": [], "gguf.rows": 16, **kw})


def run(p, trained, merged, tiny_base, out):
    return gguf.run(p, merged, trained["adapter"], tiny_base, trained["formatted"], trained["validated"], out)


@pytest.fixture(scope="module")
def written(trained, merged, tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "g"
    m = run(params(**{"gguf.outtype": "f32", "gguf.quantize": ["q8_0", "q4_K_M"], "gguf.max_new_tokens": 6}),
            trained, merged, tiny_base, out)
    return out, m


def test_llama_cpp_answers_like_pytorch_merged_and_as_base_plus_adapter(written):
    out, m = written
    assert set(m["files"]) == {"model-f32.gguf", "model-q8_0.gguf", "model-q4_K_M.gguf", "base-f32.gguf",
                               "adapter-f32.gguf"} and m["adapter_refused"] is None
    assert m["token_rows"] == 32 and m["modelfile_rows"] == 32 and m["pytorch"]["rows"] == 16
    for name in ("model-f32.gguf", "adapter-f32.gguf"):  # the same answers, logits within f32 rounding
        c = m["llama_cpp"][name]
        assert c["answer_agreement"] == 1.0 and c["label_agreement"] == 1.0 and c["max_abs_logit_diff"] < 0.05, name
        assert c["accuracy"] == m["pytorch"]["accuracy"]
    sizes = {n: f["bytes"] for n, f in m["files"].items()}
    assert sizes["model-q4_K_M.gguf"] < sizes["model-q8_0.gguf"] < sizes["model-f32.gguf"]
    assert sizes["adapter-f32.gguf"] < sizes["base-f32.gguf"] / 5
    assert "accuracy" in m["llama_cpp"]["model-q4_K_M.gguf"]


def test_every_file_carries_its_lineage_and_a_changed_byte_shows(written, merged, tmp_path):
    out, m = written
    export_record = json.loads((merged / "peftflow.json").read_text())
    for name, f in m["files"].items():
        rec, stamped, now = llamacpp.read_stamp(out / name)
        assert stamped == now and rec["file"] == {"name": name, **{k: v for k, v in f.items() if k != "bytes"}}
        assert rec["stage"] == "gguf" and rec["export"] == export_record and str(merged) in rec["inputs"]
    copy = tmp_path / "copy.gguf"
    shutil.copy(out / "adapter-f32.gguf", copy)
    data = bytearray(copy.read_bytes())
    data[-3] ^= 0x01  # the last tensor's bytes
    copy.write_bytes(bytes(data))
    rec, stamped, now = llamacpp.read_stamp(copy)
    assert stamped != now


def test_a_rslora_adapter_is_written_with_the_alpha_llama_cpp_needs(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 8,
                                                              "use_rslora": True}))
    assert gguf.lora_refusal(tmp_path) is None and gguf.rslora_alpha(tmp_path) == 32.0
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    assert "DoRA" in gguf.lora_refusal(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    assert "LoRA adapters only" in gguf.lora_refusal(tmp_path)


def test_modelfile_sends_the_training_prompt(written, trained, merged):
    out, _ = written
    text = (out / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert f"--lora-modules adapter={trained['adapter']}" in (out / "vllm.txt").read_text()
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


def test_what_cannot_be_written_or_served_says_why(trained, merged, tmp_path, tiny_base):
    # a base that did not come from a GGUF and a tokenizer llama.cpp's converter does not know: name its pre-tokenizer
    with pytest.raises(gguf.PipelineError, match="gguf.tokenizer_pre"):
        run(make_params(**{"gguf.quantize": []}), trained, merged, tiny_base, tmp_path / "g")
    assert not (tmp_path / "g").exists()
    # the wrong pre-tokenizer: llama.cpp splits digits apart where training did not, and the row is named
    with pytest.raises(gguf.GgufError, match=r"validation row \d+: llama.cpp tokenizes its prompt into other ids"):
        run(params(**{"gguf.tokenizer_pre": "smollm"}), trained, merged, tiny_base, tmp_path / "g")
    assert not (tmp_path / "g").exists()
    prompt_only = tmp_path / "prefix"
    prompt_only.mkdir()
    shutil.copy(merged / "peftflow.json", prompt_only / "peftflow.json")
    m = run(params(), trained, prompt_only, tiny_base, tmp_path / "g")
    assert not m["written"] and "nothing to write" in m["reason"]


def through_gguf(tmp, base, **over) -> dict:
    """validate -> ... -> train (LoRA on the `attention+mlp` preset) -> export -> gguf for a tiny base."""
    prep = prepare(tmp, base, **{"train.lora.target_modules": "attention+mlp"})
    train.run(prep["params"], prep["tokenized"], prep["formatted"] / "format.json", base, tmp / "adapter",
              tmp / "live", tmp / "ckpt")
    export.run(make_params(**{"export.atol": 1e-4, "export.check_rows": 4}), base, tmp / "adapter",
               prep["tokenized"], tmp / "x")
    return gguf.run(params(**{"gguf.outtype": "f32", **over}), tmp / "x", tmp / "adapter", base,
                    prep["formatted"], prep["validated"], tmp / "g")


# llama.cpp's architecture for each (it converts Mistral as a Llama); the pre-tokenizer llama.cpp needs for
# the tokenizer transformers gives that model type (Qwen2's splits digits apart, whatever tokenizer.json says)
LLAMA_CPP = {"llama": ("llama", "gpt-2"), "qwen2": ("qwen2", "qwen2"), "qwen3": ("qwen3", "gpt-2"),
             "gemma3_text": ("gemma3", "gpt-2"), "mistral": ("llama", "gpt-2"), "phi3": ("phi3", "gpt-2")}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_each_architecture_goes_through_llama_cpp_as_pytorch_answers(arch, tmp_path):
    """A tiny random model of each architecture: trained (LoRA on attention and MLP by the preset), merged,
    converted by llama.cpp's converters (merged and base + adapter) and answered there as in PyTorch."""
    name, pre = LLAMA_CPP[arch]
    m = through_gguf(tmp_path, build_tiny_base(tmp_path / "base", arch=arch), **{"gguf.tokenizer_pre": pre})
    assert m["adapter_refused"] is None and m["token_rows"] == 32
    for file in ("model-f32.gguf", "adapter-f32.gguf"):
        c = m["llama_cpp"][file]
        assert c["answer_agreement"] == 1.0 and c["max_abs_logit_diff"] < 0.05, (file, c)
    rec, _, _ = llamacpp.read_stamp(tmp_path / "g" / "model-f32.gguf")
    arch_field = GGUFReader(tmp_path / "g" / "model-f32.gguf").get_field("general.architecture")
    assert str(arch_field.contents()) == name and rec["export"]["adapter"]["params"]["train"]["lora"][
        "target_modules"] == "attention+mlp"
    assert ("sliding_window" in m) == (arch in ("gemma3_text", "mistral"))


def test_a_sliding_window_llama_cpp_does_not_apply_is_refused_past_it(tmp_path):
    """llama.cpp converts Mistral as a Llama, without its sliding window: rows longer than it are named."""
    base = build_tiny_base(tmp_path / "base", arch="mistral", sliding_window=24)
    with pytest.raises(gguf.GgufError, match=r"validation row \d+: \d+ tokens .* sliding attention window of 24"):
        through_gguf(tmp_path, base)
    assert not (tmp_path / "g").exists()


def test_an_answer_parting_from_pytorch_counts_only_at_a_near_tie(tiny_base):
    """llama.cpp's answer is scored by PyTorch token by token: parting where PyTorch's best beats llama.cpp's
    choice by less than the tolerance is a tie; by more, a disagreement; stopping early is judged alike."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    prompt, stop = [5, 17, 23, 42], {0}
    path = []
    with torch.no_grad():
        for _ in range(4):  # PyTorch's own greedy path; then, at its last step, the second best token instead
            row = model(torch.tensor([prompt + path])).logits[0, -1]
            path.append(int(row.argmax()))
        second = int(row.topk(2).indices[1])
        margin = float(row.max() - row[second])
    assert margin > 0
    assert gguf.near_tie(model, prompt, path[:3], stop, 3, 0.0)  # the same tokens, cut by max_new_tokens
    parted = path[:3] + [second]
    assert gguf.near_tie(model, prompt, parted, stop, 4, margin * 1.01)
    assert not gguf.near_tie(model, prompt, parted, stop, 4, margin * 0.99)
    # llama.cpp stopped after 3 tokens where PyTorch goes on: a tie only if its stop token was nearly as likely
    with torch.no_grad():
        row = model(torch.tensor([prompt + path[:3]])).logits[0, -1]
    end = int(row.argsort()[-5])  # the fifth most likely token as the stop token
    gap = float(row.max() - row[end])
    assert gap > 0 and gguf.near_tie(model, prompt, path[:3], {end}, 8, gap * 1.01)
    assert not gguf.near_tie(model, prompt, path[:3], {end}, 8, gap * 0.99)
