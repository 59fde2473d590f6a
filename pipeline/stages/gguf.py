"""Stage `gguf`: what llama.cpp, llama-server and Ollama run, written by llama.cpp's own tools and checked there.

Written, each by the llama.cpp of the version pinned in requirements.lock (pipeline/core/llamacpp.py):
  - `model-<outtype>.gguf`: the export stage's merged model (convert_hf_to_gguf.py, any architecture it
    converts), and `model-<type>.gguf` for each of `gguf.quantize` (llama-quantize from that file);
  - `base-<outtype>.gguf` + `adapter-<outtype>.gguf` (convert_lora_to_gguf.py) when llama.cpp can apply the
    adapter itself (LoRA and rsLoRA, LoRA+, QLoRA's adapter): one base, adapters chosen per request by
    `peftflow serve` (llama-server). Other methods (DoRA, IA3, prompt learning, ...) are said with the reason;
  - `Modelfile` (Ollama, `FROM` the merged file, the training template), `vllm.txt` (the GPU command),
    `tokenizer/` (the training tokenizer, whose ids `peftflow serve` sends llama-server).
Every GGUF carries its lineage (`peftflow.lineage`: this stage's record, the export's whole record and the
input hashes) and the sha256 of its tensors, so `peftflow lineage FILE.gguf` traces a copy anywhere.

Checks, in llama.cpp (llama-cpp-python, the same version), before anything is kept:
  - every validation prompt tokenized by llama.cpp gives exactly the training ids (else: the row), and
    conversations through the chat template stored in the file too;
  - a model with a sliding attention window that llama.cpp does not apply (Mistral's) has no validation row
    longer than the window;
  - every file answers `gguf.rows` validation prompts (0: all) greedily: the merged file and base + adapter
    must agree with the PyTorch merged model on `gguf.min_agreement` of the answers (classification: the
    label; free text: the answer, or one that parts from PyTorch's only at a near tie, where PyTorch's best
    next token beats llama.cpp's by no more than `TOLERANCE`) and their next-token logits within
    `TOLERANCE`; quantized files are measured, not required; classification records each file's validation
    accuracy beside PyTorch's.

Inputs: export folder (merged model and record), adapter and base folders, formatted and validated rows.
Outputs: `<out>/` (the files above and `gguf.json`); a metrics file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer
from transformers import AutoModelForCausalLM

from pipeline import tasks
from pipeline.core import lineage, llamacpp
from pipeline.core.encoding import encode_prompt
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text, read_jsonl
from pipeline.core.loading import copy_tokenizer, load_tokenizer
from pipeline.core.params import Gguf, Params, load_params, view
from pipeline.core.prompting import Prompt
from pipeline.core.scoring import decode, generate_many
from pipeline.core.stage import PipelineError, entry

STAGE = "gguf"
READS = ("gguf",)
LOADS = ("task",)

SENTINEL = "\x00PROMPT\x00"
# how far llama.cpp's next-token logits may be from PyTorch's float32 merged model (max |diff|), by weight type
TOLERANCE = {"f32": 0.05, "f16": 0.5, "bf16": 2.0, "q8_0": 4.0}


class GgufError(PipelineError, RuntimeError):
    """llama.cpp does not reproduce the trained model, or the file cannot be written for it."""


def lora_refusal(adapter_dir: Path) -> str | None:
    """Why llama.cpp cannot apply this adapter as a GGUF LoRA adapter (None: it can)."""
    f = adapter_dir / "adapter_config.json"
    c = json.loads(f.read_text()) if f.exists() else {}
    kind = c.get("peft_type")
    if kind != "LORA":
        return f"{kind or 'not a PEFT adapter'}: llama.cpp applies LoRA adapters only (serve the merged file)"
    for key, why in (("use_dora", "DoRA's magnitude vectors"), ("rank_pattern", "ranks that differ by module"),
                     ("alpha_pattern", "alphas that differ by module"), ("modules_to_save", "whole trained modules"),
                     ("lora_bias", "LoRA biases")):
        if c.get(key):
            return f"{key}: llama.cpp's LoRA adapters have no {why} (serve the merged file)"
    return None


def write_files(p: Gguf, export_dir: Path, adapter_dir: Path, base_dir: Path, tmp: Path, pre: str | None) -> dict:
    """Every GGUF file of this stage in `tmp`: name -> what it is."""
    files: dict[str, dict] = {}
    if p.quantize and p.outtype not in ("f32", "f16", "bf16"):
        raise GgufError(f"params.yaml: gguf.quantize {p.quantize} needs an unquantized gguf.outtype (f32, f16 or bf16) "
                        f"to quantize from, not {p.outtype}")
    merged = f"model-{p.outtype}.gguf"
    llamacpp.convert_model(export_dir, tmp / merged, p.outtype, pre)
    files[merged] = {"role": "merged", "type": p.outtype}
    for kind in p.quantize:
        llamacpp.quantize(tmp / merged, tmp / f"model-{kind}.gguf", kind, max(1, torch.get_num_threads()))
        files[f"model-{kind}.gguf"] = {"role": "merged", "type": kind}
    refusal = lora_refusal(adapter_dir) if p.adapter else "gguf.adapter: false"
    if refusal is None:
        base, adapter = f"base-{p.outtype}.gguf", f"adapter-{p.outtype}.gguf"
        llamacpp.convert_model(base_dir, tmp / base, p.outtype, pre)
        llamacpp.convert_lora(adapter_dir, base_dir, tmp / adapter, p.outtype)
        files[base] = {"role": "base", "type": p.outtype}
        files[adapter] = {"role": "adapter", "type": p.outtype, "base": base}
    return {"files": files, "adapter_refused": refusal}


def rslora_alpha(adapter_dir: Path) -> float | None:
    """llama.cpp scales a LoRA adapter by alpha / r; rsLoRA trained with alpha / sqrt(r): the alpha to write."""
    c = json.loads((adapter_dir / "adapter_config.json").read_text())
    return float(c["lora_alpha"]) * float(c["r"]) ** 0.5 if c.get("use_rslora") else None


class LlamaCpp:
    """One GGUF model (and optional adapter) in llama-cpp-python: tokens, greedy answers, next-token logits."""

    def __init__(self, model: Path, adapter: Path | None = None, vocab_only: bool = False) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=4096,
                         n_threads=max(1, torch.get_num_threads()), vocab_only=vocab_only, verbose=False, seed=0)

    def tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def answer(self, ids: list[int], max_new_tokens: int, stop: set[int]) -> tuple[list[int], np.ndarray]:
        """Greedy answer (ids up to a stop token) and the logits of its first token."""
        self.llm.reset()
        self.llm.eval(ids)
        first = logits = self.last_logits()
        out: list[int] = []
        while len(out) < max_new_tokens and (t := int(np.argmax(logits))) not in stop:
            out.append(t)
            self.llm.eval([t])
            logits = self.last_logits()
        return out, first

    def last_logits(self) -> np.ndarray:
        """The next-token logits after the last `eval` (a copy)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),)).copy()

    def close(self) -> None:
        self.llm.close()


def token_parity(path: Path, tok, rows: list[dict]) -> int:
    """llama.cpp's ids for every validation prompt (and conversation, through the file's chat template) must
    be the training ids; returns the number of rows compared."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    cpp = LlamaCpp(path, vocab_only=True)
    template = cpp.llm.metadata.get("tokenizer.chat_template")
    jinja = Jinja2ChatFormatter(template=template, eos_token=tok.eos_token, bos_token=tok.bos_token or "") \
        if template else None
    for r in rows:
        want = encode_prompt(tok, r["prompt"])
        if cpp.tokens(r["prompt"]) != want:
            raise GgufError(f"gguf: validation row {r['row']}: llama.cpp tokenizes its prompt into other ids than "
                            f"training ({path.name}, pre-tokenizer {cpp.llm.metadata.get('tokenizer.ggml.pre')})")
        if "messages" in r and (jinja is None or cpp.tokens(jinja(messages=r["messages"][:-1]).prompt) != want):
            raise GgufError(f"gguf: validation row {r['row']}: the chat template in {path.name}, applied by "
                            "llama.cpp, gives other tokens than training")
    cpp.close()
    return len(rows)


def window_check(path: Path, export_dir: Path, tok, rows: list[dict], max_new_tokens: int) -> dict | None:
    """A model with a sliding attention window whose GGUF has none (llama.cpp converts Mistral as a Llama and
    attends over the whole context) answers as PyTorch only within that window: a validation row longer is
    an error naming it. Returns the windows (the model's, llama.cpp's), None when the model has none."""
    config = json.loads((export_dir / "config.json").read_text())
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if not window:
        return None
    cpp = LlamaCpp(path, vocab_only=True)
    meta = cpp.llm.metadata
    applied = meta.get(f"{meta.get('general.architecture')}.attention.sliding_window")
    cpp.close()
    if applied is None:
        for r in rows:
            if (n := len(encode_prompt(tok, r["prompt"])) + max_new_tokens) > window:
                raise GgufError(f"gguf: validation row {r['row']}: {n} tokens with its answer, beyond the model's "
                                f"sliding attention window of {window}, which llama.cpp does not apply to "
                                f"{config.get('model_type')} models: it would answer otherwise than PyTorch")
    return {"model": window, "llama_cpp": None if applied is None else int(applied)}


def label_of(text: str, labels: list[str]) -> str | None:
    """The label a free answer names (its first word), or None."""
    words = text.lower().split()
    return words[0].strip(".,:;!") if words and words[0].strip(".,:;!") in labels else None


@torch.no_grad()
def reference(model, tok, rows: list[dict], max_new_tokens: int) -> tuple[list[str], list[np.ndarray]]:
    """The PyTorch merged model's greedy answers and next-token logits (float32) for the rows."""
    answers = generate_many(model, tok, [r["prompt"] for r in rows], max_new_tokens, batch_size=16)
    logits = [model(torch.tensor([encode_prompt(tok, r["prompt"])])).logits[0, -1].numpy() for r in rows]
    return [a.strip() for a in answers], logits


@torch.no_grad()
def near_tie(model, prompt: list[int], out: list[int], stop: set[int], max_new_tokens: int, tolerance: float) -> bool:
    """Whether llama.cpp's greedy answer `out` leaves PyTorch's greedy path only where PyTorch's own best next
    token beats llama.cpp's choice by at most `tolerance` (a tie that logits within the file's tolerance may
    flip): PyTorch scores llama.cpp's answer token by token, and the first token it would not have chosen
    decides (after the answer: a stop token, unless llama.cpp ran out of `max_new_tokens`)."""
    logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:]
    for j, row in enumerate(logits):
        best = int(row.argmax())
        if j < len(out):
            if best != out[j]:
                return float(row[best] - row[out[j]]) <= tolerance
        elif len(out) < max_new_tokens and best not in stop:  # llama.cpp stopped here, PyTorch would go on
            return float(row[best] - max(row[s] for s in stop if s < len(row))) <= tolerance
    return True  # PyTorch follows llama.cpp's tokens all the way: only its batched reference parted


def measure(cpp: LlamaCpp, tok, rows: list[dict], ref: tuple[list[str], list[np.ndarray]], labels: list[str],
            max_new_tokens: int, model=None, tolerance: float | None = None) -> dict:
    """One file's answers against PyTorch's (and the gold labels, for classification). Free text with `model`
    and a `tolerance`: an answer that parts from PyTorch's at a near tie (`near_tie`) is counted apart."""
    stop = {tok.eos_token_id, cpp.llm.token_eos()}
    same = same_label = right = ties = 0
    diff = 0.0
    for r, want, want_logits in zip(rows, *ref, strict=True):
        prompt = encode_prompt(tok, r["prompt"])
        out, logits = cpp.answer(prompt, max_new_tokens, stop)
        text = decode(tok, out).strip()
        diff = max(diff, float(np.abs(logits[: len(want_logits)] - want_logits).max()))
        same += text == want
        if labels:
            same_label += label_of(text, labels) == label_of(want, labels)
            right += label_of(text, labels) == label_of(r["response"], labels)
        elif text != want and model is not None and tolerance is not None:
            ties += near_tie(model, prompt, out, stop, max_new_tokens, tolerance)
    n = len(rows)
    m = {"answer_agreement": round(same / n, 4), "max_abs_logit_diff": round(diff, 4)}
    if labels:
        m |= {"label_agreement": round(same_label / n, 4), "accuracy": round(right / n, 4)}
    elif model is not None and tolerance is not None:
        m |= {"near_ties": ties, "agreement_within_ties": round((same + ties) / n, 4)}
    return m


def check_files(p: Gguf, tmp: Path, files: dict, export_dir: Path, tok, rows: list[dict], labels: list[str]) -> dict:
    """Every file answered in llama.cpp; the unquantized ones must agree with PyTorch."""
    rows = rows[: p.rows] if p.rows else rows
    model = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    ref = reference(model, tok, rows, p.max_new_tokens)
    results = {}
    for name, f in files.items():
        if f["role"] == "base":
            continue
        cpp = LlamaCpp(tmp / f["base"], tmp / name) if f["role"] == "adapter" else LlamaCpp(tmp / name)
        m = results[name] = measure(cpp, tok, rows, ref, labels, p.max_new_tokens, model, TOLERANCE.get(f["type"]))
        cpp.close()
        if f["type"] in TOLERANCE and f["type"] == p.outtype:
            agreement = m.get("label_agreement", m.get("agreement_within_ties", m["answer_agreement"]))
            if agreement < p.min_agreement or m["max_abs_logit_diff"] > TOLERANCE[p.outtype]:
                raise GgufError(f"gguf: {name} in llama.cpp agrees with the PyTorch merged model on {agreement:.1%} of "
                                f"{len(rows)} rows (gguf.min_agreement: {p.min_agreement}), logits within "
                                f"{m['max_abs_logit_diff']:.3g} ({TOLERANCE[p.outtype]} allowed for {p.outtype})")
    pytorch = {"rows": len(rows)}
    if labels:
        pytorch["accuracy"] = round(sum(label_of(a, labels) == label_of(r["response"], labels)
                                        for a, r in zip(ref[0], rows, strict=True)) / len(rows), 4)
    return {"pytorch": pytorch, "llama_cpp": results}


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


def stamp_all(tmp: Path, files: dict, params: dict, record: dict, inputs: dict, alpha: float | None) -> None:
    """Each file's lineage into its metadata: this stage's record, the export's, the inputs' hashes."""
    for name, f in files.items():
        rec = {**lineage.record(STAGE, params), "file": {"name": name, **f}, "inputs": inputs, "export": record}
        llamacpp.stamp(tmp / name, rec, {"adapter.lora.alpha": alpha} if f["role"] == "adapter" and alpha else None)


def run(params: Params, export_dir: Path, adapter_dir: Path, base_dir: Path, formatted: Path, validated: Path,
        out: Path) -> dict:
    """Write the GGUF files, the Modelfile and vllm.txt and check them; returns the metrics (`<out>/gguf.json`)."""
    pv = view(params, STAGE, READS)
    p = pv.gguf
    record = json.loads((export_dir / "peftflow.json").read_text())
    with atomic_dir(out) as tmp:
        if not (export_dir / "config.json").exists():  # adapter-only export (prompt learning)
            method = record["adapter"]["params"]["train"]["method"]
            metrics = {"written": False, "reason": f"{method} exports an adapter, not merged weights, and llama.cpp "
                       "applies no prompt-learning adapter: nothing to write"}
            atomic_write_json(tmp / "gguf.json", metrics)
            return metrics
        tok, prompt = load_tokenizer(export_dir), Prompt.from_record(record)
        pre = p.tokenizer_pre or record["adapter"]["base"].get("tokenizer_pre")
        written = write_files(p, export_dir, adapter_dir, base_dir, tmp, pre)
        files = written["files"]
        inputs = {str(d): lineage.digest(d) for d in (export_dir, adapter_dir, base_dir)}
        alpha = rslora_alpha(adapter_dir) if written["adapter_refused"] is None else None
        stamp_all(tmp, files, pv.dump(), record, inputs, alpha)
        rows = read_jsonl(formatted / "validation.jsonl")
        merged = next(iter(files))
        checked = token_parity(tmp / merged, tok, rows)
        window = window_check(tmp / merged, export_dir, tok, rows, p.max_new_tokens)
        labels = tasks.get(prompt.task).serving_labels(prompt)
        results = check_files(p, tmp, files, export_dir, tok, rows, labels)
        text, go = modelfile(merged, prompt, tok, [t for t in dict.fromkeys([tok.eos_token, tok.pad_token]) if t])
        field = tasks.get(prompt.task).prompt_field(prompt)
        modelfile_rows = modelfile_parity(go, field, read_jsonl(validated / "validation.jsonl"), rows)
        atomic_write_text(tmp / "Modelfile", text)
        copy_tokenizer(export_dir, tmp / "tokenizer")  # the training tokenizer: `peftflow serve` sends its ids
        atomic_write_text(tmp / "vllm.txt", vllm_command(base_dir, adapter_dir, written["adapter_refused"]))
        metrics = {"written": True, "files": {n: {**f, "bytes": (tmp / n).stat().st_size} for n, f in files.items()},
                   "adapter_refused": written["adapter_refused"], "tokenizer_pre": pre, "token_rows": checked,
                   "modelfile_rows": modelfile_rows, **({"sliding_window": window} if window else {}), **results}
        atomic_write_json(tmp / "gguf.json", metrics)
    return metrics


def vllm_command(base_dir: Path, adapter_dir: Path, refused: str | None) -> str:
    """The equivalent GPU serving command (vLLM serves PEFT adapter folders over the safetensors base)."""
    if refused:
        return f"# vLLM serves LoRA adapters only; this one cannot be ({refused}): serve models/export merged.\n"
    return ("# On a GPU: one vLLM server, the base model and this adapter by name (more: more name=path pairs).\n"
            f"vllm serve {base_dir} --enable-lora --max-lora-rank 64 --lora-modules adapter={adapter_dir}\n")


def main(
    export: Path = typer.Option(..., help="the export stage's merged model folder"),
    adapter: Path = typer.Option(..., help="the train stage's adapter folder"),
    base: Path = typer.Option(..., help="the base stage's model folder"),
    formatted: Path = typer.Option(..., help="formatted rows (validation prompts)"),
    validated: Path = typer.Option(..., help="validated rows (the text each prompt was made from)"),
    out: Path = typer.Option(...),
    metrics: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    m = run(load_params(params), export, adapter, base, formatted, validated, out)
    atomic_write_json(metrics, m)
    if not m["written"]:
        typer.echo(f"gguf: {m['reason']}")
        return
    for name, r in m["llama_cpp"].items():
        acc = f", accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
        typer.echo(f"gguf: {name} ({m['files'][name]['bytes'] / 2**20:.0f} MiB): answers as PyTorch on "
                   f"{r['answer_agreement']:.0%}, logits within {r['max_abs_logit_diff']:.2g}{acc}")
    typer.echo(f"gguf: llama.cpp tokenizes all {m['token_rows']} validation prompts as training -> {out}")


if __name__ == "__main__":
    entry(main)
