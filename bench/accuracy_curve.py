"""Validation accuracy against training time in one run: how far a recipe gets in N seconds, and where it levels off.

The train stage's SFT run (bench.stage_run.fit, its process set up as the stage program's) on Financial
PhraseBank with a named prompt case (`--case`, the params committed at HEAD, the whole run: `train.epochs`,
no step limit) and `-S train.KEY=VALUE` overrides (YAML values, dotted keys inside the train section, e.g.
`-S train.lora.lora_dropout=0`); `--template` puts another prompt template in the case's place. Every `--every`
steps, and after the last, the adapter answers all 300 validation sentences, scored by the evaluate stage's own
scoring (pipeline.core.scoring): `accuracy` by its headline rule (each label's response + EOS, the most likely
summed), `first_token` beside it, in the training precision (the evaluate stage loads the adapter in fp32: a
row or two can differ). The loop's seconds exclude that scoring. One run's end is a screening figure: a profile
is measured by the evaluate stage (three seeds, docs/results.md). Curves kept from before 2026-12-06
(no `rule` in their file) were scored by the first-token rule alone.

Run: `python -m bench.accuracy_curve run --name NAME --seed 42 --every 25 -S train.epochs=3` (one process;
about the run's training time plus 8 s a scoring), then `python -m bench.accuracy_curve plot` draws every kept
curve (bench/results/accuracy_curve/<name>_<class>_seed<seed>.json) against the 3-minute line into
bench/results/accuracy_curve/all-curves.png.
"""

from __future__ import annotations

import sys

from bench.stage_process import CASES, PARAMS, PARAMS_COMMIT, ROOT, as_stage

if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    as_stage()  # before the imports below: the stage program's allocator and threads (re-executes once)

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml

from bench.machine import class_tag, cpu_name
from bench.stage_run import bench_params, fit, prepare
from pipeline.core.io import read_jsonl
from pipeline.core.loading import load_tokenizer
from pipeline.core.modeling import autocast, device
from pipeline.core.overlay import merge
from pipeline.core.scoring import Scorer

OUT = ROOT / "bench" / "results" / "accuracy_curve"
DATA = ROOT.parent / "shared" / "datasets" / "financial_phrasebank"


def overrides(sets: list[str]) -> dict:
    """`train.a.b=v` arguments as a nested mapping of the train section (values read as YAML)."""
    out: dict = {}
    for s in sets:
        key, sep, value = s.partition("=")
        if not sep or not key.startswith("train."):
            raise SystemExit(f"accuracy_curve: -S {s!r}: expected train.KEY=VALUE")
        *path, last = key.split(".")[1:]
        node = out
        for k in path:
            node = node.setdefault(k, {})
        node[last] = _value(value)
    return out


def _value(text: str):
    """A YAML value; numbers as YAML 1.2 reads them (as `dvc exp run -S` does: 2e-3 is a float)."""
    value = yaml.safe_load(text)
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def accuracy(model, tok, rows: list[dict], precision: str) -> dict[str, float]:
    """The share of the formatted validation `rows` each rule gets right, scored as the evaluate stage scores
    (pipeline.core.scoring: every label's response + EOS after the prompt): `accuracy` by the headline rule
    (the summed log-probability), `first_token` by the label's first token alone."""
    model.eval()
    with autocast(precision, device()):  # the frozen weights are stored in the autocast dtype while training
        s = Scorer(model, tok, 32).choices(rows)
    model.train()
    gold = np.array([r["choices"].index(r["response"]) for r in rows])
    return {"accuracy": float((s.total.argmax(1) == gold).mean()),
            "first_token": float((s.first.argmax(1) == gold).mean())}


def run(args) -> None:
    prompt = args.case  # the data as that commit's stages make it with this prompt, kept between runs
    if args.template:
        prompt += f"-{Path(args.template).stem}-{hashlib.sha256(Path(args.template).read_bytes()).hexdigest()[:8]}"
    work = Path(f"/tmp/peftflow-curve-{prompt}-{PARAMS_COMMIT}")
    shape = SimpleNamespace(steps=1, batch_size=16, base=ROOT / "models" / "base", data=DATA, seed=args.seed,
                            case=args.case, template=args.template)
    sets = overrides(args.set)
    train = merge(PARAMS["train"], sets)
    shape.batch_size = train["batch_size"]
    if not (work / "tokenized").exists():
        work.mkdir(parents=True, exist_ok=True)
        prepare(shape, work)
    tok = load_tokenizer(shape.base)
    rows = read_jsonl(work / "formatted" / "validation.jsonl")  # prompt, every label's response, the label's
    curve, clock = [], {"seconds": 0.0, "step": 0}

    def scored(recipe, seconds: float, _out) -> None:
        clock["seconds"] += seconds
        clock["step"] += 1
        if clock["step"] % args.every == 0 or clock["step"] == recipe.steps:
            curve.append({"step": clock["step"], "train_seconds": round(clock["seconds"], 1),
                          **accuracy(recipe.model, tok, rows, recipe.t.precision)})
            print(f"curve: step {clock['step']}/{recipe.steps}, {clock['seconds']:.0f} s, accuracy "
                  f"{curve[-1]['accuracy']:.4f} (first token {curve[-1]['first_token']:.4f})", file=sys.stderr,
                  flush=True)

    # the bench's run (no checkpoints, its own data) with the overridden keys, whole epochs
    over = {k: train[k] for k in sets if k != "batch_size"}
    p = bench_params(shape, **over, max_steps=None, log_every=1000)
    shutil.rmtree(work / "live", ignore_errors=True)
    _, metrics, facts = fit(p, work / "tokenized", shape.base, work / "live", work / "ckpt", scored)
    OUT.mkdir(parents=True, exist_ok=True)
    res = {"name": args.name, "seed": args.seed, "case": args.case, "template": args.template, "set": args.set,
           "rule": "loglik", "params_commit": PARAMS_COMMIT,
           "date": time.strftime("%Y-%m-%d"), "machine": cpu_name(),
           "curve": curve, "train_seconds": facts["seconds"], "tokens_per_second": facts["tokens_per_second"],
           "peak_rss_mb": facts["peak_rss_mb"], "final_train_loss": metrics["final_loss"]}
    (OUT / f"{args.name}_{class_tag()}_seed{args.seed}.json").write_text(json.dumps(res, indent=2) + "\n")


def plot(args) -> None:
    import matplotlib  # here, not at the top: a run's recorded peak RSS holds no plotting library

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    files = sorted(OUT.glob("*.json"))
    colors = plt.get_cmap("tab20").colors  # twenty distinct colours; a line style per twenty curves
    for i, f in enumerate(files):
        r = json.loads(f.read_text())
        c = r["curve"]
        ax.plot([x["train_seconds"] for x in c], [x["accuracy"] for x in c], marker="o", ms=3,
                color=colors[i % 20], ls=("-", "--", ":")[i // 20 % 3],
                label=f"{r['name']} (seed {r['seed']}{'' if 'rule' in r else ', first-token rule'})")
    ax.axvline(args.seconds, color="grey", ls="--", lw=1)
    ax.axhline(args.target, color="grey", ls=":", lw=1)
    ax.set(xlabel="training seconds (the loop, scoring excluded)", ylabel="validation accuracy",
           ylim=(args.floor, 1.0), title="Financial PhraseBank, SmolLM2-135M: accuracy against training time")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(OUT / "all-curves.png", dpi=110)
    print(OUT / "all-curves.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--every", type=int, default=25, help="steps between scorings")
    r.add_argument("--case", choices=sorted(CASES), default="short")
    r.add_argument("--template", help="a prompt template file in place of the case's (its other format keys kept)")
    r.add_argument("-S", "--set", action="append", default=[], help="train.KEY=VALUE (YAML value), repeatable")
    p = sub.add_parser("plot")
    p.add_argument("--seconds", type=float, default=180, help="the time line drawn")
    p.add_argument("--target", type=float, default=0.965, help="the accuracy line drawn")
    p.add_argument("--floor", type=float, default=0.8)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else plot(args)


if __name__ == "__main__":
    main()
