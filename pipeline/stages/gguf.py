"""Stage `gguf`: the merged model as one GGUF file for llama.cpp and Ollama, checked against PyTorch.

The export stage's merged safetensors are written with the `gguf` package's writer: the tensors
under llama.cpp's names (query and key rows reordered for llama.cpp's rotary layout), the
model's hyperparameters, and the tokenizer (vocabulary, merges, special ids and chat template).
`gguf.outtype` picks the weight type (f32, f16, bf16, q8_0; norms stay f32). An Ollama
`Modelfile` beside it carries the training template: the prompt the adapter was trained on, with
the row's text (`validate.text_field`, Alpaca's `instruction`, a preference `prompt`) as
`{{ .Prompt }}`, so Ollama users send only that text and the model sees the training tokens.

Checks, before anything is kept:
  - the file read back by transformers' own GGUF loader gives the merged model's logits on
    `gguf.check_rows` validation rows (within a tolerance for the chosen weight type);
  - the Modelfile template, filled with a row's text, is the training prompt of that row;
  - with `gguf.llama_cpp_rows` > 0: llama.cpp (llama-cpp-python) tokenizes that many validation
    prompts and answers them greedily; the token agreement with training and the agreement of its
    answers with the PyTorch merged model are recorded, and the stage fails below
    `gguf.min_agreement`.
Only Llama-architecture models (Llama, SmolLM, Mistral without sliding window) are written;
prompt-learning adapters have no merged weights, so the stage records why it wrote nothing.

Inputs: export folder (its record: the prompt, and the base's pre-tokenizer name that the base stage
read from the source GGUF), formatted and validated validation rows.
Outputs: `<out>/model-<outtype>.gguf`, `<out>/Modelfile`, `<out>/gguf.json`; a metrics file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer
from transformers import AutoModelForCausalLM

from pipeline import tasks
from pipeline.core.encoding import encode_prompt
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text, read_jsonl
from pipeline.core.loading import load_tokenizer
from pipeline.core.modeling import left_pad
from pipeline.core.params import Gguf, Params, load_params, view
from pipeline.core.prompting import Prompt
from pipeline.core.scoring import generate
from pipeline.core.stage import PipelineError, entry

STAGE = "gguf"
READS = ("gguf",)
LOADS = ("task",)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SENTINEL = "\x00PROMPT\x00"
# how close the file's logits must be to the merged model's, per weight type (max |diff|)
TOLERANCE = {"f32": 1e-3, "f16": 0.5, "bf16": 2.0, "q8_0": 4.0}


class GgufError(PipelineError, RuntimeError):
    """The GGUF file does not reproduce the merged model, or cannot be written for it."""


def qk_rows_for_llama_cpp(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers keeps each head's rotary pairs as (first half, second half) of the head;
    llama.cpp expects them interleaved. Reorder the output rows of a q or k projection."""
    out_dim = w.shape[0]
    half = out_dim // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def tensor_data(name: str, w: torch.Tensor, outtype: str):
    """(numpy data, raw ggml type or None) for one tensor; 1-D tensors (norms) stay f32."""
    import gguf

    a = w.detach().float().cpu().numpy()
    if a.ndim == 1 or outtype == "f32":
        return a.astype(np.float32), None
    if outtype == "f16":
        return a.astype(np.float16), None
    kind = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    if kind == gguf.GGMLQuantizationType.Q8_0 and a.shape[-1] % 32:
        return a.astype(np.float16), None  # Q8_0 blocks are 32 wide
    return gguf.quants.quantize(a, kind), kind


def tokenizer_pre(p: Gguf, record: dict) -> str:
    """llama.cpp's name for the pre-tokenizer: from params, else the base model's source GGUF's (recorded by
    the base stage, carried in the adapter's record)."""
    name = p.tokenizer_pre or record["adapter"]["base"].get("tokenizer_pre")
    if name:
        return name
    raise GgufError("params.yaml: gguf.tokenizer_pre: the base model did not come from a GGUF file that names its "
                    "pre-tokenizer, so llama.cpp's name for it is not known; set it (e.g. llama-bpe, smollm, "
                    "qwen2, mistral-bpe)")


def vocabulary(model_dir: Path, size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and llama.cpp token types from a byte-level BPE tokenizer.json: special added
    tokens are control tokens (matched whole in text, as transformers does), other added tokens
    user-defined, ids with no token (embedding padding) unused."""
    import gguf

    t = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = t["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or (t.get("decoder") or {}).get("type") != "ByteLevel":
        raise GgufError(f"gguf: {model_dir}/tokenizer.json is not a byte-level BPE tokenizer (GPT-2 style); only "
                        "those are written by this stage")
    by_id: dict[int, tuple[str, int]] = {i: (s, gguf.TokenType.NORMAL) for s, i in model["vocab"].items()}
    for a in t.get("added_tokens", []):
        by_id[a["id"]] = (a["content"], gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
    size = max(size, max(by_id) + 1)
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))[0] for i in range(size)]
    types = [int(by_id.get(i, (None, gguf.TokenType.UNUSED))[1]) for i in range(size)]
    return tokens, types


def write(model_dir: Path, path: Path, p: Gguf, pre: str, name: str) -> dict:
    """Write the merged model in `model_dir` as a GGUF file at `path`."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES or config.get("sliding_window"):
        raise GgufError(f"gguf: {arch} is not written by this stage (supported: {', '.join(ARCHITECTURES)} "
                        "without sliding-window attention); llama.cpp's convert_hf_to_gguf.py covers more")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(name)
    add_hyperparameters(w, config, p.outtype)

    tokens, types = vocabulary(model_dir, config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.vocab.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    written = add_tensors(w, tensors, config, p.outtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensors": written, "tokens": len(tokens), "tokenizer_pre": pre, "bytes": path.stat().st_size}


def add_hyperparameters(w, config: dict, outtype: str) -> None:
    """The llama architecture's hyperparameters, from the Hugging Face config."""
    import gguf

    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // heads
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
                               or 10000.0))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_tensors(w, tensors: dict[str, torch.Tensor], config: dict, outtype: str) -> int:
    """The weights under llama.cpp's names (q/k rows permuted to its rotary layout); returns how many."""
    import gguf

    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    skipped = []
    for hf_name, t in tensors.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if "rotary_emb" in hf_name:
            skipped.append(hf_name)
            continue
        out = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if out is None:
            raise GgufError(f"gguf: no llama.cpp name for tensor {hf_name}")
        if hf_name.endswith("q_proj.weight"):
            t = qk_rows_for_llama_cpp(t, heads)
        elif hf_name.endswith("k_proj.weight"):
            t = qk_rows_for_llama_cpp(t, kv_heads)
        data, raw = tensor_data(out, t, outtype)
        w.add_tensor(out, data, raw_dtype=raw)
    return len(tensors) - len(skipped)


@torch.no_grad()
def reread_logit_diff(model_dir: Path, path: Path, prompts: list[str], tok) -> float:
    """Max |logits| difference between the merged model and the GGUF read back by transformers."""
    merged = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    batch = left_pad([{"input_ids": encode_prompt(tok, q)} for q in prompts], tok.pad_token_id or 0,
                     torch.device("cpu"))
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"], use_cache=False)
    mask = batch["attention_mask"].unsqueeze(-1)
    return float(((merged(**kw).logits - back(**kw).logits) * mask).abs().max())


def modelfile(gguf_name: str, prompt: Prompt, tok, eos: list[str]) -> tuple[str, str]:
    """(Modelfile text, its Go template) for Ollama: the training prompt of the task's row for one line of
    text (that text a sentinel), the sentinel as {{ .Prompt }}."""
    task = tasks.get(prompt.task)
    field = task.prompt_field(prompt)
    text = task.prompt(prompt, prompt.renderer(tok), task.row_from_text(SENTINEL, prompt), "the Modelfile template")
    if text.count(SENTINEL) != 1:
        raise GgufError(f"gguf: the template {prompt.template} does not use '{field}' exactly once; "
                        "the Modelfile needs one place for the user's text")
    go = text.replace("{{", '{{ "{{" }}').replace(SENTINEL, "{{ .Prompt }}") + "{{ .Response }}"
    stops = "".join(f'PARAMETER stop "{s}"\n' for s in eos)
    body = (f"# Ollama: ollama create <name> -f Modelfile; the message you send is the `{field}` the\n"
            f"# adapter was trained on (template {prompt.template}, sha256 {prompt.template_sha256}).\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{go}"""\n'
            f"{stops}PARAMETER temperature 0\n")
    return body, go


def fill(go_template: str, text: str) -> str:
    """What Ollama sends the model for `text` (enough of Go's template syntax for the Modelfile above)."""
    return go_template.replace("{{ .Prompt }}", text).replace("{{ .Response }}", "").replace('{{ "{{" }}', "{{")


def llama_cpp_parity(path: Path, model_dir: Path, prompts: list[str], tok, labels: list[str],
                     max_new_tokens: int) -> dict:
    """llama.cpp against the PyTorch merged model on the same prompts: tokens and greedy answers."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise GgufError("gguf.llama_cpp_rows > 0 needs llama-cpp-python (pip install -e '.[gguf]', "
                        "see README); set gguf.llama_cpp_rows: 0 to skip the llama.cpp check") from None
    merged = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    llm = Llama(model_path=str(path), n_ctx=2048, n_threads=max(1, torch.get_num_threads()), verbose=False,
                seed=0)
    eos = llm.token_eos()
    same_tokens = same_text = same_label = 0
    answers = []
    for q in prompts:
        ids = llm.tokenize(q.encode(), add_bos=False, special=True)
        hf_ids = encode_prompt(tok, q)
        same_tokens += ids == hf_ids
        out = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if t == eos or len(out) >= max_new_tokens:
                break
            out.append(t)
        cpp = llm.detokenize(out).decode(errors="replace").strip()
        torch_text, _ = generate(merged, tok, q, max_new_tokens)
        torch_text = torch_text.strip()
        same_text += cpp == torch_text
        if labels:
            same_label += label_of(cpp, labels) == label_of(torch_text, labels)
        answers.append({"llama_cpp": cpp, "pytorch": torch_text})
    llm.close()
    n = len(prompts)
    result = {"rows": n, "token_agreement": round(same_tokens / n, 4), "answer_agreement": round(same_text / n, 4)}
    if labels:
        result["label_agreement"] = round(same_label / n, 4)
    return {**result, "answers": answers[:8]}


def chat_template_parity(path: Path, tok, rows: list[dict]) -> dict:
    """Conversations as llama.cpp's side formats them, against the training prompt ids: the chat template
    stored in the GGUF, rendered as llama-cpp-python's `create_chat_completion` (and `llama-server
    --jinja`) render it and tokenized by llama.cpp, must give exactly the training ids (a difference is
    an error naming the row); llama.cpp's built-in template matcher (`llama_chat_apply_template`, used
    without --jinja) is measured and reported, not required."""
    import ctypes

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise GgufError(f"gguf: {path.name} carries no tokenizer.chat_template, so llama.cpp cannot format a "
                        "conversation as training did")
    special = [llm.detokenize([t], special=True).decode() for t in (llm.token_eos(), llm.token_bos())]
    jinja = Jinja2ChatFormatter(template=template, eos_token=special[0], bos_token=special[1])
    same = builtin = 0
    for r in rows:
        turns = r["messages"][:-1]
        want = encode_prompt(tok, r["prompt"])
        if llm.tokenize(jinja(messages=turns).prompt.encode(), add_bos=False, special=True) != want:
            raise GgufError(f"gguf: validation row {r['row']}: the chat template in {path.name}, applied by "
                            "llama.cpp, gives other tokens than training")
        same += 1
        chat = (llama_cpp.llama_chat_message * len(turns))(
            *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in turns])
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(turns), True, buf, len(buf))
        builtin += 0 < n <= len(buf) and llm.tokenize(buf.raw[:n], add_bos=False, special=True) == want
    llm.close()
    return {"rows": len(rows), "jinja_token_agreement": round(same / len(rows), 4),
            "builtin_template_token_agreement": round(builtin / len(rows), 4)}


def label_of(text: str, labels: list[str]) -> str | None:
    """The label a free answer names (its first word), or None."""
    words = text.lower().split()
    return words[0].strip(".,:;!") if words and words[0].strip(".,:;!") in labels else None


def modelfile_parity(go: str, field: str, source_rows: list[dict], formatted_rows: list[dict]) -> int:
    """Fill the Modelfile template with each validation row's text and compare with that row's training
    prompt; rows with other prompt fields set (an Alpaca `input`) cannot be sent that way and are left out.
    Returns the number of rows compared (recorded in the metrics); any difference is an error."""
    prompts = {r["row"]: r["prompt"] for r in formatted_rows}
    checked = 0
    for r in source_rows:
        if r["row"] not in prompts or r.get("input") or field not in r:  # (a chat row is a list of turns)
            continue
        if fill(go, str(r[field])) != prompts[r["row"]]:
            raise GgufError(f"gguf: validation row {r['row']}: the Modelfile template filled with its '{field}' "
                            "is not the prompt the adapter was trained with")
        checked += 1
    return checked


def run(params: Params, export_dir: Path, formatted: Path, validated: Path, out: Path) -> dict:
    """Write the GGUF file and the Modelfile and check both; returns the metrics (also `<out>/gguf.json`)."""
    p = view(params, STAGE, READS).gguf
    record = json.loads((export_dir / "peftflow.json").read_text())
    with atomic_dir(out) as tmp:
        if not (export_dir / "config.json").exists():  # adapter-only export (prompt learning)
            metrics = {"written": False, "reason": f"{record['adapter']['params']['train']['method']} exports an "
                       "adapter, not merged weights; GGUF holds a whole model, so there is nothing to write"}
            atomic_write_json(tmp / "gguf.json", metrics)
            return metrics
        tok, prompt, name = load_tokenizer(export_dir), Prompt.from_record(record), f"model-{p.outtype}.gguf"
        info = write(export_dir, tmp / name, p, tokenizer_pre(p, record),
                     f"peftflow {record['adapter']['params']['train']['method']}")
        rows = read_jsonl(formatted / "validation.jsonl")
        prompts = [r["prompt"] for r in rows]
        diff = reread_logit_diff(export_dir, tmp / name, prompts[: p.check_rows], tok)
        if diff > TOLERANCE[p.outtype]:
            raise GgufError(f"gguf: {name} read back by transformers differs from the merged model by {diff:.3g} "
                            f"in the logits (> {TOLERANCE[p.outtype]} allowed for {p.outtype})")
        text, go = modelfile(name, prompt, tok, [t for t in dict.fromkeys([tok.eos_token, tok.pad_token]) if t])
        field = tasks.get(prompt.task).prompt_field(prompt)
        checked = modelfile_parity(go, field, read_jsonl(validated / "validation.jsonl"), rows)
        atomic_write_text(tmp / "Modelfile", text)
        metrics = {"written": True, "file": name, "outtype": p.outtype, **info,
                   "max_abs_logit_diff_reread": diff, "rows_checked": min(p.check_rows, len(prompts)),
                   "modelfile_rows_checked": checked}
        if p.llama_cpp_rows:
            metrics["llama_cpp"] = llama_cpp_check(p, tmp / name, export_dir, rows, tok, prompt)
        atomic_write_json(tmp / "gguf.json", metrics)
    return metrics


def llama_cpp_check(p: Gguf, path: Path, export_dir: Path, rows: list[dict], tok, prompt: Prompt) -> dict:
    """llama.cpp's answers and tokens against PyTorch's on `gguf.llama_cpp_rows` rows (conversations also
    through the stored chat template); below `gguf.min_agreement` the stage fails."""
    labels = tasks.get(prompt.task).serving_labels(prompt)
    parity = llama_cpp_parity(path, export_dir, [r["prompt"] for r in rows][: p.llama_cpp_rows], tok, labels,
                              p.max_new_tokens)
    conversations = [r for r in rows if "messages" in r][: p.llama_cpp_rows]  # (task chat)
    if conversations:
        parity["chat_template"] = chat_template_parity(path, tok, conversations)
    agreement = parity.get("label_agreement", parity["answer_agreement"])
    if agreement < p.min_agreement:
        raise GgufError(f"gguf: llama.cpp agrees with the PyTorch merged model on {agreement:.1%} of "
                        f"{parity['rows']} rows (gguf.min_agreement: {p.min_agreement})")
    return parity


def main(
    export: Path = typer.Option(..., help="the export stage's merged model folder"),
    formatted: Path = typer.Option(..., help="formatted rows (validation prompts)"),
    validated: Path = typer.Option(..., help="validated rows (the text each prompt was made from)"),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    m = run(load_params(params), export, formatted, validated, out)
    atomic_write_json(metrics, {k: v for k, v in m.items() if k != "answers"})
    if m["written"]:
        extra = ""
        if "llama_cpp" in m:
            c = m["llama_cpp"]
            extra = (f", llama.cpp: tokens {c['token_agreement']:.0%}, answers {c['answer_agreement']:.0%} "
                     f"of {c['rows']} rows")
        typer.echo(f"gguf: {m['file']} ({m['bytes'] / 2**20:.0f} MiB, logits re-read within "
                   f"{m['max_abs_logit_diff_reread']:.2g}{extra}) -> {out}")
    else:
        typer.echo(f"gguf: {m['reason']}")


if __name__ == "__main__":
    entry(main)
