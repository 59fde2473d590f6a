"""Model helpers the train, evaluate and export stages share: device, seeding and determinism,
precision, left-padded batches and the log-probabilities of labelled tokens.

Left padding makes every row end at the last position, so a batch's response tokens all sit in
its last `k` positions and the vocabulary projection is computed only there (`logits_to_keep`).
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings

import numpy as np
import torch

from pipeline.core.encoding import IGNORE


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_NONDETERMINISTIC: list[str] = []


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every generator; with `deterministic` (params), also ask PyTorch for deterministic kernels
    (cuBLAS needs a fixed workspace for that, set before CUDA starts). A kernel that has no
    deterministic version warns instead of failing; `nondeterministic_ops()` names those that ran.
    Deterministic mode would also fill every new tensor before use (`fill_uninitialized_memory`: a guard
    for code that reads memory it never wrote, which none here does): off, the same bits, and the train
    step's thousands of fills (8% of its operator time on the short prompt: docs/speed.md) are gone."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
        _record_nondeterministic_warnings()


def _record_nondeterministic_warnings() -> None:
    show = warnings.showwarning
    if getattr(show, "_peftflow", False):
        return

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "does not have a deterministic implementation" in text:
            op = text.split(" does not have")[0].strip()
            if op not in _NONDETERMINISTIC:
                _NONDETERMINISTIC.append(op)
        show(message, category, filename, lineno, file, line)

    record._peftflow = True
    warnings.showwarning = record
    warnings.filterwarnings("always", message=".*does not have a deterministic implementation.*")


def nondeterministic_ops() -> list[str]:
    """The operations that ran without a deterministic kernel since `seed_everything` (usually none on CPU)."""
    return list(_NONDETERMINISTIC)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype `train.precision` computes in under autocast; None for fp32 (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(precision: str, dev: torch.device):
    """bf16/fp16 autocast on the device, or nothing for fp32."""
    dtype = autocast_dtype(precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=dev.type, dtype=dtype)


def left_pad(rows: list[dict], pad_id: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Batch rows with `input_ids` (and optional `labels`) padded on the left.

    Position ids count from each row's first real token, as if it were unpadded.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n :] = torch.tensor(r["input_ids"])
        mask[i, width - n :] = 1
        if "labels" in r:
            labels[i, width - n :] = torch.tensor(r["labels"])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}
    return {k: v.to(dev) for k, v in batch.items()}


def response_width(rows: list[dict]) -> int:
    """Positions at the end of a left-padded batch that hold every labelled token (+1 for the shift)."""
    widest = 0
    for r in rows:
        labelled = [i for i, t in enumerate(r["labels"]) if t != IGNORE]
        if labelled:
            widest = max(widest, len(r["labels"]) - labelled[0])
    return widest + 1


def token_logprobs(model, batch: dict[str, torch.Tensor], keep: int, prompt_learning: bool = False):
    """Per-token log-probabilities of the labels in the last `keep - 1` positions.

    Returns (logp, mask) of shape (batch, keep - 1): logp is 0 where the label is ignored.
    """
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if not prompt_learning:
        kwargs["position_ids"] = batch["position_ids"]
    out = model(**kwargs, logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, -keep:-1, :].float()
    labels = batch["labels"][:, -(keep - 1) :]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def sequence_logprobs(model, rows: list[dict], prompt_learning: bool = False) -> torch.Tensor:
    """Summed log-probability of each row's labelled (response) tokens; keeps the graph."""
    dev = next(model.parameters()).device
    logp, _ = token_logprobs(model, left_pad(rows, 0, dev), response_width(rows), prompt_learning)
    return logp.sum(-1)
