"""The evaluate stage's greedy generation: continuing from the prompts' shared prefix vs whole prompts.

SmolLM2-135M (models/base, `dvc repro base`), the base model as evaluate reads it (fp32, the
attention `auto` gives), on Financial PhraseBank validation rows rendered by the default template
with the chat template, zero-shot and 5-shot (`evaluate.shots: 5`: five solved training sentences as
earlier turns, the same in every prompt). Two ways to generate `--max-new-tokens` greedily, in
batches of `--batch-size` prompts sorted by length:

  whole   every prompt left-padded whole (evaluate before the shared prefix was used for generation)
  prefix  `pipeline.core.scoring.generate_many`: the tokens every prompt shares run once as a KV cache,
          each batch continues from it ([prefix | padding | row])

Both run on the same rows in the same process, alternating (whole, prefix, prefix, whole, ...) over
`--reps` so drift on a shared machine falls on both; reported per setting: the shared prefix's
length, the mean prompt length, seconds of each (median over reps), the ratio, and how many of the
answers are the same text (they should all be: the same arithmetic up to floating-point order).

Run: `python -m bench.eval_generation` (about 5 minutes); writes
bench/results/eval_generation/prefix-vs-whole_<class>_<rows>rows_batch<batch size>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from bench.machine import class_tag, machine, save, table
from pipeline import tasks
from pipeline.core.encoding import encode_prompt
from pipeline.core.io import read_jsonl
from pipeline.core.loading import load_base_model, load_tokenizer
from pipeline.core.modeling import batches, left_pad
from pipeline.core.params import parse_params
from pipeline.core.prompting import Prompt
from pipeline.core.scoring import generate_many, shared_prefix
from pipeline.stages import format as fmt
from pipeline.stages import validate

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def generate_whole(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """The baseline: each batch's prompts left-padded whole, the shared tokens run in every row."""
    encoded = [encode_prompt(tok, p) for p in prompts]
    out = [""] * len(prompts)
    for idx in batches(sorted(range(len(prompts)), key=lambda i: len(encoded[i])), batch_size):
        batch = left_pad([{"input_ids": encoded[i]} for i in idx], tok.pad_token_id, model.device)
        gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        for i, new in zip(idx, gen[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
            out[i] = tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new,
                                skip_special_tokens=True)
    return out


def prompts(args, work: Path) -> dict[str, list[str]]:
    """Zero-shot and 5-shot prompts of the first `--rows` validation rows, rendered by the project's stages."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"] = {"train": str(args.data / "train.jsonl"), "validation": str(args.data / "validation.jsonl"),
                   "license": f"see {args.data / 'LICENSE.txt'}"}
    raw["evaluate"]["shots"] = 5
    p = parse_params(raw)
    validate.run(p, Path(p.data.train), Path(p.data.validation), work / "validated", work / "validate.json")
    fmt.run(p, work / "validated", ROOT / p.format.template, args.base, work / "formatted")
    task, tok, prompt = tasks.get(p.task), load_tokenizer(args.base), Prompt.load(work / "formatted")
    rows = read_jsonl(work / "formatted" / "validation.jsonl")
    zero = [r["prompt"] for r in rows][: args.rows]
    x = tasks.EvalInputs(None, prompt, prompt.renderer(tok), rows, work / "tokenized", work / "validated", work,
                         {}, work)  # what few-shot rendering reads: the prompt, its renderer, the validated rows
    five = [r["prompt"] for r in task.fewshot_rows(x, task.shots(p, x))][: args.rows]
    return {"zero-shot": zero, "5-shot": five}


def markdown(record: dict) -> str:
    """The result's table: per prompt setting, the seconds of each way, the speed-up and the answers that agree."""
    rows = [[name, r["rows"], r["mean_prompt_tokens"], r["shared_prefix_tokens"],
             f"{r['median_seconds']['whole']:.1f} s", f"{r['median_seconds']['prefix']:.1f} s", f"{r['speedup']:.2f}x",
             f"{r['same_answers']} / {r['rows']}"] for name, r in record["results"].items()]
    return (f"Greedy generation of the base model, {record['max_new_tokens']} new tokens at most, batches of "
            f"{record['batch_size']}; {record['machine']}, {record['date']}; median of {record['reps']} alternating "
            "runs (bench/eval_generation.py).\n\n"
            + table(["prompts", "rows", "mean prompt tokens", "shared prefix tokens", "whole prompts",
                     "from the shared prefix", "speed-up", "same answers"], rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--reps", type=int, default=2, help="pairs of runs (whole, prefix), alternating order")
    ap.add_argument("--batch-size", type=int, default=32, help="evaluate.batch_size")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="evaluate.max_new_tokens")
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "financial_phrasebank")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_generation")
    ap.add_argument("--name", help="the result's file name (default: what, class, rows and batch size)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        settings = prompts(args, Path(tmp))
    tok = load_tokenizer(args.base)
    model = load_base_model(args.base, torch.device("cpu")).eval()
    ways = {"whole": generate_whole, "prefix": generate_many}
    results = {}
    for name, texts in settings.items():
        encoded = [encode_prompt(tok, t) for t in texts]
        common, _ = shared_prefix(model, encoded, model.device)
        seconds: dict[str, list[float]] = {w: [] for w in ways}
        answers: dict[str, list[str]] = {}
        for rep in range(args.reps):
            for way in (["whole", "prefix"] if rep % 2 == 0 else ["prefix", "whole"]):
                t0 = time.perf_counter()
                answers[way] = ways[way](model, tok, texts, args.max_new_tokens, args.batch_size)
                seconds[way].append(time.perf_counter() - t0)
                print(f"{name} {way}: {seconds[way][-1]:.1f} s", flush=True)
        med = {w: statistics.median(s) for w, s in seconds.items()}
        results[name] = {"rows": len(texts), "shared_prefix_tokens": common,
                         "mean_prompt_tokens": round(sum(map(len, encoded)) / len(encoded), 1),
                         "seconds": {w: [round(x, 2) for x in s] for w, s in seconds.items()},
                         "median_seconds": {w: round(x, 2) for w, x in med.items()},
                         "speedup": round(med["whole"] / med["prefix"], 2),
                         "same_answers": sum(a == b for a, b in zip(answers["whole"], answers["prefix"], strict=True))}
    record = {"date": date.today().isoformat(), "machine": machine(), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "reps": args.reps, "results": results}
    rows = next(iter(results.values()))["rows"]  # fewer than --rows where the validation set is shorter
    save(args.out, args.name or f"prefix-vs-whole_{class_tag()}_{rows}rows_batch{args.batch_size}", record,
         markdown(record))
    print(json.dumps({k: v["speedup"] for k, v in results.items()}))


if __name__ == "__main__":
    main()
