"""Do the train step's batch layouts give the same loss and gradients on this machine's device and kernels?

On the real base model (not the tests' tiny one) and 16 Financial PhraseBank rows, one step's per-token
log-probabilities and every LoRA gradient from each layout of pipeline/core/batching.py, against the
padded layout in fp32:
  padded   left-padded batch (eager attention on CPU, sdpa on GPU)
  prefixed the shared prompt prefix run once, its keys and values shared
  packed   rows packed into few sequences, block-diagonal mask from the position ids
  varlen   one flat sequence with row boundaries (torch's flash varlen kernel on CUDA: bf16 only)
Each in fp32 (where the kernel allows) and under bf16 autocast; the bf16 padded layout's own distance from
fp32 is the yardstick a bf16 layout is held to.

Input: the base model folder (`dvc repro base`) and ../shared/datasets/financial_phrasebank (through the
project's validate, format and tokenize stages). Output: a table on stdout; `--json FILE` writes it too.
Run: `python -m bench.layouts_check` (CPU or CUDA, whichever torch sees).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.machine import table
from bench.stage_run import prepare  # the bench's own data preparation (validate -> format -> tokenize)
from pipeline.core import batching, varlen
from pipeline.core.modeling import autocast, device

ROOT = Path(__file__).resolve().parents[1]


def lora_model(base: Path, attn: str, dev: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True,
                                                 attn_implementation=varlen.implementation(attn, dev, False)).to(dev)
    config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # B != 0: real gradients
    return get_peft_model(model, config).train()


def step(model, layout, rows: list[dict], dev: torch.device, precision: str) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with autocast(precision, dev):
        if layout == "prefixed":
            logp = batching.prefixed(model, rows, batching.common_prefix(rows), dev)
        else:
            logp = getattr(batching, layout)(model, rows, dev)
    logp.float().sum().backward()
    return logp.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def distance(a: tuple, b: tuple) -> dict:
    """Relative distance of per-token log-probs and of the gradients (all tensors as one vector)."""
    ga, gb = torch.cat([g.flatten() for g in a[1].values()]), torch.cat([g.flatten() for g in b[1].values()])
    return {"logp": float((a[0] - b[0]).norm() / b[0].norm()), "grad": float((ga - gb).norm() / gb.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "financial_phrasebank")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from datasets import load_from_disk

    dev = device()
    with tempfile.TemporaryDirectory() as tmp:
        bench_args = argparse.Namespace(data=args.data, base=args.base, steps=1, batch_size=args.rows, seed=42)
        prepare(bench_args, Path(tmp))
        ds = load_from_disk(str(Path(tmp) / "tokenized" / "train")).select(range(args.rows))
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds]
    plain = lora_model(args.base, "auto", dev)
    flat = lora_model(args.base, varlen.NAME, dev)
    ref = step(plain, "padded", rows, dev, "fp32")
    results = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "rows": len(rows),
               "tokens": sum(len(r["input_ids"]) for r in rows), "prefix": batching.common_prefix(rows), "runs": {}}
    for precision in ("fp32", "bf16"):
        for layout, model, name in (("padded", plain, "padded"), ("prefixed", plain, "prefixed"),
                                    ("packed", plain, "packed"), ("packed", flat, "varlen")):
            if name == "varlen" and precision == "fp32" and dev.type == "cuda":
                continue  # the flash kernel takes bf16/fp16 only
            try:
                results["runs"][f"{name} {precision}"] = distance(step(model, layout, rows, dev, precision), ref)
            except Exception as e:  # noqa: BLE001 - reported in the table, the other layouts still run
                results["runs"][f"{name} {precision}"] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    print(f"{results['device']}: {results['rows']} rows, {results['tokens']} tokens, shared prefix "
          f"{results['prefix']} tokens; relative distance from the fp32 padded layout")
    print(table(["layout", "log-probs", "gradients"],
                [[k, f"{r['logp']:.2e}", f"{r['grad']:.2e}"] if "logp" in r else [k, r["error"]]
                 for k, r in results["runs"].items()]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
