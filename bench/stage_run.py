"""The train stage's run as the benchmarks drive it: their params, their data prepared by the stages, the SFT run.

- `bench_params(args, ...)`: params.yaml as committed (bench/stage_process.py) with a run's shape (data, steps,
  batch, seed, no checkpoints), its prompt case and a variant's train keys.
- `prepare(args, work)`: validate -> format -> tokenize the benchmark data into `work`, with the stages' own code.
- `fit(p, data, base, live, ckpt, after_step)`: the SFT recipe (pipeline/recipes/sft.py) as the train stage sets
  it up, without saving an adapter; an optional hook after every optimizer step.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from bench.stage_process import CASES, PARAMS, ROOT
from pipeline import methods
from pipeline.core.allocator import peak_rss_mb
from pipeline.core.params import Params, parse_params
from pipeline.recipes import sft
from pipeline.stages import format as fmt
from pipeline.stages import tokenize as tkz
from pipeline.stages import validate


def bench_params(args, quantization: dict | None = None, **train) -> Params:
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


def fit(p: Params, data: Path, base_dir: Path, live: Path, ckpt: Path, after_step=None) -> tuple:
    """The train stage's SFT run (pipeline/recipes/sft.py) as the stage sets it up, without saving an adapter:
    the trained model, its metrics and the run facts. `after_step(recipe, seconds, (loss, tokens))`, if given,
    is called after each optimizer step with that step's own seconds (the hook's own time is not counted in them)."""
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
