"""Where a train step's memory and time go: one process per variant of the train stage's step.

SmolLM2-135M (models/base, `dvc repro base`), LoRA r=16 alpha 32 dropout 0.05 on q/k/v/o, bf16 autocast,
batches of 16 Financial PhraseBank training rows rendered by the default template with the chat
template (the default job's prompt), grouped by length as the stage groups them. Each variant runs
one warm-up step and then `--steps` timed steps, in the layouts of pipeline/core/batching.py:

  padded        left-padded rows (the layout before shared prefixes)
  prefix        the rows' shared prefix once per batch (train.shared_prefix, the default)
  packed        rows packed into sequences no longer than the longest row (train.packing)
  ckpt          padded, with activation checkpointing on every decoder layer (train.activation_checkpointing;
                it turns the shared prefix off)
  lean          prefix, with train.lean (pipeline/core/lean.py: frozen weights held in bf16, 1-byte dropout
                masks, attention core and SwiGLU recomputed in backward) and the stage's allocator settings
                (pipeline.core.allocator.tune_allocator): the default job's step
  padded-lean   padded, with the same
  packed-varlen packed as one flat sequence with row boundaries (train.attn_implementation varlen; on CPU
                row by row, on CUDA torch's flash varlen kernel)
A `-sdpa` suffix loads sdpa attention instead of the CPU default, eager (what `auto` gives on a GPU).

Reported per variant: resident memory (RSS) after imports, after loading the model, after the adapter,
the step's peak RSS (VmHWM reset before the step), the bytes autograd saves for the backward pass
(counted by a saved-tensors hook, views counted by their storage once; what lean's own hooks keep, the
LoRA inputs, and what checkpoints keep is not seen there, the step's peak RSS includes it) and where
they were saved (the innermost line of model code), seconds per step and training tokens per second;
the ratios are against `padded` in the same run. Also the operators the step dispatches (forward, backward
and optimizer, counted by a TorchDispatchMode): on a GPU, where a 135M model's step is bound by launching
kernels rather than by arithmetic, that count sets the step time more than the FLOPs do.

Run: `python -m bench.step_memory` (about 3 minutes); writes
bench/results/step_memory/layouts_<class>_<steps>steps.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from bench.machine import class_tag, save, table
from bench.stage_process import LORA, LR  # the committed params.yaml's
from pipeline.core import batching, lean
from pipeline.core.encoding import encode_many
from pipeline.core.loading import load_base_model, load_tokenizer
from pipeline.core.modeling import autocast
from pipeline.core.prompting import Renderer
from pipeline.recipes.sft import plan_epoch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "financial_phrasebank" / "train.jsonl"
BASE = ROOT / "models" / "base"
VARIANTS = ["padded", "prefix", "packed", "ckpt", "lean", "padded-lean"]


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def encoded_rows(batch_size: int) -> list[dict]:
    """The first 32 batches' worth of training rows, rendered with the default chat prompt and tokenized."""
    tok = load_tokenizer(BASE)
    render = Renderer.from_file(ROOT / "prompts" / "sentiment.jinja", tokenizer=tok, chat_template=True)
    raw = [{**json.loads(x), "labels": ["negative", "neutral", "positive"]}
           for x in DATA.read_text().splitlines()[: batch_size * 32]]
    return encode_many(tok, [render.prompt(x) for x in raw], [render.response(x) for x in raw], 256, "response")


def lora_model(variant: str, facts: dict):
    """The base with `variant`'s attention, LoRA as the committed params, checkpointing or lean as it asks; the RSS
    after the model and after the adapter go into `facts`."""
    attn = "sdpa" if variant.endswith("-sdpa") else "varlen" if "varlen" in variant else "auto"
    torch.manual_seed(0)
    model = load_base_model(BASE, torch.device("cpu"), None, attn)
    model.config.use_cache = False
    facts["model_mb"] = rss_mb()
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA)).train()
    if "ckpt" in variant:
        model.activation_checkpointing_enable()
    if "lean" in variant:
        lean.apply(model, torch.bfloat16, recompute=True)
    facts["adapter_mb"] = rss_mb()
    return model


class SavedBytes:
    """A saved-tensors hook's pack function: bytes autograd saves for backward (each storage once), by site."""

    def __init__(self) -> None:
        self.bytes, self.seen, self.sites = 0, set(), {}

    def __call__(self, x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
            key = f"{site(traceback.extract_stack()[:-1])} {str(x.dtype).removeprefix('torch.')}"
            self.sites[key] = self.sites.get(key, 0) + storage.nbytes()
        return x


def one(variant: str, steps: int, batch_size: int) -> dict:
    """One variant in this process: RSS after imports, model, adapter; the first step counted (saved bytes,
    operators, its peak), then `steps` timed steps."""
    facts = {"imports_mb": rss_mb()}
    rows = encoded_rows(batch_size)
    plan = plan_epoch([len(r["input_ids"]) for r in rows], batch_size, True, 42)
    batches = [[rows[i] for i in b] for b in plan if len(b) == batch_size][: steps + 1]
    model = lora_model(variant, facts)
    variant = variant.removesuffix("-sdpa")
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=LR)
    dev, saved, ops = torch.device("cpu"), SavedBytes(), OpCounter()
    shared = variant in ("prefix", "lean")

    def step(mb: list[dict], count: bool = False) -> None:
        n = batching.common_prefix(mb) if shared else 0
        hooks = torch.autograd.graph.saved_tensors_hooks(saved, lambda x: x) if count else nullcontext()
        with autocast("bf16", dev), hooks, ops if count else nullcontext():
            if n:
                logp = batching.prefixed(model, mb, n, dev)
            elif variant.startswith("packed"):
                logp = batching.packed(model, mb, dev)
            else:
                logp = batching.padded(model, mb, dev)
            (-logp.sum() / logp.numel()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    reset_peak()
    step(batches[0], count=True)
    facts |= {"first_step_peak_mb": rss_mb("VmHWM"), "saved_for_backward_mb": saved.bytes / 2**20,
              "ops_per_step": ops.count, "saved_by_site_mb": {
                  k: round(v / 2**20, 1) for k, v in sorted(saved.sites.items(), key=lambda kv: -kv[1])[:12]},
              "prefix_tokens": [batching.common_prefix(mb) for mb in batches[1:]] if shared else []}
    reset_peak()
    t0 = time.time()
    for mb in batches[1:]:
        step(mb)
    seconds = time.time() - t0
    facts |= {"step_peak_mb": rss_mb("VmHWM"), "seconds_per_step": seconds / (len(batches) - 1),
              "tokens_per_second": sum(len(r["input_ids"]) for mb in batches[1:] for r in mb) / seconds,
              "peak_mb": rss_mb("VmHWM")}
    return facts


class OpCounter:
    """Counts the aten operators dispatched inside it (the backward pass's too)."""

    def __init__(self) -> None:
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()

    def __enter__(self):
        return self.mode.__enter__()

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def site(stack: list) -> str:
    """The innermost model-code line of a stack (transformers, PEFT or this project): what saved the tensor."""
    for frame in reversed(stack):
        f = frame.filename
        if any(k in f for k in ("/transformers/", "/peft/", "/pipeline/")) and "/torch/" not in f:
            return f"{Path(f).name}:{frame.lineno} {frame.name}"
    return "other"


def markdown(res: dict) -> str:
    first = next(iter(res["variants"].values()))
    pad = res["variants"].get("padded", first)  # the ratios' reference: padded, or the first variant run
    lines = [f"Measured {res['date']} on {res['machine']}, torch {res['torch']}: SmolLM2-135M, LoRA r=16 q/k/v/o, "
             f"bf16 autocast, batch {res['batch_size']} Financial PhraseBank rows with the default chat prompt "
             f"(mean {res['mean_tokens']:.0f} tokens/row), {res['steps']} timed steps after one warm-up step.", "",
             table(["variant", "RSS after imports MB", "+ model MB", "+ adapter MB", "step peak RSS MB",
                    "saved for backward MB", "s/step", "tokens/s",
                    f"speed vs {'padded' if 'padded' in res['variants'] else 'first'}", "operators/step"],
                   [[name, f"failed: {f['error']}"] if "error" in f else
                    [name, f"{f['imports_mb']:.0f}", f"{f['model_mb']:.0f}", f"{f['adapter_mb']:.0f}",
                     f"{f['step_peak_mb']:.0f}", f"{f['saved_for_backward_mb']:.0f}", f"{f['seconds_per_step']:.2f}",
                     f"{f['tokens_per_second']:.0f}", f"{f['tokens_per_second'] / pad['tokens_per_second']:.2f}x",
                     f.get("ops_per_step", "")] for name, f in res["variants"].items()])]
    for name, f in res["variants"].items():
        if f.get("saved_by_site_mb"):
            lines += ["", f"Saved for backward in `{name}`, largest sites (MB): " + "; ".join(
                f"{k} {v:.0f}" for k, v in list(f["saved_by_site_mb"].items())[:8]) + "."]
    prefix = res["variants"].get("prefix", {}).get("prefix_tokens")
    if prefix:
        lines += ["", f"Shared prefix per batch: {min(prefix)}–{max(prefix)} tokens."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return print(json.dumps(one(args.one, args.steps, args.batch_size)))

    res = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "steps": args.steps, "batch_size": args.batch_size, "variants": {}}
    for v in args.variants.split(","):
        print(f"bench: {v}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench.step_memory", "--one", v, "--steps", str(args.steps),
                               "--batch-size", str(args.batch_size)], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            res["variants"][v] = {"error": proc.stderr.strip().splitlines()[-1][:200]}
            continue
        res["variants"][v] = json.loads(proc.stdout.strip().splitlines()[-1])
    res["mean_tokens"] = mean_tokens(args.batch_size)
    save(args.out / "step_memory", f"layouts_{class_tag()}_{args.steps}steps", res, markdown(res))


def mean_tokens(batch_size: int) -> float:
    rows = encoded_rows(batch_size)
    return sum(len(r["input_ids"]) for r in rows) / len(rows)


if __name__ == "__main__":
    main()
