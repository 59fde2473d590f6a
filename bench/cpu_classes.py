"""The default job's training on this CPU class, op by op, to compare with another class (docs/reproducibility.md).

This project's machines come in two CPU classes (AMD EPYC with avx512_bf16 and no AMX; Intel Xeon with
AMX), drawn per session: the same adapter on both needs the same bits from every operation. This bench
runs the train stage's own recipe (pipeline/recipes/sft.py, set up as `bench.stage_run.fit` sets it
up) on the workspace's `data/tokenized` and `models/base` with the committed params, under a named set of
switches (environment variables read when torch and its libraries load) and a precision, in a process of
its own, and records:
  - every step's loss (exact, as float.hex) and the adapter's tensors' sha256 at the end;
  - for the first `--trace` steps: the sha256 of every module's first forward output in call order
    (activations), of every trainable parameter's gradient (as accumulated for the step) and of every
    trainable parameter after the step.
`record` writes one reference per (class, switches, precision) into bench/results/cpu_classes/; a run on
the other class compares with it: `compare A B` names the first step and the first operation (module, in
call order; then gradient, then parameter) whose bits differ. `cost` times the full run under each switch
set against the native one (bf16, no switch) in the same call, one process each, alternating.

Switch sets (SWITCHES): native; onednn-avx512bf16 (oneDNN capped below AMX, MKL's conditional bitwise
reproducibility at AVX512); avx2-all (oneDNN, MKL and ATen's own kernels all capped at AVX2).

Inputs: dvc.lock's data/tokenized and models/base (`dvc repro tokenize`), params.yaml.
Outputs: results/cpu_classes/<isa>_<switches>_<precision>.json; results/cpu_classes/cost_<isa>.{json,md}.
Run: `python -m bench.cpu_classes record`, `... compare A.json B.json`, `... cost`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import cpu_name, save, table
from pipeline import methods
from pipeline.core.lineage import cpu_isa, hardware
from pipeline.core.params import load_params
from pipeline.recipes import sft

ROOT = Path(__file__).resolve().parents[1]
SLOW = {("avx2-all", "bf16")}  # ~25x native on the EPYC class (../shared/reference/cpu-classes): only with --slow
OUT = ROOT / "bench" / "results" / "cpu_classes"
SWITCHES = {
    "native": {},
    "onednn-avx512bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_CBWR": "AVX512"},
    "avx2-all": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"},
}


def digest(t: torch.Tensor) -> str:
    """The first 12 hex digits of the sha256 of a tensor's bytes (48 bits: a reference, not a security boundary)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:12]


def first_tensor(out) -> torch.Tensor | None:
    """A module's output tensor (the first, for a module that returns a tuple or a model output)."""
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else ()
    return next((t for t in items if isinstance(t, torch.Tensor)), None)


class Trace:
    """Hooks on a model: its modules' first forward output and its trainable parameters' gradients and values,
    per optimizer step, for the first `steps` steps."""

    def __init__(self, model: torch.nn.Module, steps: int) -> None:
        self.steps, self.step, self.records = steps, 0, [self.empty() for _ in range(steps)]
        self.operations: list[str] = []  # module names in their first step's call order
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for name, module in model.named_modules():
            module.register_forward_hook(self.forward_hook(name or "model"))
        for name, p in self.trainable.items():
            p.register_post_accumulate_grad_hook(self.grad_hook(name))

    @staticmethod
    def empty() -> dict:
        return {"forward": {}, "grads": {}, "params": {}}

    def forward_hook(self, name: str):
        name = name.removeprefix("base_model.model.")

        def hook(module, args, out):
            rec = self.records[self.step] if self.step < self.steps else None
            t = first_tensor(out)
            if rec is not None and t is not None and name not in rec["forward"]:
                rec["forward"][name] = digest(t)  # the first call (activation checkpointing recomputes it)
                if self.step == 0:
                    self.operations.append(name)
        return hook

    def result(self) -> dict:
        """The trace as written: the operations and the trainable parameters once, then each step's hashes of
        forward outputs, gradients and parameters, in those orders."""
        names = sorted(self.trainable)
        steps = [{"forward": [r["forward"].get(n) for n in self.operations],
                  "grads": [r["grads"].get(n) for n in names], "params": [r["params"].get(n) for n in names]}
                 for r in self.records]
        return {"operations": self.operations, "parameters": names, "steps": steps}

    def grad_hook(self, name: str):
        def hook(p):
            if self.step < self.steps and p.grad is not None:
                self.records[self.step]["grads"][name] = digest(p.grad)  # the last: the step's whole sum
        return hook

    def after_step(self) -> None:
        if self.step < self.steps:
            self.records[self.step]["params"] = {n: digest(p) for n, p in self.trainable.items()}
        self.step += 1


def train_traced(p, data: Path, base: Path, trace_steps: int, work: Path) -> dict:
    """The train recipe on these params, data and base with a Trace; losses, trace, adapter digest, loop seconds."""
    method = methods.get(p.train.method)
    recipe = sft.SFT(p.train, p.seed, p.deterministic, method, sft.fingerprint(p.model_dump(by_alias=True), data, base))
    recipe.setup(data, base, work / "live", work / "ckpt")
    trace, losses, step = Trace(recipe.model, trace_steps), [], recipe.step

    def traced(micro):
        out = step(micro)
        losses.append(float(out[0]).hex())
        trace.after_step()
        return out

    recipe.step = traced
    t0 = time.perf_counter()
    _, facts = recipe.train()
    seconds = time.perf_counter() - t0
    adapter = {n: t for n, t in recipe.model.named_parameters() if t.requires_grad}
    whole = hashlib.sha256(b"".join(digest(adapter[n]).encode() for n in sorted(adapter))).hexdigest()
    return {"losses": losses, "trace": trace.result(), "seconds": round(seconds, 1), "adapter_sha256": whole,
            "tokens": facts.get("tokens")}


def child(args) -> None:
    """One run in this process (its switches already in the environment), written to args.out."""
    p = load_params(ROOT / "params.yaml")
    p = p.model_copy(update={"train": p.train.model_copy(update={"precision": args.precision})})
    with tempfile.TemporaryDirectory() as work:
        result = train_traced(p, ROOT / "data" / "tokenized", ROOT / "models" / "base", args.trace, Path(work))
    result |= {"switches": args.switches, "env": SWITCHES[args.switches], "precision": args.precision,
               "hardware": hardware(), "cpu": cpu_name(), "torch": torch.__version__,
               "torch_config": {"mkldnn": torch.backends.mkldnn.is_available(), "cpu_capability":
                                torch.backends.cpu.get_cpu_capability()}}
    Path(args.out).write_text(json.dumps(result, separators=(",", ":")) + "\n")  # ~150 KB: a reference, not a page


def run_one(switches: str, precision: str, trace: int, out: Path) -> dict:
    """`child` in a fresh process with the switch set's variables (set before torch loads)."""
    env = {**os.environ, **SWITCHES[switches]}
    subprocess.run([sys.executable, "-m", "bench.cpu_classes", "child", "--switches", switches, "--precision",
                    precision, "--trace", str(trace), "--out", str(out)], cwd=ROOT, env=env, check=True)
    return json.loads(out.read_text())


def combos(args) -> list[tuple[str, str]]:
    """The (switches, precision) pairs asked for, without the impractically slow ones unless --slow."""
    return [(s, p) for s in args.switches for p in args.precision if args.slow or (s, p) not in SLOW]


def record(args) -> None:
    """A reference per switch set and precision, named by this machine's class."""
    OUT.mkdir(parents=True, exist_ok=True)
    for switches, precision in combos(args):
        out = OUT / f"{cpu_isa()}_{switches}_{precision}.json"
        r = run_one(switches, precision, args.trace, out)
        final = float.fromhex(r["losses"][-1])
        print(f"{out.relative_to(ROOT)}: {len(r['losses'])} steps, final loss {final:.6f}, "
              f"adapter {r['adapter_sha256'][:16]}, {r['seconds']} s")


def first_difference(a: dict, b: dict) -> str:
    """Where two runs' bits first part: the step, then the first operation in call order (or gradient, or
    parameter), or 'identical'."""
    ops, steps_a, steps_b = a["trace"]["operations"], a["trace"]["steps"], b["trace"]["steps"]
    if ops != b["trace"]["operations"] or a["trace"]["parameters"] != b["trace"]["parameters"]:
        return "the two runs call other operations (another code or model): not comparable op by op"
    for i, (la, lb) in enumerate(zip(a["losses"], b["losses"], strict=False)):
        ta = steps_a[i] if i < len(steps_a) else None
        tb = steps_b[i] if i < len(steps_b) else None
        if ta is not None and tb is not None:
            for name, ha, hb in zip(ops, ta["forward"], tb["forward"], strict=True):
                if ha != hb:
                    return f"step {i + 1}: forward output of {name} (of {len(ops)} operations in call order)"
            for kind in ("grads", "params"):
                names = [n for n, ha, hb in zip(a["trace"]["parameters"], ta[kind], tb[kind], strict=True) if ha != hb]
                if names:
                    return f"step {i + 1}: {kind[:-1]} of {names[0]} ({len(names)} of {len(ta[kind])} differ)"
        if la != lb:
            return f"step {i + 1}: loss {float.fromhex(la):.8f} vs {float.fromhex(lb):.8f} (beyond the traced steps)"
    if len(a["losses"]) != len(b["losses"]) or a["adapter_sha256"] != b["adapter_sha256"]:
        return "the adapters differ after the last step"
    return "identical: every traced operation, every loss and the adapter"


def compare(args) -> None:
    a, b = (json.loads(Path(f).read_text()) for f in (args.a, args.b))
    for r, f in ((a, args.a), (b, args.b)):
        print(f"{f}: {r['cpu']} ({r['hardware']['cpu_isa']}), switches {r['switches']}, {r['precision']}")
    print(first_difference(a, b))


def cost(args) -> None:
    """Each switch set's full run against native bf16, alternating, `--rounds` times; medians and ratios."""
    OUT.mkdir(parents=True, exist_ok=True)
    runs = [("native", "bf16"), *(c for c in combos(args) if c != ("native", "bf16"))]
    seconds: dict[str, list[float]] = {f"{s} {p}": [] for s, p in runs}
    with tempfile.TemporaryDirectory() as work:
        for _ in range(args.rounds):
            for s, p in runs:
                seconds[f"{s} {p}"].append(run_one(s, p, 0, Path(work) / "r.json")["seconds"])
    write_cost(seconds)


def write_cost(seconds: dict[str, list[float]]) -> None:
    """The cost table (medians, ratios to native bf16) as results/cpu_classes/cost_<isa>.{json,md}."""
    median = {k: statistics.median(v) for k, v in seconds.items()}
    base = median["native bf16"]
    rows = [[k, f"{median[k]:.1f}", ", ".join(f"{x:.1f}" for x in v), f"{median[k] / base:.2f}x"]
            for k, v in seconds.items()]
    md = "\n".join([f"# Train stage seconds per switch set, {cpu_name()} ({cpu_isa()})", "",
                    "The default job's 30 steps, one process each, the sets alternating in each round.", "",
                    table(["switches, precision", "median s", "each round", "vs native bf16"], rows)]) + "\n"
    save(OUT, f"cost_{cpu_isa()}", {"seconds": seconds, "median": median}, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("record", "cost"):
        c = sub.add_parser(name)
        c.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=list(SWITCHES))
        c.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
        c.add_argument("--trace", type=int, default=6, help="steps whose every operation is hashed")
        c.add_argument("--rounds", type=int, default=1)
        c.add_argument("--slow", action="store_true", help="also the pairs in SLOW (avx2-all bf16)")
    c = sub.add_parser("child")
    c.add_argument("--switches", choices=list(SWITCHES), required=True)
    c.add_argument("--precision", choices=["bf16", "fp32"], required=True)
    c.add_argument("--trace", type=int, required=True)
    c.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    {"record": record, "cost": cost, "child": child, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
