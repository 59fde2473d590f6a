"""Speed benchmark: this project's train and evaluate stages against the baselines users would
otherwise run, on the same model, data, LoRA settings and number of optimisation steps.

Training variants (bench/variants.py lists them: the train stage as it ships and with one setting changed, HF
Trainer and TRL SFTTrainer as tutorials and as well set up; bench/baselines.py trains the baselines), each in its
own subprocess set up as its users run it, so peak RSS is its own. LoRA as the project's default (r=16, alpha 32,
dropout 0.05, q/k/v/o). Every trained adapter is saved, loaded again onto a fresh fp32 base, and scored the same
way: mean response-token loss on held-out rows. Also (bench/throughput_figures.py): MFU of d against a matmul
peak measured in the same run, evaluation by label scoring vs free generation, batched vs per-row tokenization,
and `dvc repro` with nothing to do.

Inputs: the base model folder (`dvc repro base`), ../shared/datasets/financial_phrasebank.
Outputs: bench/results/train_throughput/<name>.{json,md} (`--name`, else from case, variants, steps and seeds).
Run: `make bench` (or `python -m bench.train_throughput --steps 12`). `--seeds 1,2,3` trains every
variant once per seed (data order, dropout and LoRA init) and reports the mean and spread: one seed
cannot tell a better recipe from a luckier data order. An interrupted run, started again with the same
arguments (or more variants), keeps the (variant, seed) results it had finished (<out>/runs/) and trains the rest.
"""

from __future__ import annotations

import sys

from bench.variants import NAMES, STAGE, set_up
from pipeline.core.stage import option

if __name__ == "__main__" and (WORKER := option(sys.argv[1:], "--worker", None)):
    set_up(WORKER)  # before the imports below: the variant's allocator and threads (re-executes once)

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from datasets import load_from_disk
from peft import PeftModel
from transformers import AutoModelForCausalLM

from bench.baselines import TRAINERS
from bench.machine import class_tag, cpu_name, save
from bench.stage_process import CASES, PARAMS_COMMIT, ROOT
from bench.stage_run import bench_params, fit, prepare
from bench.throughput_figures import bench_dvc, bench_evaluate, bench_tokenize, flops_per_token, heldout_loss, mfu
from bench.throughput_table import markdown
from pipeline.core import modeling
from pipeline.core.allocator import allocator_in_use, peak_rss_mb, thread_facts

# a competing process: one core kept busy until killed, or the deadline (its argument, seconds) passes
BUSY = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
       "bnb_4bit_compute_dtype": "bfloat16"}


def stage_keys(name: str, args) -> dict:
    """The train keys a train-stage variant sets over the committed params (bench/variants.py says why)."""
    return {"s": {"allocator": "system"}, "p": {"shared_prefix": False}, "l": {"lean": False},
            "t": {"max_batch_tokens": args.budget}, "k": {"packing": True, "shared_prefix": False},
            "m": {"packing": True, "shared_prefix": False, "attn_implementation": "sdpa"},
            "q": {"quantization": NF4}}.get(name, {})


def train_stage(name: str, args, work: Path) -> tuple:
    """A train-stage variant: the stage's SFT run with the variant's keys; the model and its figures."""
    p = bench_params(args, **stage_keys(name, args))
    model, m, facts = fit(p, work / "tokenized", args.base, work / name / "live", work / name / "ckpt")
    return model, {"seconds": facts["seconds"], "tokens": facts["tokens"], "final_train_loss": m["final_loss"]}


def worker(name: str, args, work: Path) -> None:
    """One variant in this process (set up before the imports, above): train, save, score on a fresh base."""
    torch.manual_seed(args.seed)
    model, result = train_stage(name, args, work) if name in STAGE else TRAINERS[name](args, work)
    result["peak_rss_mb"] = peak_rss_mb()
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


def parser() -> argparse.ArgumentParser:
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
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.worker:
        return worker(args.worker, args, args.work)
    with tempfile.TemporaryDirectory(prefix="peftflow-bench-") as tmp:
        work = Path(tmp)
        prepare(args, work)
        res = run_facts(args, work)
        res["train"], loaded = train_variants(args, work, res["seeds"], res["busy"], res["epoch_tokens"])
        if loaded:
            res["loaded"] = loaded
        d = res["train"].get("d", {})
        if "tokens_per_second" not in d:
            raise SystemExit("bench: the train stage variant (d) did not run; nothing to compare against")
        if args.only_train:
            return finish(args, res, result_name(args, full=False))
        res["mfu"] = mfu(d)
        print("bench: evaluate, tokenize, dvc", file=sys.stderr, flush=True)
        res["evaluate"] = bench_evaluate(args, work)
        res["tokenize"] = bench_tokenize(args, work)
    res["dvc"] = bench_dvc()
    finish(args, res, result_name(args, full=True))


def run_facts(args, work: Path) -> dict:
    """What the run is: date, machine, torch, its shape, seeds, load levels, prompt, the params it ran."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    tokenized = json.loads((work / "tokenized" / "tokenize.json").read_text())["train"]
    return {"date": date.today().isoformat(), "machine": f"{cpu_name()}, {torch.get_num_threads()} threads, "
            + (f"cuda ({gpu})" if gpu else "cpu"), "torch": torch.__version__, "steps": args.steps,
            "batch_size": args.batch_size, "budget": args.budget, "train": {},
            "seeds": [int(x) for x in args.seeds.split(",")], "busy": [int(x) for x in args.busy.split(",")],
            "case": args.case, "prompt": CASES[args.case], "params_commit": PARAMS_COMMIT,
            "epoch_tokens": tokenized["tokens"], "tokens_per_row": round(tokenized["tokens"] / tokenized["kept"], 1),
            "params": bench_params(args).model_dump(by_alias=True)}


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
    own = ("worker", "work", "only_train", "seeds", "name", "busy", "busy_limit", "busy_variants")
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


# each variant as a result's name says it (bench/variants.py: what it is)
SLUGS = {"a": "tutorial", "b": "trainer", "c": "trl", "e": "trl-padding-free", "f": "trl-packing",
         "g": "trainer-mimalloc", "x": "trl-mimalloc", "p": "padded", "l": "not-lean", "t": "budget",
         "k": "packed", "m": "packed-sdpa", "q": "qlora", "s": "glibc", "u": "purge-10ms", "w": "spinning",
         "v": "asleep"}


def result_name(args, full: bool) -> str:
    """What the run measured and where, as its result's name: `--name`, else the stage against the other
    variants, the case, the hardware class, steps and seeds (`stage-vs-trainer-mimalloc+trl_short_epyc-avx512bf16_
    48steps_3seeds`), the load levels, `_all` with the evaluation, tokenization and dvc figures."""
    if args.name:
        return args.name
    seeds = len(args.seeds.split(","))
    others = [SLUGS[v] + (f"-{args.budget}" if v == "t" else "") for v in args.variants if v != "d"]
    name = f"stage-vs-{'+'.join(others) or 'nothing'}_{args.case}_{class_tag()}_{args.steps}steps_{seeds}seed"
    name += "s" if seeds > 1 else ""
    name += f"_busy{args.busy.replace(',', '-')}" if args.busy != "0" else ""
    return name + ("_all" if full else "")


def finish(args, res: dict, stem: str) -> None:
    """bench/results/train_throughput/<stem>.{json,md}, the machine and date inside."""
    save(args.out / "train_throughput", stem, res, markdown(res))
    print(f"bench: -> {args.out / 'train_throughput' / stem}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
