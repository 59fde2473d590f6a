"""Train-step variants on this machine: which speed ideas win (one variant per process).

SmolLM2-135M + LoRA r=16 on q/v, 4 batches of 16 Financial PhraseBank rows rendered with the
sentiment template; one warm-up step, then the mean of 3 timed steps. Variants (joined by `-`):
`fp32` (else bf16 autocast), `eager` (else sdpa attention), `nodrop` (LoRA dropout 0 instead of
0.05), `basebf16` (frozen base weights stored in bf16), `compile` (torch.compile of the
decoder; the first step's compile time is printed), `prof` (print a torch profiler table instead).

Run: `python -m bench.step_variants bf16 bf16-eager bf16-eager-nodrop ...` (one line per variant).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from pipeline.core.encoding import encode_many
from pipeline.core.loading import load_tokenizer
from pipeline.core.modeling import autocast, left_pad, response_width, token_logprobs
from pipeline.core.prompting import Renderer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "financial_phrasebank" / "train.jsonl"


def one(variant: str) -> None:
    base = ROOT / "models" / "base"
    tok = load_tokenizer(base)
    r = Renderer.from_file(ROOT / "prompts" / "sentiment.jinja", tokenizer=tok, chat_template=True)
    labels = ["negative", "neutral", "positive"]
    rows = [{**json.loads(x), "labels": labels} for x in DATA.read_text().splitlines()[:64]]
    enc = encode_many(tok, [r.prompt(x) for x in rows], [r.response(x) for x in rows], 256, "response")
    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager" if "eager" in variant
                                                 else "sdpa")
    if "basebf16" in variant:
        model.to(torch.bfloat16)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0 if "nodrop" in variant else 0.05,
                        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    if "basebf16" in variant:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if "compile" in variant:
        inner = model.base_model.model.model
        inner.forward = torch.compile(inner.forward, dynamic=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    precision = "fp32" if "fp32" in variant else "bf16"
    dev = torch.device("cpu")

    def step(mb: list[dict]) -> None:
        batch = left_pad(mb, 0, dev)
        with autocast(precision, dev):
            logp, mask = token_logprobs(model, batch, response_width(mb))
        (-logp.sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad()

    batches = [enc[i : i + 16] for i in range(0, 64, 16)]
    t0 = time.time()
    step(batches[0])
    first = time.time() - t0
    if "prof" in variant:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches[1])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return
    t0, tokens = time.time(), 0
    for mb in batches[1:]:
        step(mb)
        tokens += sum(len(e["input_ids"]) for e in mb)
    seconds = time.time() - t0
    print(f"{variant}: {seconds / 3:.2f} s/step, {tokens / seconds:.0f} tok/s (first step {first:.1f} s)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        one(sys.argv[2])
    else:
        for v in sys.argv[1:] or ["bf16", "bf16-eager", "bf16-eager-nodrop", "fp32-eager", "basebf16-eager"]:
            subprocess.run([sys.executable, "-m", "bench.step_variants", "--one", v], cwd=ROOT, check=False)
