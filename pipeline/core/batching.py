"""The layouts a train step can run a micro-batch in, each giving the same summed log-probability of the
labelled tokens (within floating-point tolerance; tests/test_batching.py checks loss and gradients):

- `padded`: the rows left-padded to the longest; the vocabulary projection only on the last positions.
- `prefixed`: the token prefix every row of the batch shares (found from the token ids of the batch,
  at least MIN_PREFIX tokens, ending before the first labelled token's prediction) runs once, as one
  row; its keys and values are handed to the remainders of all rows as a KV cache that keeps its
  gradients (adapters on q/k/v change them), so the prefix is in the graph, computed once.
- `packed`: the rows placed into as few sequences as hold them, each no longer than the longest row
  (first-fit decreasing), position ids restarting at every row; transformers confines attention to
  each row from those position ids (a block-diagonal causal mask); the vocabulary projection only at
  labelled positions. Sequences are never longer than the padded layout's, so attention costs no more.
  With `train.attn_implementation: varlen` (pipeline/core/varlen.py) the rows are instead one flat
  sequence with no padding at all, and the kernel is told where each row starts: no mask, no work
  across rows.

Input: rows with `input_ids` and `labels` (IGNORE outside the loss). Output: the log-probability of
every labelled token, one vector in row order (row 0's tokens first), whichever layout ran; the recipe
sums it into the loss.
"""

from __future__ import annotations

import torch

from pipeline.core import varlen
from pipeline.core.modeling import IGNORE, left_pad, response_width, token_logprobs

MIN_PREFIX = 8  # shorter shared prefixes are not worth a second forward call


def common_prefix(rows: list[dict]) -> int:
    """Tokens every row starts with and that no labelled token is predicted from (0 when fewer than MIN_PREFIX)."""
    if len(rows) < 2:
        return 0
    first = rows[0]["input_ids"]
    n = min(len(r["input_ids"]) for r in rows) - 1  # every row keeps at least one token after the prefix
    for r in rows[1:]:
        ids, k = r["input_ids"], 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    for r in rows:  # the label at position i is predicted at position i - 1, which must be after the prefix
        labelled = next((i for i, t in enumerate(r["labels"]) if t != IGNORE), len(r["labels"]))
        n = min(n, labelled - 1)
    return n if n >= MIN_PREFIX else 0


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """Row indices of each packed sequence: first-fit decreasing into sequences of at most `width` tokens."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(width - lengths[i])
    return bins


def _picked(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) where the target is not IGNORE, in row-major order."""
    mask = targets != IGNORE
    logp = torch.log_softmax(logits[mask].float(), dim=-1)
    return logp.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)


def padded(model, rows: list[dict], dev: torch.device, prompt_learning: bool = False) -> torch.Tensor:
    logp, mask = token_logprobs(model, left_pad(rows, 0, dev), response_width(rows), prompt_learning)
    return logp[mask]


def prefixed(model, rows: list[dict], n: int, dev: torch.device) -> torch.Tensor:
    """The first `n` tokens (shared by every row) once, then every row's remainder on their keys and values."""
    head = torch.tensor(rows[0]["input_ids"][:n], device=dev).unsqueeze(0)
    decoder = getattr(model, "get_base_model", lambda: model)().get_decoder()  # no logits: none are needed here
    cache = decoder(input_ids=head, position_ids=torch.arange(n, device=dev).unsqueeze(0), use_cache=True).cache
    b = len(rows)
    for layer in cache.layers:  # a view: the backward pass sums every row's gradient into the one prefix
        layer.keys = layer.keys.expand(b, -1, -1, -1)
        layer.values = layer.values.expand(b, -1, -1, -1)
    rest = [{"input_ids": r["input_ids"][n:], "labels": r["labels"][n:]} for r in rows]
    batch, keep = left_pad(rest, 0, dev), response_width(rest)
    mask = torch.cat([torch.ones(b, n, dtype=batch["attention_mask"].dtype, device=dev), batch["attention_mask"]], 1)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"] + n,
                cache=cache, use_cache=True, logits_to_keep=keep)
    return _picked(out.logits[:, -keep:-1], batch["labels"][:, -(keep - 1):])


def packed(model, rows: list[dict], dev: torch.device) -> torch.Tensor:
    """The rows packed (see `pack`) and run as a few sequences, each row attending only to itself."""
    lengths = [len(r["input_ids"]) for r in rows]
    if varlen.in_use(model):
        return flat(model, rows, lengths, dev)
    width = max(lengths)
    bins = pack(lengths, width)
    ids = torch.zeros((len(bins), width), dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    targets = torch.full((len(bins), width), IGNORE, dtype=torch.long)  # targets[j] = the label of token j + 1
    owner = torch.zeros((len(bins), width), dtype=torch.long)  # row * width + position: to restore row order
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = lengths[i]
            ids[b, at : at + n] = torch.tensor(rows[i]["input_ids"])
            pos[b, at : at + n] = torch.arange(n)
            targets[b, at : at + n - 1] = torch.tensor(rows[i]["labels"][1:])
            owner[b, at : at + n] = i * width + torch.arange(n)
            at += n
        pos[b, at:] = torch.arange(width - at)  # the tail is a segment of its own, attended by nothing else
    keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
    out = model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=None, use_cache=False,
                logits_to_keep=keep.to(dev))
    picked = _picked(out.logits, targets[:, keep].to(dev))
    order = owner[:, keep][targets[:, keep] != IGNORE].argsort()
    return picked[order.to(dev)]


def flat(model, rows: list[dict], lengths: list[int], dev: torch.device) -> torch.Tensor:
    """The rows as one sequence, in order, no padding; row boundaries go to the varlen kernel."""
    ids = torch.tensor([t for r in rows for t in r["input_ids"]]).unsqueeze(0)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    targets = torch.cat([torch.tensor(r["labels"][1:] + [IGNORE]) for r in rows]).unsqueeze(0)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(device=dev, dtype=torch.int32)
    keep = (targets[0] != IGNORE).nonzero().squeeze(-1)
    out = model(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=None, use_cache=False,
                logits_to_keep=keep.to(dev), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                max_length_k=max(lengths))
    return _picked(out.logits, targets[:, keep].to(dev))
