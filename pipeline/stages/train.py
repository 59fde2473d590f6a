"""Stage `train`: train a PEFT adapter on the tokenized data.

`train.method` names the method (pipeline/methods/): any PEFT method, whose `train.<method>` section
holds its config class's own arguments, passed through unchanged (`LoraConfig(**params.train.lora)`);
`full` trains every weight instead (the ceiling adapters are compared with; its output is a full
checkpoint), and `bitfit` only the bias terms (`train.bitfit.norms`: also the normalization weights).
The loop: length-grouped, dynamically (left-)padded batches; loss on response tokens only,
with the vocabulary projection computed only where the loss is (`logits_to_keep`); AdamW with
warmup and a schedule; bf16 autocast; gradient clipping; fixed seeds. Checkpoints every
`train.checkpoint_every` steps let an interrupted run resume where it stopped; a checkpoint
made with other params or data is refused.

Inputs: the tokenized data folder, the base model folder.
The loops are recipes (pipeline/recipes/): `sft` always; for a task with `dpo` (preference), after
the SFT steps on the chosen answers, `train.dpo.steps` DPO steps on the pairs continue the same
adapter, against the base model as reference; the SFT adapter is kept in `<out>/sft/`.

Outputs: `<out>/` the adapter (safetensors + adapter_config.json + peftflow.json, the one record:
params, data and base hashes, the prompt template, the environment and hardware class; also in the
safetensors metadata, see pipeline/lineage.py), `<live>/` dvclive metrics (deterministic ones only)
and the loss curve, `<live>/run.json` the run facts (seconds, tokens/s, peak memory, resumed step:
what differs between two runs of the same inputs, so kept out of every hashed output), and
`<checkpoints>/` (kept between runs for resuming). The same inputs on the same hardware class give
a byte-identical `<out>/`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline import methods
from pipeline.core import lean, lineage
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text, sha256_text
from pipeline.core.modeling import (
    autocast_dtype,
    device,
    is_prompt_learning,
    load_base_model,
    nondeterministic_ops,
    seed_everything,
)
from pipeline.core.params import Params, Train, load_params, params_dict, peek, section_dict
from pipeline.core.stage import PipelineError, entry
from pipeline.core.training import (
    Processes,
    allocator_in_use,
    end_processes,
    is_main_process,
    peak_rss_mb,
    preload_allocator,
    stepper,
    tune_allocator,
)
from pipeline.recipes import dpo, sft
from pipeline.tasks import get as get_task


class ResumeError(PipelineError, RuntimeError):
    """A checkpoint exists but was made with other params or data."""


def build_model(p: Train, base_dir: Path, dev: torch.device, steps: int):
    """The base model (quantized as params say), made trainable by `train.method`."""
    model = load_base_model(base_dir, dev, p.quantization, p.attn_implementation,
                            packing=p.packing and p.precision != "fp32")  # varlen's kernel: bf16/fp16
    model.config.use_cache = False
    model = methods.get(p.method).build(model, p, steps)
    if p.lean:  # the same loss and gradients with less memory (pipeline/core/lean.py)
        lean.apply(model, autocast_dtype(p.precision), recompute=not p.activation_checkpointing)
    if p.activation_checkpointing:
        model.activation_checkpointing_enable(**p.activation_checkpointing.model_dump())
    return model


def layouts(t: Train, model, procs: Processes) -> dict:
    """The batch layouts this run may use (pipeline/core/batching.py). Prompt-learning methods put virtual
    tokens before every row: neither applies (packing asked for is an error). The shared prefix runs as
    a second forward call: not under several processes (DDP expects one) or activation checkpointing
    (which drops the cache)."""
    prompt_learning = is_prompt_learning(model)
    if t.packing and prompt_learning:
        raise PipelineError(f"params.yaml: 'train.packing' is true, but '{t.method}' adds virtual tokens before "
                            "every row, which packing cannot share between rows: set train.packing: false")
    return {"shared_prefix": t.shared_prefix and not prompt_learning and procs.world == 1
            and not t.activation_checkpointing, "packing": t.packing}


def fingerprint(p: Params, data_dir: Path, base_dir: Path) -> str:
    """What a checkpoint must match to be resumed: train params, seed, data and base model."""
    base = json.loads((base_dir / "base.json").read_text())
    tok = json.loads((data_dir / "tokenize.json").read_text())
    return sha256_text(json.dumps({"train": section_dict(p.train), "seed": p.seed,
                                   "data": tok, "base": base["weights_sha256"]}, sort_keys=True, default=str))


def save_checkpoint(ckpt: Path, model, optimizer, scheduler, step: int, fp: str, live_dir: Path | None = None) -> None:
    """Trainable weights, optimizer, scheduler, RNG and the loss curve so far, written atomically."""
    from safetensors.torch import save_file

    with atomic_dir(ckpt) as tmp:
        if live_dir is not None and live_dir.exists():
            shutil.copytree(live_dir, tmp / "live")
        trainable = {n: t.detach().cpu().contiguous() for n, t in model.named_parameters() if t.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        atomic_write_json(tmp / "checkpoint.json", {"step": step, "fingerprint": fp})


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, fp: str) -> int:
    """Restore a matching checkpoint; return its step (0 when there is none)."""
    meta_path = ckpt / "checkpoint.json"
    if not meta_path.exists():
        return 0
    meta = json.loads(meta_path.read_text())
    if meta["fingerprint"] != fp:
        raise ResumeError(
            f"train: {ckpt} holds a checkpoint (step {meta['step']}) made with other params or data; "
            f"delete {ckpt} to start over"
        )
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "trainable.safetensors"))
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ResumeError(f"train: checkpoint {ckpt} does not fit the model: {sorted(missing)[:3]}")
    model.load_state_dict(weights, strict=False)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(meta["step"])


def trim_curves(live_dir: Path, last_step: int) -> None:
    """Drop logged points after `last_step` (steps an interrupted run made after its checkpoint)."""
    for f in live_dir.glob("plots/metrics/**/*.tsv"):
        lines = f.read_text().splitlines()
        col = lines[0].split("\t").index("step")
        keep = [lines[0]] + [x for x in lines[1:] if int(x.split("\t")[col]) <= last_step]
        atomic_write_text(f, "\n".join(keep) + "\n")


class Log:
    """Where a run reports, from the main process only: dvclive (the loss curve, metrics), a progress bar
    and a console line every `train.log_every` steps, on stderr (unbuffered under dvc)."""

    def __init__(self, live_dir: Path, ckpt: Path, start: int, steps: int, t: Train, main: bool) -> None:
        from dvclive import Live

        self.steps, self.t, self.main, self.ema = steps, t, main, None
        if start and main:  # the curve so far comes back from the checkpoint (DVC clears outputs before a rerun)
            if (ckpt / "live").exists():
                shutil.rmtree(live_dir, ignore_errors=True)
                shutil.copytree(ckpt / "live", live_dir)
            trim_curves(live_dir, start)
        self.live = Live(dir=str(live_dir), resume=start > 0, dvcyaml=None, save_dvc_exp=False,
                         report=None) if main else None
        self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), disable=not main)
        self.task = self.bar.add_task("train", total=steps, completed=start, loss="-")
        self.last = float("nan")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.live:
            self.live.step = step
            for k, v in values.items():
                self.live.log_metric(k, v)
            self.live.make_summary()

    def sft(self, step: int, loss: float, lr: float) -> None:
        self.last = loss
        self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        self.metrics(step, {"train/loss": loss, "train/lr": lr})
        self.bar.update(self.task, advance=1, loss=f"{self.ema:.4f}")
        if self.main and (step % self.t.log_every == 0 or step == self.steps):
            self.bar.console.log(f"step {step}/{self.steps} loss {loss:.4f} (avg {self.ema:.4f})")

    def dpo(self, step: int, m: dict) -> None:
        self.metrics(step, {f"dpo/{k}": v for k, v in m.items()})
        k, n = step - self.steps, self.t.dpo.steps
        if self.main and (k % self.t.log_every == 0 or k == n):
            self.bar.console.log(f"dpo step {k}/{n} loss {m['loss']:.4f} reward accuracy "
                                 f"{m['reward_accuracy']:.2f} margin {m['reward_margin']:.3f}")

    def end(self, metrics: dict) -> None:
        self.bar.stop()
        if self.live:
            self.live.summary.update(metrics)
            self.live.make_summary()
            self.live.end()


def fit(p: Params, data: Path, base_dir: Path, live_dir: Path, ckpt: Path):
    """Train: the SFT recipe, then (a task with `dpo`) the DPO recipe; returns the trained model, the
    deterministic metrics and the run facts (timings, memory). Nothing is saved but checkpoints and the curve."""
    from datasets import load_from_disk
    from transformers import get_scheduler

    t = p.train
    tune_allocator()
    seed_everything(p.seed, p.deterministic)
    dev, pairs = device(), list(load_from_disk(str(data / "train")))
    procs = Processes(dev)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in pairs]
    steps = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(len(rows) / t.batch_size) / t.grad_accum))
    method = methods.get(t.method)
    model = build_model(t, base_dir, dev, steps)
    opt = stepper(model, t.lr, t, dev)
    scheduler = get_scheduler(t.lr_scheduler, opt.optimizer, num_warmup_steps=int(t.warmup_ratio * steps),
                              num_training_steps=steps)
    fp = fingerprint(p, data, base_dir)
    start = load_checkpoint(ckpt, model, opt.optimizer, scheduler, fp)
    log = Log(live_dir, ckpt, start, steps, t, procs.main)

    def checkpoint(step: int) -> None:
        if procs.main:
            save_checkpoint(ckpt, model, opt.optimizer, scheduler, step, fp, live_dir)
        procs.wait()

    loop = sft.Loop(procs.wrap(model), model, opt, scheduler, procs, t.precision, method.after_step,
                    method.penalty, max_batch_tokens=t.max_batch_tokens, **layouts(t, model, procs))
    if t.checkpoint_every and "sharded" in procs.kind(model):
        raise ResumeError("train: checkpoints of FSDP-sharded weights are not written (each process holds a "
                          "shard); set train.checkpoint_every: null, or train with DDP (docs/scaling.md)")
    t0 = time.time()
    with log.bar:
        tokens = sft.train(loop, rows, t, p.seed, start, steps, log.sft, checkpoint)
    seconds, dpo_metrics = time.time() - t0, None
    if get_task(p.task).dpo:  # SFT done: keep that adapter, then DPO on the pairs from it
        if procs.main:
            method.save(model, ckpt / "sft")
        dpo_metrics = dpo.train(t, model, pairs, p.seed, steps, log.dpo)
    metrics, facts = report(t, steps, log, method.trainable(model), dpo_metrics)
    facts |= {"seconds": round(seconds, 1), "tokens": tokens, "device": dev.type, "resumed_from_step": start,
              "tokens_per_second": round(tokens / seconds, 1) if seconds else None, "processes": procs.world,
              "distributed": procs.kind(model), "allocator": allocator_in_use()}
    if dpo_metrics:
        facts["dpo_seconds"] = round(time.time() - t0 - seconds, 1)
    log.end(metrics)
    return model, metrics, facts


def report(t: Train, steps: int, log: Log, counts: tuple[int, int], dpo_metrics: dict | None) -> tuple[dict, dict]:
    """What the same inputs always give (hashed by DVC) and what differs run to run (run.json)."""
    metrics = {"method": t.method, "steps": steps, "final_loss": round(log.last, 4),
               "final_loss_avg": round(log.ema, 4) if log.ema is not None else None,
               "trainable_params": counts[0], "total_params": counts[1]}
    if dpo_metrics:
        metrics["dpo"] = {k: round(v, 4) for k, v in dpo_metrics.items()}
    facts = {"peak_rss_mb": peak_rss_mb(), "nondeterministic_ops": nondeterministic_ops()}
    if torch.cuda.is_available():
        facts["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return metrics, facts


def save(p: Params, model, metrics: dict, data: Path, base_dir: Path, out: Path, ckpt: Path | None = None) -> None:
    """The adapter (safetensors), its one record and the template it was trained with, atomically. Nothing
    here depends on when, where or how fast the run was: the same inputs give the same bytes."""
    t = p.train
    fp = fingerprint(p, data, base_dir)
    base = json.loads((base_dir / "base.json").read_text())
    fmt = json.loads((data / "format.json").read_text())
    tok = json.loads((data / "tokenize.json").read_text())
    with atomic_dir(out) as tmp:
        method = methods.get(t.method)
        method.save(model, tmp)  # a PEFT adapter, a whole checkpoint (full) or the trained tensors (bitfit)
        weights = tmp / method.weights
        for name in ("format.json", "tokenize.json"):
            shutil.copy(data / name, tmp / name)
        if get_task(p.task).dpo and ckpt is not None and (ckpt / "sft").exists():
            shutil.copytree(ckpt / "sft", tmp / "sft")  # the SFT adapter DPO started from (evaluate compares)
        rec = {  # what serving needs (task, labels, fields, method), then the lineage
            "seed": p.seed, "task": p.task, "labels": list(p.labels), "text_field": p.validate.text_field,
            "label_field": p.validate.label_field, "train": section_dict(t), "fingerprint": fp,
            **lineage.record("train", params_dict(p)),
            "base": {k: base.get(k) for k in ("source", "revision", "gguf_file", "gguf_sha256", "weights_sha256")},
            "template": {"path": fmt.get("template"), "sha256": fmt.get("template_sha256")},
            "tokenizer_sha256": tok.get("tokenizer_sha256"),
            "data_rows": {k: tok[k]["kept"] for k in tok if isinstance(tok[k], dict)},
            "metrics": metrics,
        }
        lineage.write_into_safetensors(weights, rec)
        atomic_write_json(tmp / lineage.RECORD, rec)


def run(p: Params, data: Path, base_dir: Path, out: Path, live_dir: Path, ckpt: Path) -> dict:
    """Train and save; returns the metrics and the run facts together (the facts also go to `<live>/run.json`)."""
    model, metrics, facts = fit(p, data, base_dir, live_dir, ckpt)
    if is_main_process():  # one adapter, saved once
        save(p, model, metrics, data, base_dir, out, ckpt)
        atomic_write_json(live_dir / "run.json", {**facts, "hardware": lineage.hardware()})
        shutil.rmtree(ckpt, ignore_errors=True)  # finished and saved: nothing to resume
    end_processes()
    return {**metrics, **facts}


def launch_command(t: Train, argv: list[str]) -> list[str] | None:
    """`accelerate launch` of this same module and arguments, when params ask for several processes
    or an accelerate config (FSDP, DeepSpeed, ...) and this process was not launched so already."""
    if (t.num_processes == 1 and not t.accelerate_config) or "LOCAL_RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        cmd += ["--config_file", t.accelerate_config]
    else:  # plain DDP; on a CPU the processes talk over gloo
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, "--num_processes", str(t.num_processes), "--module", "pipeline.stages.train", *argv]


def main(
    data: Path = typer.Option(..., help="tokenized data folder"),
    base: Path = typer.Option(..., help="base model folder"),
    out: Path = typer.Option(..., help="adapter output folder"),
    live: Path = typer.Option(..., help="dvclive folder (metrics, loss curve)"),
    checkpoints: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    preload_allocator(peek(params, "train.allocator"))  # first: it may re-execute this program, once
    p = load_params(params)
    cmd = launch_command(p.train, sys.argv[1:])
    if cmd:
        typer.echo(f"train: {p.train.num_processes} processes: {' '.join(cmd[1:])}")
        raise typer.Exit(subprocess.run(cmd).returncode)
    m = run(p, data, base, out, live, checkpoints)
    if not is_main_process():
        return
    typer.echo(f"train: {m['method']} {m['trainable_params']:,} trainable params, {m['steps']} steps, "
               f"loss {m['final_loss']}, {m['seconds']} s -> {out}")


if __name__ == "__main__":
    entry(main)
