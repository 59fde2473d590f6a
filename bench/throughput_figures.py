"""The figures bench.train_throughput gives beside tokens/s: the held-out loss every variant is scored by, the
train step's FLOPs (MFU against a matmul peak measured in the same run), evaluation by label scoring against
free generation, batched against per-row tokenization, and `dvc repro` with nothing to do.

Inputs: the base model folder, the data `bench.stage_run.prepare` left in the work folder, the trained adapter of
variant d (`<work>/d/adapter`). Outputs: dicts for the run's JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from bench.stage_process import ROOT
from pipeline.core import encoding
from pipeline.core.io import read_jsonl
from pipeline.core.loading import load_tokenizer
from pipeline.core.modeling import autocast, batches, left_pad, response_width, token_logprobs
from pipeline.core.scoring import choice_logprobs, generate_many
from pipeline.tasks.classification import parse_label

LABELS = ["negative", "neutral", "positive"]


@torch.no_grad()
def heldout_loss(model, rows: list[dict]) -> float:
    """Mean response-token loss on held-out rows, fp32, computed the same way for every variant."""
    model.eval()
    dev = next(model.parameters()).device
    total, n = 0.0, 0
    for chunk in batches(rows, 16):
        logp, mask = token_logprobs(model, left_pad(chunk, 0, dev), response_width(chunk))
        total, n = total - float(logp.sum()), n + int(mask.sum())
    return total / n


def flops_per_token(model, rows: list[dict]) -> float:
    """FLOPs of one forward + backward of the train stage's step, counted by torch, per non-pad token."""
    model.train()
    batch = left_pad(rows, 0, next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        with autocast("bf16", batch["input_ids"].device):
            logp, mask = token_logprobs(model, batch, response_width(rows))
        (-logp.sum() / mask.sum()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / int(batch["attention_mask"].sum())


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.time()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.time() - t0)


def mfu(d: dict) -> dict:
    """Variant d's achieved FLOP/s (torch-counted FLOPs x its tokens/s) against the bf16 and fp32 matmul peaks."""
    peak16, peak32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    achieved = d["flops_per_token"] * d["tokens_per_second"]
    return {"achieved_gflops": achieved / 1e9, "peak_bf16_gflops": peak16 / 1e9, "peak_fp32_gflops": peak32 / 1e9,
            "mfu_bf16": achieved / peak16}


def generate_labels(model, tok, rows: list[dict], batch_size: int) -> list[str | None]:
    """The baseline: greedy generation (8 tokens), the label the answer names first (the evaluate stage's
    `generate` rule)."""
    answers = generate_many(model, tok, [r["prompt"] for r in rows], 8, batch_size)
    picks = [parse_label(a, r["choices"], LABELS) for a, r in zip(answers, rows, strict=True)]
    return [LABELS[k] if k is not None else None for k in picks]


def compare_rules(model, tok, rows: list[dict]) -> dict:
    """Label scoring against greedy generation on `rows`: seconds, accuracy, unparsed answers, agreement."""
    truth = [r["label"] for r in rows]
    t0 = time.time()
    scored = [LABELS[i] for i in choice_logprobs(model, tok, rows, 32).total.argmax(1)]
    t_score = time.time() - t0
    t0 = time.time()
    generated = generate_labels(model, tok, rows, 32)
    t_gen = time.time() - t0
    return {"score_seconds": t_score, "generate_seconds": t_gen,
            "score_accuracy": sum(a == b for a, b in zip(scored, truth, strict=True)) / len(rows),
            "generate_accuracy": sum(a == b for a, b in zip(generated, truth, strict=True)) / len(rows),
            "generate_unparsed": sum(g is None for g in generated),
            "agreement": sum(a == b for a, b in zip(scored, generated, strict=True)) / len(rows)}


def bench_evaluate(args, work: Path) -> dict:
    """Both rules on `--eval-rows` validation rows, with variant d's adapter and without it (the base)."""
    tok = load_tokenizer(args.base)
    rows = read_jsonl(work / "formatted" / "validation.jsonl")[: args.eval_rows]
    model = AutoModelForCausalLM.from_pretrained(str(args.base), use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(work / "d" / "adapter")).eval()
    result = {"rows": len(rows), "adapter": compare_rules(model, tok, rows)}
    with model.disable_adapter():
        result["base"] = compare_rules(model, tok, rows)
    return result


def bench_tokenize(args, work: Path) -> dict:
    tok = load_tokenizer(args.base)
    rows = read_jsonl(work / "formatted" / "train.jsonl")
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    t_one, t_many = [], []
    for _ in range(5):  # alternate, keep the best of five: the calls take well under a second
        t0 = time.time()
        one = [encoding.encode(tok, pr, rs, 256, "response") for pr, rs in zip(prompts, responses, strict=True)]
        t_one.append(time.time() - t0)
        t0 = time.time()
        many = encoding.encode_many(tok, prompts, responses, 256, "response")
        t_many.append(time.time() - t0)
    assert one == many, "batched tokenization differs from per-row tokenization"
    return {"rows": len(rows), "per_row_rows_per_second": len(rows) / min(t_one),
            "batched_rows_per_second": len(rows) / min(t_many)}


def bench_dvc() -> dict:
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run(dvc + ["status", "--json"], cwd=ROOT, capture_output=True, text=True)
    if status.returncode or json.loads(status.stdout or "{}"):
        return {"skipped": "the workspace is not up to date (run `dvc repro` first)"}
    times = []
    for _ in range(3):
        t0 = time.time()
        subprocess.run(dvc + ["repro"], cwd=ROOT, check=True, capture_output=True)
        times.append(time.time() - t0)
    return {"repro_noop_seconds": min(times), "runs": [round(t, 2) for t in times]}
