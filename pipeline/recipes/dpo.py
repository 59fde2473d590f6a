"""Recipe: DPO (Rafailov et al., 2023) on preference pairs, after the SFT steps, on the same adapter.

The policy is the adapter; the reference is the base model itself, reached by disabling the adapter,
so no second copy of the weights is loaded. Each step takes `train.dpo.batch_size` pairs (a seeded
permutation, renewed when used up) and raises the chosen answer's log-probability relative to the
rejected one, measured against the reference (`dpo_loss`). `train.dpo.nll_weight` adds the chosen
answers' per-token NLL (as TRL's `rpo_alpha` does): plain DPO raised the reward accuracy while the
chosen answers' loss rose and generations stopped ending (docs/results.md). Optimizer, precision (fp16
with loss scaling) and clipping are the SFT steps' own (`train.optimizer`, `train.precision`,
`train.grad_clip`), at `train.dpo.lr`.

Inputs: the train params, the model the SFT steps trained, the tokenized pairs. Output: the last step's
metrics (loss, reward accuracy and margin of its batch); the model is trained in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.encoding import sides, token_count
from pipeline.core.modeling import autocast, sequence_logprobs
from pipeline.core.optim import optimizer_step


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float):
    """(loss, implicit rewards of chosen and rejected): policy p, reference r, chosen c, rejected r."""
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(chosen_reward - rejected_reward).mean(), chosen_reward, rejected_reward


def after_sft(recipe, t, sft_dir: Path, metrics: dict, facts: dict) -> Path:
    """The SFT run's adapter kept in `sft_dir` (evaluate compares it), then the DPO steps continue it; adds
    the last DPO step's figures to `metrics` and its seconds to `facts`. Returns `sft_dir`."""
    t0 = time.time()
    if recipe.procs.main:
        recipe.method.save(recipe.model, sft_dir)
    last = train(t, recipe.model, recipe.pairs, recipe.seed, recipe.steps, recipe.log.dpo)
    metrics["dpo"] = {k: round(v, 4) for k, v in last.items()}
    facts["dpo_seconds"] = round(time.time() - t0, 1)
    return sft_dir


def train(t, model, pairs: list[dict], seed: int, first_step: int,
          log: Callable[[int, dict], None]) -> dict:
    """`t.dpo.steps` DPO steps; `log(step, metrics)` after each (steps numbered after the SFT steps).
    Returns the last step's metrics (loss, reward accuracy and margin of its batch)."""
    d = t.dpo
    dev = next(model.parameters()).device
    opt = optimizer_step(model, d.lr, t, dev, loraplus=False)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    last: dict = {}
    model.train()
    for k in range(d.steps):
        while len(order) < d.batch_size:
            order += rng.permutation(len(pairs)).tolist()
        batch, order = [pairs[i] for i in order[: d.batch_size]], order[d.batch_size :]
        chosen, rejected = sides(batch)
        with torch.no_grad(), model.disable_adapter(), autocast(t.precision, dev):
            rc, rr = sequence_logprobs(model, chosen), sequence_logprobs(model, rejected)
        with autocast(t.precision, dev):
            pc, pr = sequence_logprobs(model, chosen), sequence_logprobs(model, rejected)
        loss, cw, rw = dpo_loss(pc.float(), pr.float(), rc.float(), rr.float(), d.beta)
        if d.nll_weight:  # DPO alone can lower both answers' likelihood and wreck generation; this holds chosen up
            loss = loss - d.nll_weight * pc.float().sum() / token_count(chosen)
        opt.zero()
        opt.backward(loss)
        opt.step()
        cw, rw = cw.detach(), rw.detach()
        last = {"loss": float(loss.detach()), "reward_accuracy": float((cw > rw).float().mean()),
                "reward_margin": float((cw - rw).mean())}
        log(first_step + k + 1, last)
    return last
