"""Stage `train`: the adapter (`train.method`) by the SFT recipe (pipeline/recipes/sft.py), then DPO for a
task that asks for it. Inputs: the tokenized data, the format stage's record (`format.json`: prompt, data),
the base model. Outputs: `<out>/` the adapter and `peftflow.json`, its record (also in the safetensors
metadata: pipeline/core/lineage.py), `<out>/sft/` the SFT adapter DPO started from; `<live>/` the loss
curve, metrics, `run.json` (what ran) and `resources.json` (what it took: out of git); `<checkpoints>/` to
resume. The same inputs on the same hardware class give the same bytes in `<out>/`, resumed or not."""
from __future__ import annotations

import sys

from pipeline.core.allocator import peak_rss_mb, preload_allocator, thread_env
from pipeline.core.stage import entry, option, peek, without_bitsandbytes

if __name__ == "__main__":
    # before the imports below (seconds): allocator and thread waiting (re-executes once); bitsandbytes out
    PARAMS = option(sys.argv[1:], "--params", "params.yaml")
    preload_allocator(peek(PARAMS, "train.allocator"), thread_env())
    without_bitsandbytes(peek(PARAMS, "train.quantization"), peek(PARAMS, "train.optimizer"))

import json
import shutil
from pathlib import Path

import typer

from pipeline import contract, methods, tasks
from pipeline.core import lineage
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.params import Params, Train, View
from pipeline.core.processes import end_processes, is_main_process, launch_command, relaunch
from pipeline.recipes import dpo, sft

STAGE = "train"
# train's own fields (the method's section and train.dpo come with the method and the task)
READS = ("seed", "deterministic", "task", *(f"train.{k}" for k in Train.model_fields if k != "dpo"))
LOADS = ("task", "method")
BASE_FACTS = ("source", "revision", "gguf_file", "gguf_sha256", "tokenizer_pre", "weights_sha256")


def save(p: View, method, model, metrics: dict, data: Path, prompt_file: Path, base_dir: Path, out: Path,
         sft_dir: Path | None) -> None:
    """The adapter, its SFT start (DPO) and its record, atomically: nothing in it depends on when, where or
    how fast the run was, so the same inputs give the same bytes."""
    base, fmt, tok = (json.loads(f.read_text()) for f in (base_dir / "base.json", prompt_file, data / "tokenize.json"))
    with atomic_dir(out) as tmp:
        method.save(model, tmp)  # a PEFT adapter, a whole checkpoint (full) or the trained tensors (bitfit)
        if sft_dir is not None:
            shutil.copytree(sft_dir, tmp / "sft")
        rec = {**lineage.record(STAGE, p.dump()), "prompt": fmt["prompt"], "data": fmt["data"],
               "base": {k: base.get(k) for k in BASE_FACTS},
               "inputs": {str(data): lineage.digest(data), str(prompt_file): lineage.digest(prompt_file)},
               "tokenizer_sha256": tok.get("tokenizer_sha256"),
               "data_rows": {k: tok[k]["kept"] for k in tok if isinstance(tok[k], dict)}, "metrics": metrics}
        lineage.write_into_safetensors(tmp / method.weights, rec)
        atomic_write_json(tmp / lineage.RECORD, rec)


def run(params: Params, data: Path, prompt_file: Path, base_dir: Path, out: Path, live: Path, ckpt: Path) -> dict:
    """Train and save; returns the metrics and the run facts together (the facts also go to `<live>/`)."""
    method = methods.get(params.train.method)
    p = contract.view(params, STAGE, READS, method)
    task = tasks.get(p.task)
    methods.check(p.train, task.dpo)
    recipe = sft.SFT(p.train, p.seed, p.deterministic, method, sft.fingerprint(p.dump(), data, base_dir))
    recipe.setup(data, base_dir, live, ckpt)
    metrics, facts = recipe.train()
    sft_dir = dpo.after_sft(recipe, p.train, ckpt / "sft", metrics, facts) if task.dpo else None
    recipe.log.end(metrics)
    if is_main_process():  # one adapter, saved once
        save(p, method, recipe.model, metrics, data, prompt_file, base_dir, out, sft_dir)
        facts |= {"peak_rss_mb": peak_rss_mb(), "hardware": lineage.hardware()}
        sft.write_facts(live, facts)
        shutil.rmtree(ckpt, ignore_errors=True)  # finished and saved: nothing to resume
    end_processes()
    return {**metrics, **facts}


def main(
    data: Path = typer.Option(..., help="tokenized data folder"),
    prompt: Path = typer.Option(..., help="the format stage's record (format.json: the prompt and the data)"),
    base: Path = typer.Option(..., help="base model folder"),
    out: Path = typer.Option(..., help="adapter output folder"),
    live: Path = typer.Option(..., help="dvclive folder (metrics, loss curve)"),
    checkpoints: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    p = contract.load(params)
    cmd = launch_command(p.train, "pipeline.stages.train", sys.argv[1:])
    if cmd:
        typer.echo(f"train: {p.train.num_processes} processes: {' '.join(cmd[1:])}")
        raise typer.Exit(relaunch(cmd))
    m = run(p, data, prompt, base, out, live, checkpoints)
    if is_main_process():
        typer.echo(f"train: {m['method']} {m['trainable_params']:,} trainable params, {m['steps']} steps, "
                   f"loss {m['final_loss']}, {m['seconds']} s -> {out}")


if __name__ == "__main__":
    entry(main)
