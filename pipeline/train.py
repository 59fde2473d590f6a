"""Stage `train`: train a PEFT adapter on the tokenized data.

`train.method` names the PEFT method and `train.<method>` holds its config class's own
arguments, passed through unchanged (`LoraConfig(**params.train.lora)`); `full` trains every
weight instead (the ceiling adapters are compared with; its output is a full checkpoint), and
`bitfit` only the bias terms (`train.bitfit.norms`: also the normalization weights).
The loop: length-grouped, dynamically (left-)padded batches; loss on response tokens only,
with the vocabulary projection computed only where the loss is (`logits_to_keep`); AdamW with
warmup and a schedule; bf16 autocast; gradient clipping; fixed seeds. Checkpoints every
`train.checkpoint_every` steps let an interrupted run resume where it stopped; a checkpoint
made with other params or data is refused.

Inputs: the tokenized data folder, the base model folder.
Task `preference`: after these (SFT) steps on the chosen answers, `train.dpo.steps` DPO steps on
the pairs continue the same adapter, against the base model as reference (pipeline/preference.py);
the SFT adapter is kept in `<out>/sft/`.

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

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pipeline import lineage
from pipeline.io import atomic_dir, atomic_write_json, atomic_write_text, sha256_text
from pipeline.methods import hooks, resolve_targets
from pipeline.methods import optimizer as make_optimizer
from pipeline.methods import save as save_model
from pipeline.modeling import (
    IGNORE,
    autocast,
    device,
    is_prompt_learning,
    left_pad,
    load_base_model,
    nondeterministic_ops,
    response_width,
    seed_everything,
    token_logprobs,
    weights_file,
)
from pipeline.params import FULL, OWN_METHODS, Params, Train, load_params, params_dict, peft_methods, section_dict
from pipeline.stage import PipelineError, entry


class ResumeError(PipelineError, RuntimeError):
    """A checkpoint exists but was made with other params or data."""


def peft_config(p: Train, steps: int, model_type: str = "llama"):
    """The PEFT config object for `train.method`, built from `train.<method>` as given (plus what a
    method derives from the run, such as AdaLoRA's total step count, and target-module presets)."""
    kwargs = resolve_targets(hooks(p.method).configure(p.peft_kwargs, steps), model_type)
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return peft_methods()[p.method](**kwargs)


def bitfit_names(model, norms: bool) -> list[str]:
    """The parameters BitFit trains: every bias, and with `norms` the normalization layers' weights."""
    names = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    if norms:
        norm_modules = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
        names += [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in norm_modules and n not in names]
    return names


def bitfit(model, norms: bool):
    """Freeze everything but the bias terms (and norms); a model with none of those is an error."""
    names = set(bitfit_names(model, norms))
    if not names:
        raise PipelineError(
            f"params.yaml: train.method 'bitfit': {type(model).__name__} has no bias parameters "
            "(Llama-style models have none), so BitFit would train nothing; set train.bitfit.norms: true to "
            "train the normalization weights instead (or use train.method: ln_tuning)")
    for n, q in model.named_parameters():
        q.requires_grad_(n in names)
    return model


def linear_layer_names(model) -> list[str]:
    """The distinct names of the model's linear layers (what `target_modules` can name)."""
    return sorted({n.split(".")[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"})


def build_model(p: Train, base_dir: Path, dev: torch.device, steps: int):
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = load_base_model(base_dir, dev, p.quantization, p.attn_implementation)
    model.config.use_cache = False
    if p.method == FULL:  # every weight trains: the ceiling the adapters are compared with
        model.requires_grad_(True)
        return model
    if p.method == "bitfit":
        return bitfit(model, p.peft_kwargs["norms"])
    if p.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft_config(p, steps, model.config.model_type)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        targets = getattr(config, "target_modules", None)
        if targets is None or not any(w in str(e) for w in ("not found", "not supported", "no module")):
            raise
        shown = sorted(targets) if isinstance(targets, set) else targets
        raise PipelineError(
            f"params.yaml: train.{p.method}.target_modules {shown!r} "
            f"matches no supported module of {type(model).__name__}; its linear layers are: "
            f"{', '.join(linear_layer_names(model))} (or use 'all-linear')"
        ) from None


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


def peak_rss_mb() -> int:
    """Peak resident memory of this process so far, in MiB."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (2**20 if sys.platform == "darwin" else 2**10))


class Processes:
    """This process's share of a run started by `accelerate launch` (DDP, FSDP, ...); with one
    process every method is a no-op. Each process takes every `world`-th row of each batch; the
    loss is scaled so the averaged gradients equal the one-process gradient of the whole batch."""

    def __init__(self, dev: torch.device) -> None:
        self.acc = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=dev.type == "cpu")
        self.rank = self.acc.process_index if self.acc else 0
        self.world = self.acc.num_processes if self.acc else 1
        self.main = self.rank == 0
        asked = [k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"]
        if self.acc and asked and self.acc.distributed_type.value != asked[0] and self.main:
            print(f"train: warning: the accelerate config asks for {asked[0]} but accelerate runs it as "
                  f"{self.acc.distributed_type.value} on {dev.type}: every process holds the whole model "
                  "(FSDP and DeepSpeed shard only on GPUs)", file=sys.stderr, flush=True)

    def wrap(self, model):
        return self.acc.prepare_model(model) if self.acc else model

    def kind(self, model) -> str:
        """How the run was spread: "single", or accelerate's distributed type, marked "sharded" when
        the parameters became DTensors (FSDP2)."""
        if not self.acc:
            return "single"
        sharded = any(type(q).__name__ == "DTensor" for q in model.parameters())
        return f"{self.acc.distributed_type.value}{', sharded' if sharded else ''}"

    def share(self, rows: list) -> tuple[list, int]:
        """This process's rows of a micro-batch and the loss scale (a batch smaller than the number
        of processes is run whole by each, unscaled)."""
        if self.world == 1 or len(rows) < self.world:
            return rows, 1
        return rows[self.rank :: self.world], self.world

    def total(self, x: float) -> float:
        if not self.acc:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def wait(self) -> None:
        if self.acc:
            self.acc.wait_for_everyone()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def end_processes() -> None:
    """Every process waits for the main one's save, then leaves the process group (a process that exits
    inside it can abort in gloo's threads)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def fit(p: Params, data: Path, base_dir: Path, live_dir: Path, ckpt: Path):
    """Train; returns the PEFT model, the run's deterministic metrics and its run facts (timings, memory);
    nothing is saved but checkpoints and the curve."""
    # load
    from datasets import load_from_disk
    from dvclive import Live
    from transformers import get_scheduler

    t = p.train
    seed_everything(p.seed, p.deterministic)
    dev = device()
    procs = Processes(dev)
    train_ds = load_from_disk(str(data / "train"))
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in train_ds]
    lengths = [len(r["input_ids"]) for r in rows]
    per_epoch = math.ceil(len(rows) / t.batch_size)
    steps = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / t.grad_accum))

    # build
    model = build_model(t, base_dir, dev, steps)
    if t.method in OWN_METHODS:
        trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
        total = sum(q.numel() for q in model.parameters())
    else:
        trainable, total = model.get_nb_trainable_parameters()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = make_optimizer(model, t.lr, t.weight_decay, t.loraplus_lr_ratio, t.optimizer)
    after_step = hooks(t.method).after_step
    # fp16 needs loss scaling against underflow; for fp32/bf16 the scaler is a no-op
    scaler = torch.amp.GradScaler(dev.type, enabled=t.precision == "fp16")
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * steps),
                              num_training_steps=steps)
    fp = fingerprint(p, data, base_dir)
    start = load_checkpoint(ckpt, model, optimizer, scheduler, fp)
    prompt_learning = is_prompt_learning(model)
    core, model = model, procs.wrap(model)  # `model` runs the steps (DDP-wrapped when launched so)

    # run
    def micro_batches(from_micro: int):
        k, epoch = 0, 0
        while True:
            for b in plan_epoch(lengths, t.batch_size, t.group_by_length, p.seed + epoch):
                if k >= from_micro:
                    yield [rows[i] for i in b]
                k += 1
            epoch += 1

    stream = micro_batches(start * t.grad_accum)
    if start and procs.main:  # the curve so far comes back from the checkpoint (DVC clears outputs before a rerun)
        if (ckpt / "live").exists():
            shutil.rmtree(live_dir, ignore_errors=True)
            shutil.copytree(ckpt / "live", live_dir)
        trim_curves(live_dir, start)
    live = Live(dir=str(live_dir), resume=start > 0, dvcyaml=None, save_dvc_exp=False, report=None) if procs.main \
        else None
    model.train()
    t0, tokens, loss_ema, last_loss = time.time(), 0, None, float("nan")
    with Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), disable=not procs.main) as bar:  # stderr: unbuffered under dvc
        task = bar.add_task("train", total=steps, completed=start, loss="-")
        for step in range(start + 1, steps + 1):
            micro = [next(stream) for _ in range(t.grad_accum)]
            n_labels = sum(sum(x != IGNORE for x in r["labels"]) for mb in micro for r in mb)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for mb in micro:
                part, scale = procs.share(mb)
                batch = left_pad(part, 0, dev)
                with autocast(t.precision, dev):
                    logp, _ = token_logprobs(model, batch, response_width(part), prompt_learning)
                loss = -logp.sum() * scale / n_labels
                scaler.scale(loss).backward()
                step_loss += loss.item() / procs.world
                if scale > 1 or procs.main:  # a batch every process ran whole is counted once
                    tokens += int(batch["attention_mask"].sum())
            scaler.unscale_(optimizer)
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            after_step(core, step)
            scheduler.step()
            step_loss = procs.total(step_loss)
            last_loss = step_loss
            loss_ema = step_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * step_loss
            if live:
                live.step = step
                live.log_metric("train/loss", step_loss)
                live.log_metric("train/lr", scheduler.get_last_lr()[0])
                live.make_summary()
            bar.update(task, advance=1, loss=f"{loss_ema:.4f}")
            if procs.main and (step % t.log_every == 0 or step == steps):
                bar.console.log(f"step {step}/{steps} loss {step_loss:.4f} (avg {loss_ema:.4f})")
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < steps:
                if procs.main:
                    save_checkpoint(ckpt, core, optimizer, scheduler, step, fp, live_dir)
                procs.wait()
    seconds = time.time() - t0
    tokens = int(procs.total(tokens))
    dpo_metrics, dpo_seconds = None, 0.0
    if p.task == "preference":  # SFT done: keep that adapter, then DPO on the pairs from it
        if procs.main:
            save_model(core, ckpt / "sft")
        t1 = time.time()
        dpo_metrics = run_dpo(p, core, list(train_ds), live, steps)
        dpo_seconds = time.time() - t1

    # report: what the same inputs always give (hashed by DVC), and what differs run to run (run.json)
    metrics = {
        "method": t.method, "steps": steps, "final_loss": round(last_loss, 4),
        "final_loss_avg": round(loss_ema, 4) if loss_ema is not None else None,
        "trainable_params": trainable, "total_params": total,
    }
    facts = {"seconds": round(seconds, 1), "tokens": tokens,
             "tokens_per_second": round(tokens / seconds, 1) if seconds else None, "device": dev.type,
             "peak_rss_mb": peak_rss_mb(), "processes": procs.world, "distributed": procs.kind(core),
             "resumed_from_step": start, "nondeterministic_ops": nondeterministic_ops()}
    if dpo_metrics:
        metrics["dpo"] = {k: round(v, 4) for k, v in dpo_metrics.items()}
        facts["dpo_seconds"] = round(dpo_seconds, 1)
    if dev.type == "cuda":
        facts["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if live:
        live.summary.update(metrics)
        live.make_summary()
        live.end()
    return core, metrics, facts


def run_dpo(p: Params, model, pairs: list[dict], live, sft_steps: int) -> dict:
    """DPO steps on the training pairs (pipeline/preference.py), logged after the SFT steps."""
    from pipeline.preference import dpo

    console = Console(stderr=True)

    def log(step: int, m: dict) -> None:
        if live:
            live.step = step
            for k, v in m.items():
                live.log_metric(f"dpo/{k}", v)
            live.make_summary()
        if live and ((step - sft_steps) % p.train.log_every == 0 or step == sft_steps + p.train.dpo.steps):
            console.log(f"dpo step {step - sft_steps}/{p.train.dpo.steps} loss {m['loss']:.4f} "
                        f"reward accuracy {m['reward_accuracy']:.2f} margin {m['reward_margin']:.3f}")

    return dpo(p.train.dpo, model, pairs, p.train.precision, p.seed, log, sft_steps)


def save(p: Params, model, metrics: dict, data: Path, base_dir: Path, out: Path, ckpt: Path | None = None) -> None:
    """The adapter (safetensors), its one record and the template it was trained with, atomically. Nothing
    here depends on when, where or how fast the run was: the same inputs give the same bytes."""
    t = p.train
    fp = fingerprint(p, data, base_dir)
    base = json.loads((base_dir / "base.json").read_text())
    fmt = json.loads((data / "format.json").read_text())
    tok = json.loads((data / "tokenize.json").read_text())
    with atomic_dir(out) as tmp:
        weights = tmp / weights_file(t.method)
        if t.method == "bitfit":  # only the trained tensors
            from safetensors.torch import save_file

            save_file({n: q.detach().cpu().contiguous() for n, q in model.named_parameters() if q.requires_grad},
                      str(weights), metadata={"format": "pt"})
        else:  # a PEFT adapter, or (full) a plain transformers checkpoint
            save_model(model, tmp)
        for name in ("format.json", "tokenize.json"):
            shutil.copy(data / name, tmp / name)
        if p.task == "preference" and ckpt is not None and (ckpt / "sft").exists():
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
    return [*cmd, "--num_processes", str(t.num_processes), "--module", "pipeline.train", *argv]


def main(
    data: Path = typer.Option(..., help="tokenized data folder"),
    base: Path = typer.Option(..., help="base model folder"),
    out: Path = typer.Option(..., help="adapter output folder"),
    live: Path = typer.Option(..., help="dvclive folder (metrics, loss curve)"),
    checkpoints: Path = typer.Option(...),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
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
