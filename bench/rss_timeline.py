"""Resident memory over a training run, per allocator: where the train stage's peak RSS comes from.

One process per allocator runs the train stage (the SFT recipe, `pipeline.recipes.sft`, set up as the stage program
sets itself up: `train.allocator` preloaded, bitsandbytes skipped) on Financial PhraseBank with the
project's LoRA r=16 q/k/v/o, batch 16, for `--steps` steps (48 reach the epoch's longest batches). A thread
samples the process's RSS every 5 ms; under the system allocator (glibc) it also reads glibc's own
account (`mallinfo2`: bytes its heaps hold for live allocations, bytes they hold free, bytes mapped
directly), so the gap between what the step uses and what stays resident is measured, not guessed.

Output: bench/results/rss_timeline/glibc-vs-mimalloc_<class>_<steps>steps.{json,md,png}: per allocator the
peak RSS, the RSS after the model is built, tokens/s of the run (sampling costs a little: speed claims are
bench/train_throughput.py's), and glibc's heap at the peak; the plot shows RSS against the step for both, with
glibc's live bytes.

Run: `python -m bench.rss_timeline` (about 5 minutes; needs `dvc repro base`).
"""

from __future__ import annotations

import sys

from bench.stage_process import ROOT, as_stage
from pipeline.core.stage import option

if __name__ == "__main__" and (WORKER := option(sys.argv[1:], "--worker", None)):
    as_stage(WORKER)  # before the imports below: the allocator named and the stage's threads (re-executes once)

import argparse
import ctypes
import json
import os
import subprocess
import tempfile
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

import torch

from bench.machine import class_tag, machine, save, table
from bench.stage_run import bench_params, fit, prepare
from pipeline.core.allocator import allocator_in_use
from pipeline.recipes import sft

ALLOCATORS = ("system", "mimalloc")


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def glibc_heap():
    """glibc's mallinfo2 as a function returning (in use, free in heaps, mapped directly) in MiB, or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = Mallinfo2
    except (OSError, AttributeError):
        return None

    def read() -> tuple[float, float, float]:
        m = libc.mallinfo2()
        return m.uordblks / 2**20, m.fordblks / 2**20, m.hblkhd / 2**20
    return read


def current_rss_mb() -> float:
    """Resident memory now (train_throughput.rss_mb is the process's peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Sampler(threading.Thread):
    """RSS every 5 ms (and glibc's heap every 50 ms, when asked), with the step running at the time."""

    def __init__(self, heap) -> None:
        super().__init__(daemon=True)
        self.heap, self.step, self.samples, self.t0 = heap, 0, [], time.time()

    def run(self) -> None:
        k = 0
        while True:
            sample = [round(time.time() - self.t0, 3), self.step, round(current_rss_mb(), 1)]
            if self.heap is not None and k % 10 == 0:
                sample += [round(x, 1) for x in self.heap()]
            self.samples.append(sample)
            k += 1
            time.sleep(0.005)


def worker(allocator: str, args) -> None:
    """One allocator's run in this process (set up as the stage program before the imports, above); sampling
    starts after the imports."""
    heap = glibc_heap() if allocator_in_use() == "system" else None
    sampler = Sampler(heap)
    sampler.start()
    step = sft.SFT.step

    def counted(recipe, micro):  # the recipe calls SFT.step once per optimizer step
        sampler.step += 1
        return step(recipe, micro)

    sft.SFT.step = counted
    ns = argparse.Namespace(data=args.data, steps=args.steps, batch_size=16, seed=args.seed, base=args.base)
    p = bench_params(ns, None, allocator=allocator)
    built = {}
    build = sft.build_model

    def build_model(*a, **k):
        model = build(*a, **k)
        built["mb"] = current_rss_mb()
        return model

    sft.build_model = build_model
    _, metrics, facts = fit(p, args.work / "tokenized", args.base, args.work / allocator / "live",
                            args.work / allocator / "ckpt")
    time.sleep(0.05)
    out = {"allocator": allocator_in_use(), "peak_rss_mb": facts["peak_rss_mb"], "model_mb": round(built["mb"]),
           "tokens_per_second": facts["tokens_per_second"], "final_loss": metrics["final_loss"],
           "samples": sampler.samples}
    if heap is not None:  # the sample where the most was live (heap in use + mapped directly)
        peak = max((s for s in sampler.samples if len(s) > 3), key=lambda s: s[3] + s[5])
        out["heap_at_live_peak_mb"] = {"rss": peak[2], "in_use": peak[3], "free_in_heap": peak[4], "mapped": peak[5]}
    (args.work / f"{allocator}.json").write_text(json.dumps(out))


def markdown(res: dict) -> str:
    """The result's table (per allocator: RSS after the model, peak RSS, speed, final loss) and glibc's own count."""
    lines = [f"Measured {res['date']} on {res['machine']}, torch {res['torch']}: the train stage on Financial "
             f"PhraseBank, SmolLM2-135M, LoRA r=16 q/k/v/o, batch 16, max_batch_tokens {res['max_batch_tokens']}, "
             f"{res['steps']} steps, seed {res['seed']}; RSS sampled every 5 ms.", "",
             table(["allocator", "RSS after the model MB", "peak RSS MB", "tokens/s (sampled)", "final loss"],
                   [[name, r["model_mb"], r["peak_rss_mb"], f"{r['tokens_per_second']:.0f}", r["final_loss"]]
                    for name, r in res["runs"].items()])]
    h = res["runs"].get("system", {}).get("heap_at_live_peak_mb")
    if h:
        lines += ["", f"glibc's own count under the system allocator, when the most was live: "
                  f"{h['in_use'] + h['mapped']:.0f} MB of live allocations ({h['in_use']:.0f} MB in its heaps, "
                  f"{h['mapped']:.0f} MB mapped directly: 2 MB and larger), while its heaps held another "
                  f"{h['free_in_heap']:.0f} MB free and resident (fragments left by earlier, differently shaped "
                  f"batches); RSS {h['rss']:.0f} MB then. The rest of the RSS is code, libraries and Python's heap."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib  # here, not at the top: the sampled workers' memory holds no plotting library

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in res["runs"].items():
        s = r["samples"]
        per_step, seen, xs = Counter(x[1] for x in s), Counter(), []
        for x in s:  # the step axis: each step's samples spread evenly over it (step 0: loading, before the first)
            xs.append(x[1] - 1 + seen[x[1]] / per_step[x[1]])
            seen[x[1]] += 1
        ax.plot(xs, [x[2] for x in s], lw=1, label=f"{name}: RSS (peak {r['peak_rss_mb']} MB)")
        live = [(xs[i], x[3] + x[5]) for i, x in enumerate(s) if len(x) > 3]
        if live:
            ax.plot(*zip(*live, strict=True), lw=0.8, ls="--", label=f"{name}: live allocations (glibc's count)")
    ax.set_xlim(-1, res["steps"])
    ax.set_xlabel("training step")
    ax.set_ylabel("MB")
    ax.set_title("Train stage memory, SmolLM2-135M LoRA r=16, batch 16 (Financial PhraseBank)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--base", type=Path, default=ROOT / "models" / "base")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "financial_phrasebank")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rss_timeline")
    ap.add_argument("--name", help="the result's file name (default: what, class, steps)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args)
    with tempfile.TemporaryDirectory(prefix="peftflow-rss-") as tmp:
        work = Path(tmp)
        ns = argparse.Namespace(data=args.data, steps=args.steps, batch_size=16, seed=args.seed, base=args.base)
        prepare(ns, work)
        res = {"date": date.today().isoformat(), "machine": machine(),
               "torch": torch.__version__, "steps": args.steps, "seed": args.seed,
               "max_batch_tokens": bench_params(ns).train.max_batch_tokens, "runs": {}}
        for name in ALLOCATORS:
            print(f"bench: {name}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-m", "bench.rss_timeline", "--worker", name, "--work", str(work),
                            "--steps", str(args.steps), "--seed", str(args.seed), "--base", str(args.base),
                            "--data", str(args.data)], cwd=ROOT, check=True)
            res["runs"][name] = json.loads((work / f"{name}.json").read_text())
    slim = {**res, "runs": {k: {**v, "samples": v["samples"][::20]} for k, v in res["runs"].items()}}
    name = args.name or f"glibc-vs-mimalloc_{class_tag()}_{args.steps}steps"
    save(args.out, name, slim, markdown(res))
    plot(res, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
