"""Preference pairs (task `preference`): the DPO loss, the log-probabilities of both sides of a
pair, and the reward metrics.

DPO (Rafailov et al., 2023) raises the log-probability of the chosen answer relative to the
rejected one, measured against a reference model (the base, reached by disabling the adapter).
The training steps are the recipe in pipeline/recipes/dpo.py; this module holds what that recipe
and the evaluation of the preference task (`pair_logprobs`, `reward_metrics`) share.
Rows are tokenized pairs: `input_ids` / `labels` (prompt + chosen) and `rejected_input_ids` /
`rejected_labels` (prompt + rejected).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.modeling import IGNORE, batches, left_pad, response_width, token_logprobs


def sequence_logprobs(model, rows: list[dict], prompt_learning: bool = False) -> torch.Tensor:
    """Summed log-probability of each row's labelled (response) tokens; keeps the graph."""
    dev = next(model.parameters()).device
    logp, _ = token_logprobs(model, left_pad(rows, 0, dev), response_width(rows), prompt_learning)
    return logp.sum(-1)


def sides(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    chosen = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in pairs]
    rejected = [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in pairs]
    return chosen, rejected


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float):
    """(loss, implicit rewards of chosen and rejected): policy p, reference r, chosen c, rejected r."""
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(chosen_reward - rejected_reward).mean(), chosen_reward, rejected_reward


def token_count(rows: list[dict]) -> int:
    return sum(sum(t != IGNORE for t in r["labels"]) for r in rows)


@torch.no_grad()
def pair_logprobs(model, pairs: list[dict], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probabilities of every pair's chosen and rejected answers."""
    out = []
    for side in sides(pairs):
        scores = np.zeros(len(side))
        order = sorted(range(len(side)), key=lambda i: len(side[i]["input_ids"]))
        for idx in batches(order, batch_size):
            scores[idx] = sequence_logprobs(model, [side[i] for i in idx]).float().cpu().numpy()
        out.append(scores)
    return out[0], out[1]


def reward_metrics(policy: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
                   beta: float) -> dict:
    """DPO's implicit reward against the reference: how often chosen beats rejected, and by how much."""
    chosen = beta * (policy[0] - reference[0])
    rejected = beta * (policy[1] - reference[1])
    return {"reward_accuracy": round(float((chosen > rejected).mean()), 4),
            "reward_margin": round(float((chosen - rejected).mean()), 4)}


def preference_accuracy(scores: tuple[np.ndarray, np.ndarray]) -> float:
    """How often a model gives the chosen answer more probability than the rejected one."""
    return round(float((scores[0] > scores[1]).mean()), 4)
