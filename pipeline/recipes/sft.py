"""Recipe: supervised fine-tuning, the loss on the response tokens only. Read top to bottom: setup, resume,
the step, logging, checkpoints.

Setup: seeds (and deterministic kernels), the tokenized rows, the base model made trainable by the method
(`train.method`, pipeline/methods), `train.lean`'s memory changes and activation checkpointing, the
optimizer step (pipeline/core/optim.py) and the learning-rate schedule, then the checkpoint to resume
from: one made with the same params, data and base is resumed (weights, optimizer, schedule, RNG,
the loss curve and the running loss average), any other is refused.

Batches: the rows shuffled with the seed (a new permutation each epoch), grouped by length when
`train.group_by_length` (similar lengths together, so little padding). Each micro-batch runs in one of
the layouts of pipeline/core/batching.py, all giving the same loss: the rows' shared token prefix once
(`train.shared_prefix`, when the rows have one), else packed (`train.packing`), else left-padded; the
vocabulary projection is computed only where the loss is. A micro-batch larger than
`train.max_batch_tokens` (rows x longest row) runs in several passes, so the longest batches of a run
do not set its peak memory; the gradient is the same sum. `train.grad_accum` micro-batches make one
optimizer step; the loss is the mean over the step's response tokens (plus the method's own term,
AdaLoRA's orthogonal regularization). Under `accelerate launch` each process takes its share of every
micro-batch (pipeline/core/processes.py), scaled so the averaged gradients equal the one-process
gradient. A run resumed at step k continues with exactly the batches an uninterrupted run would have
seen, and ends with the same weights and the same metrics.

Logging: dvclive (the loss curve and learning rate: `<live>/plots`, deterministic metrics), a progress
bar and a console line every `train.log_every` steps. Checkpoints: every `train.checkpoint_every`
steps, written whole or not at all.

Inputs: the train params view, the method, the tokenized data folder, the base model folder.
Output: the trained model, its metrics (the same for the same inputs) and the run facts (timings).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from pipeline.core import batching, lean, varlen
from pipeline.core.allocator import allocator_in_use, peak_rss_mb, thread_facts, tune_allocator
from pipeline.core.encoding import IGNORE
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text, sha256_text
from pipeline.core.loading import load_base_model
from pipeline.core.modeling import autocast, autocast_dtype, device, nondeterministic_ops, seed_everything
from pipeline.core.optim import optimizer_step
from pipeline.core.processes import Processes
from pipeline.core.stage import Interrupted, PipelineError
from pipeline.methods.base import Method


class ResumeError(PipelineError, RuntimeError):
    """A checkpoint exists but was made with other params or data."""


# ---- batches ---------------------------------------------------------------------------------------

def plan_epoch(lengths: list[int], batch_size: int, group_by_length: bool, seed: int) -> list[list[int]]:
    """Row indices of each batch of one epoch: shuffled, and if grouping, similar lengths together."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths)).tolist()
    if group_by_length:
        chunk = batch_size * 32
        grouped = []
        for i in range(0, len(order), chunk):
            grouped += sorted(order[i : i + chunk], key=lambda j: -lengths[j])
        order = grouped
    plan = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        plan = [plan[j] for j in rng.permutation(len(plan))]
    return plan


def micro_batches(rows: list[dict], batch_size: int, group_by_length: bool, seed: int,
                  skip: int = 0) -> Iterator[list[dict]]:
    """Every micro-batch of every epoch in order (epoch e shuffled with seed + e), after the first `skip`."""
    lengths = [len(r["input_ids"]) for r in rows]
    k, epoch = 0, 0
    while True:
        for b in plan_epoch(lengths, batch_size, group_by_length, seed + epoch):
            if k >= skip:
                yield [rows[i] for i in b]
            k += 1
        epoch += 1


def passes(rows: list[dict], budget: int | None) -> list[list[dict]]:
    """The rows in consecutive groups of at most `budget` padded tokens (rows x the group's longest row;
    a longer row runs alone): the forward passes one micro-batch takes. No budget: one pass."""
    if not budget:
        return [rows]
    groups: list[list[dict]] = [[]]
    longest = 0
    for r in rows:
        n = len(r["input_ids"])
        if groups[-1] and (len(groups[-1]) + 1) * max(longest, n) > budget:
            groups.append([])
            longest = 0
        groups[-1].append(r)
        longest = max(longest, n)
    return groups


# ---- setup -----------------------------------------------------------------------------------------

def fingerprint(params: dict, data: Path, base_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the params the run read, the data and the base model."""
    base = json.loads((base_dir / "base.json").read_text())["weights_sha256"]
    tok = json.loads((data / "tokenize.json").read_text())
    return sha256_text(json.dumps({"params": params, "data": tok, "base": base}, sort_keys=True, default=str))



def interrupted(step: int, steps: int, saved: int, ckpt: Path, every: int | None) -> str:
    """What Ctrl-C during training tells the user: where it stopped and where a rerun starts."""
    where = f"train: interrupted in step {step} of {steps}"
    if saved:
        return f"{where}; a rerun (dvc repro) resumes from the checkpoint of step {saved} in {ckpt}"
    why = f"the first is at step {every}" if every else "train.checkpoint_every is off"
    return f"{where}; no checkpoint yet ({why}): a rerun starts from step 1"


def total_steps(t, rows: int) -> int:
    """`train.max_steps`, or the steps `train.epochs` of `rows` rows take."""
    return t.max_steps or max(1, math.ceil(t.epochs * math.ceil(rows / t.batch_size) / t.grad_accum))


def build_model(t, method: Method, base_dir: Path, dev: torch.device, steps: int):
    """The base model (quantized as params say), made trainable by the method, with `train.lean`'s memory
    changes and activation checkpointing."""
    packing = t.packing and t.precision != "fp32"  # varlen's kernel: bf16/fp16
    model = load_base_model(base_dir, dev, t.quantization, varlen.implementation(t.attn_implementation, dev, packing))
    model.config.use_cache = False
    model = method.build(model, t, steps)
    if t.lean:  # the same loss and gradients with less memory (pipeline/core/lean.py)
        lean.apply(model, autocast_dtype(t.precision), recompute=not t.activation_checkpointing)
    if t.activation_checkpointing:
        model.activation_checkpointing_enable(**t.activation_checkpointing.model_dump())
    return model


@dataclass
class RunningLoss:
    """The running figures a checkpoint keeps: the last step's loss and its exponential average."""

    last: float = float("nan")
    average: float | None = None

    def add(self, loss: float) -> None:
        self.last = loss
        self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss


class Log:
    """Where a run reports, from the main process only: dvclive (the loss curve, metrics), a progress bar
    and a console line every `train.log_every` steps, on stderr (unbuffered under dvc)."""

    def __init__(self, live_dir: Path, start: int, steps: int, t, main: bool) -> None:
        from dvclive import Live

        self.steps, self.t, self.main = steps, t, main
        self.live = Live(dir=str(live_dir), resume=start > 0, dvcyaml=None, save_dvc_exp=False,
                         report=None) if main else None
        self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), disable=not main)
        self.task = self.bar.add_task("train", total=steps, completed=start, loss="-")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.live:
            self.live.step = step
            for k, v in values.items():
                self.live.log_metric(k, v)
            self.live.make_summary()

    def sft(self, step: int, loss: float, average: float, lr: float) -> None:
        self.metrics(step, {"train/loss": loss, "train/lr": lr})
        self.bar.update(self.task, advance=1, loss=f"{average:.4f}")
        if self.main and (step % self.t.log_every == 0 or step == self.steps):
            self.bar.console.log(f"step {step}/{self.steps} loss {loss:.4f} (avg {average:.4f})")

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


# the run facts that differ between two runs of the same inputs on one machine: `<live>/resources.json` (out of
# git), not run.json (in git: what ran), except inside a DVC experiment (DVC_EXP_NAME), whose commit keeps only
# git-tracked files: there run.json holds them too, so `dvc exp show` and sweeps compare what each point took
TOOK = ("seconds", "tokens_per_second", "peak_rss_mb", "peak_gpu_mb", "dpo_seconds")


def write_facts(live_dir: Path, facts: dict) -> None:
    """`<live>/run.json` (what ran: device, processes, allocator, threads, resumed step, hardware class; the same
    on every reproduction on one class) and `<live>/resources.json` (what it took: TOOK)."""
    took = {k: facts[k] for k in TOOK if k in facts}
    in_experiment = bool(os.environ.get("DVC_EXP_NAME"))
    kept = facts if in_experiment else {k: v for k, v in facts.items() if k not in took}
    atomic_write_json(live_dir / "run.json", kept)
    atomic_write_json(live_dir / "resources.json", took)


def trim_curves(live_dir: Path, last_step: int) -> None:
    """Drop logged points after `last_step` (steps an interrupted run made after its checkpoint)."""
    for f in live_dir.glob("plots/metrics/**/*.tsv"):
        lines = f.read_text().splitlines()
        col = lines[0].split("\t").index("step")
        keep = [lines[0]] + [x for x in lines[1:] if int(x.split("\t")[col]) <= last_step]
        atomic_write_text(f, "\n".join(keep) + "\n")


# ---- the recipe ------------------------------------------------------------------------------------

class SFT:
    """One supervised fine-tuning run: `setup()`, then `train()`; `model` is the trained model."""

    def __init__(self, t, seed: int, deterministic: bool, method: Method, fingerprint: str) -> None:
        self.t, self.seed, self.deterministic, self.method = t, seed, deterministic, method
        self.fingerprint = fingerprint

    def setup(self, data: Path, base_dir: Path, live_dir: Path, ckpt: Path) -> None:
        """Seeds, rows, model, optimizer, schedule, the checkpoint to resume from, logging."""
        t = self.t
        tune_allocator()
        seed_everything(self.seed, self.deterministic)
        self.dev, self.ckpt, self.live_dir = device(), ckpt, live_dir
        self.pairs = list(load_from_disk(str(data / "train")))
        self.rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in self.pairs]
        self.steps = total_steps(t, len(self.rows))
        self.procs = Processes(self.dev)
        self.model = build_model(t, self.method, base_dir, self.dev, self.steps)
        self.opt = optimizer_step(self.model, t.lr, t, self.dev)
        self.schedule = get_scheduler(t.lr_scheduler, self.opt.optimizer, num_training_steps=self.steps,
                                      num_warmup_steps=int(t.warmup_ratio * self.steps))
        self.progress = RunningLoss()
        self.start = self.load_checkpoint()
        self.log = Log(live_dir, self.start, self.steps, t, self.procs.main)
        self.wrapped = self.procs.wrap(self.model)
        # the shared prefix runs as a second forward call: not under several processes (DDP expects one) or
        # activation checkpointing (which drops the cache)
        self.layouts = self.method.layouts(t.shared_prefix and self.procs.world == 1 and not t.activation_checkpointing,
                                           t.packing)
        if t.checkpoint_every and "sharded" in self.procs.kind(self.model):
            raise ResumeError("train: checkpoints of FSDP-sharded weights are not written (each process holds a "
                              "shard); set train.checkpoint_every: null, or train with DDP (docs/scaling.md)")

    # ---- resume and checkpoints
    def load_checkpoint(self) -> int:
        """Restore a matching checkpoint (weights, optimizer, schedule, RNG, loss curve, running average);
        return its step, 0 when there is none."""
        meta_path = self.ckpt / "checkpoint.json"
        if not meta_path.exists():
            return 0
        meta = json.loads(meta_path.read_text())
        if meta["fingerprint"] != self.fingerprint:
            raise ResumeError(f"train: {self.ckpt} holds a checkpoint (step {meta['step']}) made with other params "
                              f"or data; delete {self.ckpt} to start over")
        weights = load_file(str(self.ckpt / "trainable.safetensors"))
        missing = set(weights) - {n for n, _ in self.model.named_parameters()}
        if missing:
            raise ResumeError(f"train: checkpoint {self.ckpt} does not fit the model: {sorted(missing)[:3]}")
        self.model.load_state_dict(weights, strict=False)
        state = torch.load(self.ckpt / "state.pt", weights_only=True)
        self.opt.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.progress = RunningLoss(meta["loss"], meta["loss_average"])
        if self.procs.main:  # the curve so far comes back (DVC clears outputs before a rerun)
            if (self.ckpt / "live").exists():
                shutil.rmtree(self.live_dir, ignore_errors=True)
                shutil.copytree(self.ckpt / "live", self.live_dir)
            trim_curves(self.live_dir, meta["step"])
        return int(meta["step"])

    def save_checkpoint(self, step: int) -> None:
        """Trainable weights, optimizer, schedule, RNG, the loss curve and running loss so far, atomically."""
        if self.procs.main:
            with atomic_dir(self.ckpt) as tmp:
                if self.live_dir.exists():
                    shutil.copytree(self.live_dir, tmp / "live")
                trainable = {n: q.detach().cpu().contiguous() for n, q in self.model.named_parameters()
                             if q.requires_grad}
                save_file(trainable, str(tmp / "trainable.safetensors"))
                torch.save({"optimizer": self.opt.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
                            "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
                atomic_write_json(tmp / "checkpoint.json", {"step": step, "fingerprint": self.fingerprint,
                                                            "loss": self.progress.last,
                                                            "loss_average": self.progress.average})
        self.procs.wait()

    # ---- the step
    def logprobs(self, rows: list[dict]) -> torch.Tensor:
        """The labelled tokens' log-probabilities of these rows, in the layout the method allows."""
        if self.layouts["shared_prefix"] and (n := batching.common_prefix(rows)):
            return batching.prefixed(self.wrapped, rows, n, self.dev)
        if self.layouts["packing"]:
            return batching.packed(self.wrapped, rows, self.dev)
        return batching.padded(self.wrapped, rows, self.dev, self.method.prompt_learning)

    def step(self, micro: list[list[dict]]) -> tuple[float, int]:
        """One optimizer step over the micro-batches: (the mean loss per response token, tokens run here).
        A micro-batch over `train.max_batch_tokens` runs as several passes whose gradients add up to its own."""
        n_labels = sum(sum(x != IGNORE for x in r["labels"]) for mb in micro for r in mb)
        self.opt.zero()
        total, tokens = 0.0, 0
        extra = self.method.penalty(self.model)  # the method's own term, once a step (every process: DDP averages)
        for mb in micro:
            part, scale = self.procs.share(mb)
            for rows in passes(part, self.t.max_batch_tokens):
                with autocast(self.t.precision, self.dev):
                    logp = self.logprobs(rows)
                loss = -logp.sum() * scale / n_labels
                if extra is not None:
                    loss, extra = loss + extra, None
                self.opt.backward(loss)
                total += loss.item() / self.procs.world
            if scale > 1 or self.procs.main:  # a batch every process ran whole is counted once
                tokens += sum(len(r["input_ids"]) for r in part)
        self.opt.step()
        return total, tokens

    # ---- the loop
    def train(self) -> tuple[dict, dict]:
        """Steps `start + 1 .. steps`, logged, checkpointed; returns (metrics, run facts)."""
        t = self.t
        stream = micro_batches(self.rows, t.batch_size, t.group_by_length, self.seed, self.start * t.grad_accum)
        self.wrapped.train()
        tokens, t0 = 0, time.time()
        saved, k = self.start, self.start + 1
        try:
            with self.log.bar:
                for k in range(self.start + 1, self.steps + 1):
                    loss, n = self.step([next(stream) for _ in range(t.grad_accum)])
                    tokens += n
                    self.method.after_step(self.model, k)
                    self.schedule.step()
                    self.progress.add(self.procs.total(loss))
                    self.log.sft(k, self.progress.last, self.progress.average, self.schedule.get_last_lr()[0])
                    if t.checkpoint_every and k % t.checkpoint_every == 0 and k < self.steps:
                        self.save_checkpoint(k)
                        saved = k
        except KeyboardInterrupt:
            raise Interrupted(interrupted(k, self.steps, saved, self.ckpt, t.checkpoint_every)) from None
        seconds, tokens = time.time() - t0, int(self.procs.total(tokens))
        trainable, total = self.method.trainable(self.model)
        metrics = {"method": self.method.name, "steps": self.steps, "final_loss": round(self.progress.last, 4),
                   "final_loss_avg": round(self.progress.average, 4) if self.progress.average is not None else None,
                   "trainable_params": trainable, "total_params": total}
        facts = {"seconds": round(seconds, 1), "tokens": tokens, "device": self.dev.type,
                 "resumed_from_step": self.start, "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
                 "processes": self.procs.world, "distributed": self.procs.kind(self.model),
                 "allocator": allocator_in_use(), "peak_rss_mb": peak_rss_mb(),
                 "nondeterministic_ops": nondeterministic_ops(), **thread_facts()}
        if torch.cuda.is_available():
            facts["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        return metrics, facts
