"""Where the train stage's step time goes, per operator, on a named prompt case; and whether torch.compile pays.

Each case (`--cases chat,short`: the prompts of bench/stage_process.py, the params committed at HEAD) runs the
train stage's own SFT run (bench.stage_run.fit, in a process set up as the stage program sets itself up:
allocator and thread settings) for `--steps` steps; torch's profiler records steps `--skip + 1` to `--steps`
(the first ones warm up). The operators' own CPU time is summed per operator and per what called it (forward,
backward through autograd, optimizer), and per kind:

  matmul      aten::mm / bmm / addmm / matmul / linear: the arithmetic
  casts       what autocast's casts cost (aten::_to_copy, copy_ and the allocation they make)
  fill        aten::fill_ / zero_ (tensors filled before use)
  elementwise mul, add, silu, pow, rsqrt, neg, cat, ... (norms, rotary embeddings, residuals, LoRA's scaling)
  dropout     LoRA's dropout (the 1-byte mask of train.lean: drawing it and applying it)
  softmax     attention's softmax forward and backward
  optimizer   AdamW's update
  other       the rest

`--compile` also trains each case with every decoder layer under `torch.compile(dynamic=True)` (inductor's
fused C++ kernels on a CPU), one process each: tokens/s over the second half of the steps (compiled kernels
warm), the first step's seconds (where compilation happens) and the final train loss beside the eager run's.

Run: `python -m bench.step_profile --steps 12 --compile` (about 6 minutes); writes
bench/results/step_profile/<cases>_<class>_<steps>steps[_compile].{json,md}.
"""

from __future__ import annotations

import sys

from bench.stage_process import ROOT, as_stage
from pipeline.core.stage import option

if __name__ == "__main__" and option(sys.argv[1:], "--one", None):
    as_stage()  # before the imports below: the stage program's allocator and threads (re-executes once)

import argparse
import json
import subprocess
import tempfile
from collections import defaultdict
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench.machine import class_tag, cpu_name, save, table
from bench.stage_run import bench_params, fit, prepare
from pipeline.recipes import sft

KINDS = {"matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"),
         "casts": ("aten::_to_copy", "aten::copy_", "aten::to", "aten::empty_strided"),
         "fill": ("aten::fill_", "aten::zero_"),
         "softmax": ("aten::_softmax", "aten::_softmax_backward_data")}



def kind(op: str, chain: list[str]) -> str:
    """The kind of an operator call, from its name and the names of the calls it ran inside."""
    if any("MaskDropout" in c or "dropout" in c.lower() for c in chain[:3]):
        return "dropout"
    if any("Optimizer" in c or "AdamW" in c for c in chain):
        return "optimizer"
    for k, ops in KINDS.items():
        if op in ops:
            return k
    return "elementwise" if op.startswith("aten::") else "other"


def phase(chain: list[str]) -> str:
    if any("Optimizer" in c for c in chain):
        return "optimizer"
    return "backward" if any(c.startswith("autograd::engine") for c in chain) else "forward"


def one(case: str, steps: int, skip: int, compiled: bool, out: Path) -> None:
    """One case in this process: the stage's run, profiled (eager) or timed (compiled); result as JSON at `out`."""
    work = out.parent / f"work-{case}"
    args = SimpleNamespace(steps=steps, batch_size=16, base=ROOT / "models" / "base", seed=42, case=case,
                           data=ROOT.parent / "shared" / "datasets" / "financial_phrasebank")
    if not (work / "tokenized").exists():
        work.mkdir(parents=True, exist_ok=True)
        prepare(args, work)
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=skip - 1, warmup=1, active=steps - skip))
    times: list[tuple[float, int]] = []

    def timed(_recipe, seconds: float, out: tuple[float, int]) -> None:
        times.append((seconds, out[1]))
        if not compiled:
            prof.step()

    if compiled:
        build = sft.build_model

        def build_compiled(*a, **k):
            model = build(*a, **k)
            for layer in model.get_base_model().model.layers:
                layer.compile(dynamic=True)
            return model

        sft.build_model = build_compiled
    else:
        prof.start()
    _, metrics, _ = fit(bench_params(args), work / "tokenized", args.base, work / "live", work / "ckpt", timed)
    late = times[len(times) // 2:]
    res = {"case": case, "compiled": compiled, "steps": steps, "final_loss": metrics["final_loss"],
           "first_step_s": times[0][0], "late_tokens_per_second": sum(n for _, n in late) / sum(t for t, _ in late)}
    if not compiled:
        prof.stop()
        res["profiled_steps"] = steps - skip
        res["operators"] = operators(prof)
    out.write_text(json.dumps(res))


def operators(prof) -> list[dict]:
    """Self CPU time (ms) and calls per (operator, phase, kind), largest first."""
    own = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.name.startswith("ProfilerStep"):
            continue
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        key = (e.name, phase(chain), kind(e.name, chain))
        own[key][0] += e.self_cpu_time_total / 1e3
        own[key][1] += 1
    rows = [{"op": k[0], "phase": k[1], "kind": k[2], "ms": ms, "calls": n} for k, (ms, n) in own.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def markdown(res: dict, top: int) -> str:
    lines = [f"# Train step profile ({res['date']}, {res['machine']}, torch {res['torch']})", "",
             f"`python -m bench.step_profile {res['command']}`: the train stage's SFT run on each prompt case "
             "(bench/stage_process.py's cases, params committed at HEAD), LoRA r=16 q/k/v/o, batches of 16, bf16 "
             "autocast; operators' own CPU time over the profiled steps.", ""]
    for case, r in res["cases"].items():
        ops, n = r["operators"], r["profiled_steps"]
        total = sum(o["ms"] for o in ops)
        by_kind = defaultdict(float)
        for o in ops:
            by_kind[o["kind"]] += o["ms"]
        lines += [f"## {case}: {total / n:.0f} ms of operator time a step ({n} steps profiled; "
                  f"{r['late_tokens_per_second']:.0f} tok/s unprofiled in the run's second half)", "",
                  table(["kind", "ms a step", "share"], [[k, f"{ms / n:.0f}", f"{ms / total:.1%}"]
                                                          for k, ms in sorted(by_kind.items(), key=lambda x: -x[1])]),
                  "", table(["operator", "phase", "kind", "ms a step", "calls a step", "share"],
                            [[f"`{o['op']}`", o["phase"], o["kind"], f"{o['ms'] / n:.1f}", f"{o['calls'] / n:.0f}",
                              f"{o['ms'] / total:.1%}"] for o in ops[:top]], "lllrrr"), ""]
    if res.get("compiled"):
        rows = [[case, f"{res['cases'][case]['late_tokens_per_second']:.0f}", f"{c['late_tokens_per_second']:.0f}",
                 f"{c['late_tokens_per_second'] / res['cases'][case]['late_tokens_per_second']:.2f}x",
                 f"{c['first_step_s']:.1f}", f"{res['cases'][case]['final_loss']:.4f}", f"{c['final_loss']:.4f}"]
                for case, c in res["compiled"].items()]
        lines += ["## torch.compile of every decoder layer (inductor, dynamic shapes), one process each", "",
                  table(["case", "eager tok/s", "compiled tok/s", "ratio", "compiled first step s", "eager final loss",
                         "compiled final loss"], rows), ""]
    return "\n".join(lines)


def run(case: str, steps: int, skip: int, compiled: bool, tmp: Path) -> dict:
    out = tmp / f"{case}-{'compiled' if compiled else 'eager'}.json"
    cmd = [sys.executable, "-m", "bench.step_profile", "--one", case, "--steps", str(steps), "--skip", str(skip),
           "--result", str(out)] + (["--compile"] if compiled else [])
    print(f"bench: {case}, {'compiled' if compiled else 'eager, profiled'}", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="chat,short")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=4, help="steps run before the profiled ones")
    ap.add_argument("--compile", action="store_true", help="also time each case with compiled decoder layers")
    ap.add_argument("--top", type=int, default=25, help="operators listed per case")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.skip < args.steps:
        ap.error("--skip must be at least 1 and below --steps")
    if args.one:
        return one(args.one, args.steps, args.skip, args.compile, args.result)
    cases = args.cases.split(",")
    command = " ".join(sys.argv[1:])
    res = {"date": date.today().isoformat(), "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "command": command, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="peftflow-profile-") as tmp:
        for case in cases:
            res["cases"][case] = run(case, args.steps, args.skip, False, Path(tmp))
        if args.compile:
            res["compiled"] = {case: run(case, args.steps, args.skip, True, Path(tmp)) for case in cases}
    stem = f"{'+'.join(cases)}_{class_tag()}_{args.steps}steps" + ("_compile" if args.compile else "")
    save(args.out / "step_profile", stem, res, markdown(res, args.top) + "\n")


if __name__ == "__main__":
    main()
