"""Recipe: supervised fine-tuning, the loss on the response tokens only.

Batches: the rows shuffled with the seed (a new permutation each epoch), grouped by length when
`train.group_by_length` (similar lengths together, so little padding). Each micro-batch runs in one of
the layouts of pipeline/core/batching.py, all giving the same loss: the rows' shared token prefix once
(`train.shared_prefix`, when the rows have one), else packed (`train.packing`), else left-padded; the
vocabulary projection is computed only where the loss is. A micro-batch larger than
`train.max_batch_tokens` (rows x longest row) runs in several passes, so the longest batches of a run
do not set its peak memory; the gradient is the same sum. `train.grad_accum`
micro-batches make one optimizer step; the loss is the mean over the step's response tokens. Under
`accelerate launch` each process takes its share of every micro-batch (`Processes.share`), scaled so
the averaged gradients equal the one-process gradient. A run resumed at step k continues with exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core import batching
from pipeline.core.modeling import IGNORE, autocast, is_prompt_learning
from pipeline.core.training import Processes, Stepper


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


@dataclass
class Loop:
    """What the steps run on: `model` (DDP-wrapped when launched so), its unwrapped `core`, the stepper,
    the schedule, the processes, the method's hook after each step, and the layouts allowed."""

    model: torch.nn.Module
    core: torch.nn.Module
    stepper: Stepper
    scheduler: object
    procs: Processes
    precision: str
    after_step: Callable[[torch.nn.Module, int], None]
    penalty: Callable[[torch.nn.Module], torch.Tensor | None] = lambda model: None
    shared_prefix: bool = False
    packing: bool = False
    max_batch_tokens: int | None = None


def logprobs(loop: Loop, rows: list[dict], dev: torch.device) -> torch.Tensor:
    """The labelled tokens' log-probabilities of these rows, in the layout the loop allows."""
    if loop.shared_prefix and (n := batching.common_prefix(rows)):
        return batching.prefixed(loop.model, rows, n, dev)
    if loop.packing:
        return batching.packed(loop.model, rows, dev)
    return batching.padded(loop.model, rows, dev, is_prompt_learning(loop.core))


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


def step(loop: Loop, micro: list[list[dict]]) -> tuple[float, int]:
    """One optimizer step over the micro-batches: (the mean loss per response token, tokens run here).
    A micro-batch over `train.max_batch_tokens` runs as several passes whose gradients add up to its own."""
    dev = next(loop.core.parameters()).device
    n_labels = sum(sum(x != IGNORE for x in r["labels"]) for mb in micro for r in mb)
    loop.stepper.zero()
    total, tokens = 0.0, 0
    extra = loop.penalty(loop.core)  # the method's own term, once a step (every process adds it: DDP averages)
    for mb in micro:
        part, scale = loop.procs.share(mb)
        for rows in passes(part, loop.max_batch_tokens):
            with autocast(loop.precision, dev):
                logp = logprobs(loop, rows, dev)
            loss = -logp.sum() * scale / n_labels
            if extra is not None:
                loss, extra = loss + extra, None
            loop.stepper.backward(loss)
            total += loss.item() / loop.procs.world
        if scale > 1 or loop.procs.main:  # a batch every process ran whole is counted once
            tokens += sum(len(r["input_ids"]) for r in part)
    loop.stepper.step()
    return total, tokens


def train(loop: Loop, rows: list[dict], t, seed: int, start: int, steps: int,
          on_step: Callable[[int, float, float], None], checkpoint: Callable[[int], None]) -> int:
    """Steps `start + 1 .. steps`; `on_step(step, loss, lr)` after each, `checkpoint(step)` every
    `train.checkpoint_every` steps. Returns the tokens run."""
    stream = micro_batches(rows, t.batch_size, t.group_by_length, seed, start * t.grad_accum)
    loop.model.train()
    tokens = 0
    for k in range(start + 1, steps + 1):
        loss, n = step(loop, [next(stream) for _ in range(t.grad_accum)])
        tokens += n
        loop.after_step(loop.core, k)
        loop.scheduler.step()
        on_step(k, loop.procs.total(loss), loop.scheduler.get_last_lr()[0])
        if t.checkpoint_every and k % t.checkpoint_every == 0 and k < steps:
            checkpoint(k)
    return int(loop.procs.total(tokens))
