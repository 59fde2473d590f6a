"""Speed benchmark: this project's train and evaluate stages against the baselines users would
otherwise run, on the same model, data, LoRA settings and number of optimisation steps.

Training variants (each in its own subprocess, so peak RSS is its own):
  a  tutorial recipe: HF Trainer, every row padded to 512 (`padding="max_length"`), loss on all tokens, fp32
  b  well-set HF Trainer: dynamic padding, `group_by_length`, loss on the response only, bf16
  c  TRL SFTTrainer with its defaults for prompt/completion data (completion-only loss), bf16
  e  c with `padding_free=True` (each batch flattened into one sequence, position ids restarting per row)
  f  c with `packing=True` (best-fit decreasing into sequences of batch size x the mean row length, one
     sequence per step, so a step holds about as many rows as the others' batches)
  d  this project's train stage (the SFT recipe as `fit` sets it up), bf16, in a process set up as the stage program
     sets itself up (`train.allocator` preloaded, bitsandbytes skipped when the params need none)
  s  d on the system allocator (`train.allocator: system`: glibc's malloc, as tuned by the stage)
  g  b on mimalloc (preloaded as the stage preloads it): how much of d's lead is the allocator
  x  c on mimalloc (the TRL baseline on the stage's allocator)
  u  d with mimalloc handing freed memory back to the OS after 10 ms (its default; the stage keeps it)
  w  d with its OpenMP threads always spinning before they sleep (libgomp's default)
  v  d with its OpenMP threads always asleep at once (the stage chooses one of the two at its start: docs/speed.md)
  p  d with `train.shared_prefix: false` (left-padded batches: what the shared prefix saves)
  l  d with `train.lean: false` (frozen weights cast on every call, fp32 dropout masks, eager attention and
     MLP activations kept: what pipeline/core/lean.py saves)
  t  d with `train.max_batch_tokens: --budget` (1024: every batch of 16 rows longer than 64 tokens in two
     passes or more: memory against speed)
  k  d packed instead (`train.packing: true`, `shared_prefix: false`; attention `auto`: on CPU eager with a
     block-diagonal mask, on a GPU one flat sequence through torch's flash varlen kernel)
  m  k with `train.attn_implementation: sdpa` (on a GPU: the block-diagonal mask instead of varlen)
  q  d with QLoRA (4-bit NF4), for memory
LoRA as the project's default (r=16, alpha 32, dropout 0.05, q/k/v/o). Every trained adapter is saved,
loaded again onto a fresh fp32 base, and scored the same way: mean response-token loss on held-out rows.
Also: MFU of d against a matmul peak measured in the same run, evaluation by label scoring vs
free generation, batched vs per-row tokenization, and `dvc repro` with nothing to do.

Inputs: the base model folder (`dvc repro base`), ../shared/datasets/financial_phrasebank.
Outputs: bench/results/train_throughput/<name>.{json,md} (`--name`, else from variants, steps and seeds).
Run: `make bench` (or `python -m bench.train_throughput --steps 12`). `--seeds 1,2,3` trains every
variant once per seed (data order, dropout and LoRA init) and reports the mean and spread: one seed
cannot tell a better recipe from a luckier data order. An interrupted run, started again with the same
arguments (or more variants), keeps the (variant, seed) results it had finished (<out>/runs/) and trains the rest.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from bench.machine import cpu_name
from pipeline.core import encoding, modeling
from pipeline.core.allocator import SLEEP, SPIN
from pipeline.core.encoding import IGNORE
from pipeline.core.io import read_jsonl
from pipeline.core.loading import load_tokenizer
from pipeline.core.modeling import batches, left_pad, response_width, token_logprobs
from pipeline.core.params import parse_params
from pipeline.stages import format as fmt
from pipeline.stages import tokenize as tkz
from pipeline.stages import validate

ROOT = Path(__file__).resolve().parents[1]



def committed_params() -> tuple[dict, str]:
    """The project's default params: params.yaml as committed at HEAD, and that commit. What the workspace holds
    (a `dvc exp run`, a profile copied over it, an edit) does not change what a bench run measures; outside a git
    checkout, the file itself ("workspace")."""
    git = ["git", "-C", str(ROOT)]
    show = subprocess.run(git + ["show", "HEAD:params.yaml"], capture_output=True, text=True)
    if show.returncode:
        return yaml.safe_load((ROOT / "params.yaml").read_text()), "workspace"
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return yaml.safe_load(show.stdout), head


# the run's settings are the committed params.yaml's with the case's prompt (a bench run is params overrides:
# bench_params); the baselines take the same LoRA, learning rate, warm-up and schedule from it
PARAMS, PARAMS_COMMIT = committed_params()
# the prompt shapes a run is measured on (`--case`), whatever the params hold: the default job's chat prompt (the
# chat template's system prompt: a long prefix every row shares) and the short plain prompt of the fpb-fast profile
CASES = {"chat": {"template": "prompts/sentiment.jinja", "chat_template": True, "system_prompt": None},
         "short": {"template": "prompts/sentiment_short.jinja", "chat_template": False, "system_prompt": None}}
# a competing process: one core kept busy until killed, or the deadline (its argument, seconds) passes
BUSY = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"
LORA, LR, WARMUP = PARAMS["train"]["lora"], PARAMS["train"]["lr"], PARAMS["train"]["warmup_ratio"]
SCHEDULE = PARAMS["train"]["lr_scheduler"]
NAMES = {"a": "HF Trainer, pad to 512 (tutorial)", "b": "HF Trainer, dynamic padding + group_by_length",
         "c": "TRL SFTTrainer (completion only)", "d": "peftflow train stage",
         "e": "TRL SFTTrainer, padding_free", "f": "TRL SFTTrainer, packing (bfd)",
         "p": "peftflow train stage, padded (train.shared_prefix false)",
         "l": "peftflow train stage, train.lean false",
         "t": "peftflow train stage, train.max_batch_tokens --budget", "q": "peftflow train stage, QLoRA 4-bit",
         "k": "peftflow train stage, packing", "m": "peftflow train stage, packing, sdpa mask",
         "s": "peftflow train stage, train.allocator system (glibc)", "g": "HF Trainer as b, on mimalloc",
         "u": "peftflow train stage, mimalloc purging freed memory after 10 ms",
         "w": "peftflow train stage, OpenMP threads always spinning",
         "v": "peftflow train stage, OpenMP threads always asleep", "x": "TRL SFTTrainer as c, on mimalloc"}
STAGE = "dpltkmqsuwv"  # the variants that run the train stage (the others are the baselines)
# the stage's variants whose OpenMP threads wait as set here, not as the stage chooses at its start (thread_env)
WAITING = {"w": {"GOMP_SPINCOUNT": SPIN}, "v": {"GOMP_SPINCOUNT": SLEEP}}
# else: the stage's variants params.yaml's allocator, the baselines the system's
ALLOCATOR = {"s": "system", "g": "mimalloc", "x": "mimalloc"}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- shared data (main process)

def bench_params(args, quantization: dict | None = None, **train):
    """params.yaml with the run's shape (data, steps, batch, seed, no checkpoints) and the variant's keys."""
    raw = copy.deepcopy(PARAMS)
    raw["format"] |= CASES[getattr(args, "case", "chat")]
    if getattr(args, "template", None):  # bench.accuracy_curve --template: another prompt in the case's place
        raw["format"]["template"] = args.template
    raw["data"] = {"train": str(args.data / "train.jsonl"), "validation": str(args.data / "validation.jsonl"),
                   "license": f"see {args.data / 'LICENSE.txt'}"}  # the data's own (shared/datasets/*/README.md)
    raw["train"] |= {"method": "lora", "max_steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": 0,
                     "log_every": max(1, args.steps // 4), "quantization": quantization, **train}
    raw["seed"] = args.seed
    return parse_params(raw)


def prepare(args, work: Path) -> None:
    """validate -> format -> tokenize the benchmark data once, with the project's own stages."""
    p = bench_params(args)
    validate.run(p, Path(p.data.train), Path(p.data.validation), work / "validated", work / "validate.json")
    fmt.run(p, work / "validated", ROOT / p.format.template, args.base, work / "formatted")
    tkz.run(p, work / "formatted", args.base, work / "tokenized")


# ---------------------------------------------------------------- workers (one subprocess each)

def load_lora_model(base: Path, attn: str | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True, **kw)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


class Counting:
    """A data collator wrapper that counts the non-pad tokens it hands to the trainer."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")  # padding-free batches have none: every token is real
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch


def train_args(args, out: Path, bf16: bool, **extra) -> dict:
    return dict(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                learning_rate=LR, warmup_steps=int(WARMUP * args.steps), lr_scheduler_type=SCHEDULE,
                weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                seed=args.seed, data_seed=args.seed, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                dataloader_num_workers=0, disable_tqdm=True, **extra)


def run_trainer(trainer, counter) -> dict:
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "tokens": counter.tokens, "final_train_loss": losses[-1]}


def worker_a(args, work: Path) -> tuple:
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = load_tokenizer(args.base)
    rows = read_jsonl(work / "formatted" / "train.jsonl")
    texts = [r["prompt"] + r["response"] + tok.eos_token for r in rows]
    ds = Dataset.from_dict(dict(tok(texts, padding="max_length", max_length=512, truncation=True)))
    model = load_lora_model(args.base)
    counter = Counting(DataCollatorForLanguageModeling(tok, mlm=False))
    trainer = Trainer(model=model, args=TrainingArguments(**train_args(args, work / "a", bf16=False)),
                      train_dataset=ds, data_collator=counter)
    return model, run_trainer(trainer, counter)


def worker_b(args, work: Path) -> tuple:
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = load_tokenizer(args.base)
    ds = load_from_disk(str(work / "tokenized" / "train")).select_columns(["input_ids", "labels", "length"])
    ds = ds.map(lambda r: {"attention_mask": [1] * len(r["input_ids"])})
    model = load_lora_model(args.base)
    counter = Counting(DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE))
    trainer = Trainer(model=model, args=TrainingArguments(**train_args(args, work / "b", bf16=True,
                                                                       train_sampling_strategy="group_by_length")),
                      train_dataset=ds, data_collator=counter)
    return model, run_trainer(trainer, counter)


def worker_c(args, work: Path, name: str = "c", **sft) -> tuple:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = load_tokenizer(args.base)
    rows = read_jsonl(work / "formatted" / "train.jsonl")
    ds = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "completion": [r["response"] for r in rows]})
    model = load_lora_model(args.base)
    config = train_args(args, work / name, bf16=True) | sft
    trainer = SFTTrainer(model=model, args=SFTConfig(**config), train_dataset=ds, processing_class=tok)
    counter = Counting(trainer.data_collator)
    trainer.data_collator = counter
    return model, run_trainer(trainer, counter)


def worker_x(args, work: Path) -> tuple:
    return worker_c(args, work, "x")


def worker_e(args, work: Path) -> tuple:
    return worker_c(args, work, "e", padding_free=True, max_length=None)  # rows are at most 256 tokens


def worker_f(args, work: Path) -> tuple:
    tokens = json.loads((work / "tokenized" / "tokenize.json").read_text())["train"]
    width = round(args.batch_size * tokens["tokens"] / tokens["kept"])
    return worker_c(args, work, "f", packing=True, packing_strategy="bfd", max_length=width,
                    per_device_train_batch_size=1)


def fit(p, data: Path, base_dir: Path, live: Path, ckpt: Path, after_step=None) -> tuple:
    """The train stage's SFT run (pipeline/recipes/sft.py) as the stage sets it up, without saving an adapter:
    the trained model, its metrics and the run facts. `after_step(recipe, seconds, (loss, tokens))`, if given,
    is called after each optimizer step with that step's own seconds (the hook's own time is not counted in them)."""
    from pipeline import methods
    from pipeline.core.allocator import peak_rss_mb
    from pipeline.recipes import sft

    method = methods.get(p.train.method)
    fingerprint = sft.fingerprint(p.model_dump(by_alias=True), data, base_dir)
    recipe = sft.SFT(p.train, p.seed, p.deterministic, method, fingerprint)
    recipe.setup(data, base_dir, live, ckpt)
    if after_step is not None:
        step = recipe.step

        def timed(micro):
            t0 = time.perf_counter()
            out = step(micro)
            after_step(recipe, time.perf_counter() - t0, out)
            return out

        recipe.step = timed
    metrics, facts = recipe.train()
    recipe.log.end(metrics)
    return recipe.model, metrics, {**facts, "peak_rss_mb": peak_rss_mb()}


def worker_d(args, work: Path, quantization: dict | None = None, name: str = "d", **train) -> tuple:
    p = bench_params(args, quantization, **train)
    model, m, facts = fit(p, work / "tokenized", args.base, work / name / "live", work / name / "ckpt")
    return model, {"seconds": facts["seconds"], "tokens": facts["tokens"], "final_train_loss": m["final_loss"]}


def worker_s(args, work: Path) -> tuple:
    return worker_d(args, work, None, "s", allocator="system")


def worker_u(args, work: Path) -> tuple:
    return worker_d(args, work, None, "u")


def worker_w(args, work: Path) -> tuple:
    return worker_d(args, work, None, "w")


def worker_v(args, work: Path) -> tuple:
    return worker_d(args, work, None, "v")


def worker_g(args, work: Path) -> tuple:
    return worker_b(args, work)


def worker_p(args, work: Path) -> tuple:
    return worker_d(args, work, None, "p", shared_prefix=False)


def worker_l(args, work: Path) -> tuple:
    return worker_d(args, work, None, "l", lean=False)


def worker_t(args, work: Path) -> tuple:
    return worker_d(args, work, None, "t", max_batch_tokens=args.budget)


def worker_k(args, work: Path) -> tuple:
    return worker_d(args, work, None, "k", packing=True, shared_prefix=False)


def worker_m(args, work: Path) -> tuple:
    return worker_d(args, work, None, "m", packing=True, shared_prefix=False, attn_implementation="sdpa")


def worker_q(args, work: Path) -> tuple:
    return worker_d(args, work, name="q", quantization={
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16"})


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
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.core.modeling import autocast

    model.train()
    batch = left_pad(rows, 0, next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        with autocast("bf16", batch["input_ids"].device):
            logp, mask = token_logprobs(model, batch, response_width(rows))
        (-logp.sum() / mask.sum()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / int(batch["attention_mask"].sum())


def setup_process(name: str, args, work: Path) -> None:
    """The worker's process as the variant's users get it: the train stage's variants as the stage program
    sets itself up (its allocator preloaded and its thread settings, which re-executes this worker once;
    bitsandbytes skipped unless the variant quantizes), the baselines on the system allocator (g, x: on mimalloc)
    with OpenMP's defaults."""
    from pipeline.core.allocator import preload_allocator, thread_env
    from pipeline.core.stage import without_bitsandbytes

    stage = PARAMS["train"]["allocator"]  # not bench_params: checking params imports PEFT
    if name == "u":
        os.environ["MIMALLOC_PURGE_DELAY"] = "10"  # mimalloc's default; an explicit setting wins over the stage's
    # the stage's variants with its thread settings too, the baselines as their users run them
    own = (WAITING[name] if name in WAITING else thread_env()) if name in STAGE else {}
    preload_allocator(ALLOCATOR.get(name, stage if name in STAGE else "system"), own)
    if name in STAGE and name != "q":
        without_bitsandbytes(None, "adamw")


def worker(name: str, args, work: Path) -> None:
    setup_process(name, args, work)
    from datasets import load_from_disk
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.core.allocator import allocator_in_use, thread_facts

    torch.manual_seed(args.seed)
    model, result = globals()[f"worker_{name}"](args, work)
    result["peak_rss_mb"] = round(rss_mb())
    result |= {"allocator": allocator_in_use(), **thread_facts()}  # how the worker's process ran
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    adapter = work / name / "adapter"
    model.save_pretrained(str(adapter))
    del model  # scored as a user would load it: the adapter on a fresh fp32 base (a trained model may be lean)
    fresh = AutoModelForCausalLM.from_pretrained(str(args.base), use_safetensors=True).to(modeling.device())
    model = PeftModel.from_pretrained(fresh, str(adapter), is_trainable=True)  # trainable: FLOPs of a train step
    validation = load_from_disk(str(work / "tokenized" / "validation"))
    held = [{"input_ids": r["input_ids"], "labels": r["labels"]}
            for r in validation.select(range(min(args.heldout, len(validation))))]
    result["heldout_loss"] = heldout_loss(model, held)
    if name == "d":
        result["flops_per_token"] = flops_per_token(model, held[: args.batch_size])
    (work / f"{name}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- evaluation, tokenize, dvc

def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.time()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.time() - t0)


def generate_labels(model, tok, rows: list[dict], labels: list[str], batch_size: int) -> list[str | None]:
    """The baseline: greedy generation (8 tokens), the label the answer names first (the evaluate stage's
    `generate` rule)."""
    from pipeline.core.scoring import generate_many
    from pipeline.tasks.classification import parse_label

    answers = generate_many(model, tok, [r["prompt"] for r in rows], 8, batch_size)
    picks = [parse_label(a, r["choices"], labels) for a, r in zip(answers, rows, strict=True)]
    return [labels[k] if k is not None else None for k in picks]


def bench_evaluate(args, work: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.core.scoring import choice_scores

    tok = load_tokenizer(args.base)
    labels = ["negative", "neutral", "positive"]
    rows = read_jsonl(work / "formatted" / "validation.jsonl")[: args.eval_rows]
    model = AutoModelForCausalLM.from_pretrained(str(args.base), use_safetensors=True)
    model = PeftModel.from_pretrained(model, str(work / "d" / "adapter")).eval()
    truth = [r["label"] for r in rows]

    def compare() -> dict:
        t0 = time.time()
        scored = [labels[i] for i in choice_scores(model, tok, rows, 32).argmax(1)]
        t_score = time.time() - t0
        t0 = time.time()
        generated = generate_labels(model, tok, rows, labels, 32)
        t_gen = time.time() - t0
        return {"score_seconds": t_score, "generate_seconds": t_gen,
                "score_accuracy": sum(a == b for a, b in zip(scored, truth, strict=True)) / len(rows),
                "generate_accuracy": sum(a == b for a, b in zip(generated, truth, strict=True)) / len(rows),
                "generate_unparsed": sum(g is None for g in generated),
                "agreement": sum(a == b for a, b in zip(scored, generated, strict=True)) / len(rows)}

    result = {"rows": len(rows), "adapter": compare()}
    with model.disable_adapter():
        result["base"] = compare()
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


# ---------------------------------------------------------------- report

def table(res: dict) -> str:
    d = res["train"]["d"]
    gpu = any("peak_gpu_mb" in r for r in res["train"].values())
    seeds = res.get("seeds", [42])
    many = len(seeds) > 1
    case = res.get("case")
    prompt = (f"; prompt `{case}` ({res['prompt']['template']}, chat template "
              f"{'on' if res['prompt']['chat_template'] else 'off'}, {res['tokens_per_row']} tokens a row), "
              f"params.yaml of {res['params_commit']}" if case else "")
    lines = [f"Measured {res['date']} on {res['machine']}, torch {res['torch']}; SmolLM2-135M, Financial PhraseBank "
             f"train, LoRA r=16 alpha=32 q/k/v/o, batch {res['batch_size']}, {res['steps']} steps each{prompt}"
             + (f"; every figure is the mean over seeds {', '.join(map(str, seeds))} (± sample standard deviation), "
                "but peak RSS, the largest of the seeds'."
                if many else "."), "",
             "| variant | non-pad tok/s | s/epoch | peak RSS MB | final train loss | held-out loss | d speed-up |"
             + (" peak GPU MB |" if gpu else ""), "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]

    names = {k: v.replace("--budget", str(res.get("budget", 1024))) for k, v in NAMES.items()}

    def loss(r: dict, k: str) -> str:
        return f"{r[k]:.3f} ± {r[k + '_sd']:.3f}" if many else f"{r[k]:.3f}"

    for k, r in res["train"].items():
        if "error" in r:
            lines.append(f"| {k}: {names[k]} | failed: {r['error']} | | | | | |" + (" |" if gpu else ""))
            continue
        ratio = d["tokens_per_second"] / r["tokens_per_second"]
        lines.append(f"| {k}: {names[k]} | {r['tokens_per_second']:.0f} | {r['seconds_per_epoch']:.0f} | "
                     f"{r['peak_rss_mb']} | {loss(r, 'final_train_loss')} | {loss(r, 'heldout_loss')} | {ratio:.2f}x |"
                     + (f" {r.get('peak_gpu_mb', '')} |" if gpu else ""))
    lines += loaded_table(res)
    lines += ran_lines(res)
    if many:
        lines += ["", "Per seed, held-out loss: " + "; ".join(
            f"{k}: " + ", ".join(f"{x['heldout_loss']:.3f}" for x in r["per_seed"].values())
            for k, r in res["train"].items() if "per_seed" in r) + "."]
    if "mfu" not in res:
        return "\n".join(lines) + "\n"
    m, t, v = res["mfu"], res["tokenize"], res["dvc"]
    lines += ["", f"- MFU of d: {m['achieved_gflops']:.0f} GFLOP/s achieved (torch-counted FLOPs) = "
              f"{m['mfu_bf16']:.1%} of the measured bf16 matmul peak ({m['peak_bf16_gflops']:.0f} GFLOP/s; "
              f"fp32 peak {m['peak_fp32_gflops']:.0f}).",
              f"- Tokenize {t['rows']} rows: batched {t['batched_rows_per_second']:.0f} rows/s vs per row "
              f"{t['per_row_rows_per_second']:.0f} rows/s = "
              f"{t['batched_rows_per_second'] / t['per_row_rows_per_second']:.1f}x (identical ids).",
              "- `dvc repro` with nothing to do: " + (f"{v['repro_noop_seconds']:.2f} s (best of 3)"
                                                      if "repro_noop_seconds" in v else v["skipped"]) + "."]
    for who, e in ((k, res["evaluate"][k]) for k in ("adapter", "base")):
        lines.append(f"- Evaluate {res['evaluate']['rows']} validation rows, {who}: label scoring "
                     f"{e['score_seconds']:.1f} s vs greedy generation (up to 8 tokens) {e['generate_seconds']:.1f} s "
                     f"= {e['generate_seconds'] / e['score_seconds']:.2f}x; accuracy {e['score_accuracy']:.3f} vs "
                     f"{e['generate_accuracy']:.3f} ({e['generate_unparsed']} unparseable answers), predictions agree "
                     f"on {e['agreement']:.1%}.")
    return "\n".join(lines) + "\n"


def ran_lines(res: dict) -> list[str]:
    """How each variant's process ran (its last seed's record), and what the stage chose under load where that
    differs from what it chose alone."""
    def last(r: dict) -> dict:
        return list(r.get("per_seed", {}).values())[-1] if r.get("per_seed") else {}

    ran = {k: last(r) for k, r in res["train"].items() if "threads" in last(r)}
    if not ran:
        return []
    chose = [f"{k} beside {level} busy: {how_ran(last(r))}" for level, out in sorted(res.get("loaded", {}).items())
             for k, r in out.items() if k in STAGE and k in ran and how_ran(last(r)) != how_ran(ran[k])]
    return (["", "How each ran: " + "; ".join(f"{k}: {how_ran(r)}" for k, r in ran.items()) + "."]
            + (["", "Under load: " + "; ".join(chose) + "."] if chose else []))


def how_ran(r: dict) -> str:
    """A worker's process settings as it recorded them: allocator, threads, how OpenMP's threads waited."""
    return (f"{r.get('allocator')}, {r.get('threads')} threads, OpenMP waiting {r.get('omp_wait_policy') or 'default'}"
            + (f", GOMP_SPINCOUNT={r['gomp_spincount']}" if r.get("gomp_spincount") else ""))


def loaded_table(res: dict) -> list[str]:
    """Tokens/s beside busy processes against tokens/s alone, per variant (the same seeds): how a variant's speed
    holds up on a machine others use."""
    if not res.get("loaded"):
        return []
    levels = sorted(res["loaded"], key=int)
    lines = ["", "Beside busy processes (each keeps one core busy for the whole run; tok/s, and as a share of the "
             "variant's tok/s alone):", "",
             "| variant | alone | " + " | ".join(f"{k} busy" for k in levels) + " |",
             "|---|---:|" + "---:|" * len(levels)]
    for name, alone in res["train"].items():
        if "tokens_per_second" not in alone:
            continue
        cells = []
        for k in levels:
            r = res["loaded"][k].get(name)
            cells.append("not run" if r is None else "failed" if "tokens_per_second" not in r else
                         f"{r['tokens_per_second']:.0f} ({r['tokens_per_second'] / alone['tokens_per_second']:.2f})")
        lines.append(f"| {name}: {NAMES[name]} | {alone['tokens_per_second']:.0f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=64, help="validation rows for the held-out loss")
    ap.add_argument("--eval-rows", type=int, default=150)
    ap.add_argument("--variants", default="abcdq")
    ap.add_argument("--budget", type=int, default=1024, help="variant t's train.max_batch_tokens")
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "financial_phrasebank")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", help="the result's name under <out>/train_throughput/ (default: from the flags)")
    ap.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)  # one worker's seed (from --seeds)
    ap.add_argument("--seeds", default="42", help="comma-separated; each variant trains once per seed")
    ap.add_argument("--case", choices=sorted(CASES), default="chat",
                    help="the prompt: chat (the default job's, chat template) or short (fpb-fast's plain prompt)")
    ap.add_argument("--busy", default="0", help="comma-separated numbers of competing busy processes, e.g. 0,1,2: "
                    "every variant and seed runs beside each number (0: alone)")
    ap.add_argument("--busy-variants", default=None,
                    help="the variants that also run under load (default: all; e.g. dg: TRL only alone, it is slow)")
    ap.add_argument("--busy-limit", type=float, default=3600, help="a busy process's longest life, seconds")
    ap.add_argument("--only-train", action="store_true",
                    help="training variants only (no MFU, evaluate, tokenize, dvc)")
    ap.add_argument("--dvc-only", action="store_true", help="only redo the no-op `dvc repro` timing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args, args.work)
    if args.dvc_only:
        res = json.loads((args.out / "train_throughput.json").read_text())
        res["dvc"] = bench_dvc()
        (args.out / "train_throughput.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "train_throughput.md").write_text(table(res))
        return print(table(res))

    with tempfile.TemporaryDirectory(prefix="peftflow-bench-") as tmp:
        work = Path(tmp)
        prepare(args, work)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        res = {"date": date.today().isoformat(), "machine": f"{cpu_name()}, "
               f"{torch.get_num_threads()} threads, " + (f"cuda ({gpu})" if gpu else "cpu"),
               "torch": torch.__version__, "steps": args.steps, "batch_size": args.batch_size, "budget": args.budget,
               "train": {}}
        tokenized = json.loads((work / "tokenized" / "tokenize.json").read_text())["train"]
        epoch_tokens = tokenized["tokens"]
        seeds = [int(x) for x in args.seeds.split(",")]
        levels = [int(x) for x in args.busy.split(",")]
        res |= {"seeds": seeds, "case": args.case, "prompt": CASES[args.case], "params_commit": PARAMS_COMMIT,
                "tokens_per_row": round(epoch_tokens / tokenized["kept"], 1), "busy": levels,
                "params": bench_params(args).model_dump(by_alias=True)}
        res["train"], loaded = train_variants(args, work, seeds, levels, epoch_tokens)
        if loaded:
            res["loaded"] = loaded
        d = res["train"].get("d", {})
        if "tokens_per_second" not in d:
            raise SystemExit("bench: the train stage variant (d) did not run; nothing to compare against")
        if args.only_train:
            return finish(args, res, result_name(args, full=False))
        peak16, peak32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
        achieved = d["flops_per_token"] * d["tokens_per_second"]
        res["mfu"] = {"achieved_gflops": achieved / 1e9, "peak_bf16_gflops": peak16 / 1e9,
                      "peak_fp32_gflops": peak32 / 1e9, "mfu_bf16": achieved / peak16}
        print("bench: evaluate, tokenize, dvc", file=sys.stderr, flush=True)
        res["evaluate"] = bench_evaluate(args, work)
        res["tokenize"] = bench_tokenize(args, work)
    res["dvc"] = bench_dvc()
    finish(args, res, result_name(args, full=True))


def train_variants(args, work: Path, seeds: list[int], levels: list[int], epoch_tokens: int) -> tuple[dict, dict]:
    """Every variant, seed and load level (`--busy`; `--busy-variants` alone run under load), seed by seed, each
    load level, every variant in turn, so a slow hour of the shared machine falls on all: per variant its summary
    over the seeds or its error, alone, and per load level ("1", "2", ...)."""
    loaded = args.busy_variants or args.variants
    runs: dict[int, dict[str, dict]] = {k: {name: {} for name in args.variants if not k or name in loaded}
                                        for k in levels}
    failed: dict[int, dict[str, dict]] = {k: {} for k in levels}
    for seed in seeds:
        for busy in levels:
            for name in runs[busy]:
                if name in failed[busy]:
                    continue
                label = NAMES[name].replace('--budget', str(args.budget))
                print(f"bench: training variant {name} ({label}), seed {seed}, beside {busy} busy processes",
                      file=sys.stderr, flush=True)
                r = resumed_or_run(name, args, work, seed, busy)
                if "error" in r:
                    failed[busy][name] = r
                    continue
                r["tokens_per_second"] = r["tokens"] / r["seconds"]
                r["seconds_per_epoch"] = epoch_tokens / r["tokens_per_second"]
                runs[busy][name][seed] = r
                print(f"bench: {name} seed {seed} busy {busy}: {r['tokens_per_second']:.0f} tok/s, held-out loss "
                      f"{r['heldout_loss']:.4f}, " + ", ".join(f"{k} {r[k]}" for k in r if k.startswith("peak")),
                      file=sys.stderr, flush=True)
    out = {busy: {name: failed[busy].get(name) or summarize(runs[busy][name]) for name in runs[busy]}
           for busy in levels}
    return out.get(0, {}), {str(k): v for k, v in out.items() if k}


def resumed_or_run(name: str, args, work: Path, seed: int, busy: int = 0) -> dict:
    """A (variant, seed, load) result kept under <out>/runs/ by an interrupted run with the same settings, or a
    fresh one (kept there as soon as it ends; git ignores runs/, delete it to start afresh after a code change)."""
    settings = {k: str(v) for k, v in sorted(worker_args(args).items()) if k not in ("variants", "out", "seed")}
    kept = args.out / "runs" / f"{args.case}-{name}-{seed}{f'-busy{busy}' if busy else ''}.json"
    if kept.exists() and (old := json.loads(kept.read_text()))["settings"] == settings:
        print(f"bench: {name} seed {seed}: kept from the interrupted run of {old['finished']}", file=sys.stderr)
        return old["result"]
    r = run_worker(name, args, work, seed, busy)
    if "error" not in r:
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps({"settings": settings, "finished": time.strftime("%Y-%m-%d %H:%M"),
                                    "result": r}, indent=2) + "\n")
    return r


def run_worker(name: str, args, work: Path, seed: int, busy: int = 0) -> dict:
    """One training variant in its own process (its own peak RSS), beside `busy` processes that each keep a core
    busy from before it starts until it ends (or `--busy-limit` seconds pass); its result, or its error."""
    forward = worker_args(args)
    cmd = [sys.executable, "-m", "bench.train_throughput", "--worker", name, "--work", str(work), f"--seed={seed}"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in forward.items() if k != "seed"]
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY, str(args.busy_limit)]) for _ in range(busy)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads((work / f"{name}.json").read_text())


def worker_args(args) -> dict:
    """The command-line arguments a worker process is given (the run's own: its seed list, mode, worker)."""
    own = ("worker", "work", "dvc_only", "only_train", "seeds", "name", "busy", "busy_limit", "busy_variants")
    return {k: v for k, v in vars(args).items() if k not in own}


def summarize(runs: dict[int, dict]) -> dict:
    """Mean of each figure over the seeds, the per-seed results kept; sample standard deviation of the losses."""
    keys = ("seconds", "tokens", "tokens_per_second", "seconds_per_epoch", "final_train_loss", "heldout_loss")
    out = {k: statistics.fmean(r[k] for r in runs.values()) for k in keys}
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs.values())
    if all("peak_gpu_mb" in r for r in runs.values()):
        out["peak_gpu_mb"] = max(r["peak_gpu_mb"] for r in runs.values())
    for k in ("final_train_loss", "heldout_loss"):
        out[f"{k}_sd"] = statistics.stdev(r[k] for r in runs.values()) if len(runs) > 1 else 0.0
    if all("flops_per_token" in r for r in runs.values()):
        out["flops_per_token"] = statistics.fmean(r["flops_per_token"] for r in runs.values())
    out["per_seed"] = runs
    return out


def result_name(args, full: bool) -> str:
    """What the run measured, as its result's name: `--name`, else variants, steps and seeds
    (`dbg_48_steps_3_seeds`), `_all` with the evaluation, tokenization and dvc figures."""
    if args.name:
        return args.name
    seeds = len(args.seeds.split(","))
    name = f"{args.case}_{args.variants}_{args.steps}_steps_{seeds}_seed{'s' if seeds > 1 else ''}"
    name += f"_busy_{args.busy.replace(',', '_')}" if args.busy != "0" else ""
    return name + ("_budget_" + str(args.budget) if "t" in args.variants else "") + ("_all" if full else "")


def finish(args, res: dict, stem: str) -> None:
    """bench/results/train_throughput/<stem>.{json,md}, the machine and date inside."""
    out = args.out / "train_throughput"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table(res))
    print(f"bench: -> {out / stem}.md", file=sys.stderr)
    print(table(res))


if __name__ == "__main__":
    main()
