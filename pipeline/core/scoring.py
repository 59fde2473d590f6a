"""Scoring and generation shared by evaluate, predict and gguf, handed to the tasks as a `Scorer`.

Label scoring: each label's rendered response (with EOS) is scored as a continuation of the prompt;
the tokens every prompt shares (system prompt, instructions) run once, as a KV cache. The scores
keep each choice's first-token log-probability and its token count too, so one pass serves the
classification rules (full log-likelihood, length-normalised, first token, calibrated). Eval loss
is the mean NLL of the response tokens; generation is greedy (one prompt, or batches of prompts
left-padded) and reports whether it stopped at EOS. A prompt-learning adapter (virtual tokens before
every row: prefix, prompt, P-tuning) brings its own cache, so it is scored on whole prompts.

`Scorer` holds the model, its tokenizer, the batch size and whether the adapter is a prompt-learning
one (its method says so); `with scorer.base():` scores the base model (the adapter disabled).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.encoding import IGNORE, encode_many, encode_prompt, sides
from pipeline.core.io import write_jsonl
from pipeline.core.modeling import batches, left_pad, response_width, sequence_logprobs, token_logprobs


def shared_prefix(model, prompts: list[list[int]], dev: torch.device, min_tokens: int = 8):
    """(length, KV cache) of the tokens every prompt starts with (system prompt, instructions), run
    once for all rows; (0, None) when they share fewer than `min_tokens`."""
    first, common = prompts[0], min(len(p) for p in prompts) - 1  # every row keeps a token of its own
    for p in prompts[1:]:
        common = next((k for k in range(common) if p[k] != first[k]), common)
    if common < min_tokens:
        return 0, None
    out = model(input_ids=torch.tensor([first[:common]], device=dev), use_cache=True, logits_to_keep=1)
    return common, out.past_key_values



def prefix_cache(shared, common: int, mask: torch.Tensor):
    """(cache, mask) for a batch continuing from the shared prefix: a copy of its cache for every row,
    and the batch's attention mask with the prefix's `common` positions in front; (None, mask) when
    there is no shared prefix."""
    if not common:
        return None, mask
    cache = copy.deepcopy(shared)
    cache.batch_repeat_interleave(mask.shape[0])
    return cache, torch.cat([mask.new_ones(mask.shape[0], common), mask], -1)


@dataclass
class ChoiceScores:
    """Log-probabilities of every choice (with EOS) after its prompt, each of shape (rows, choices)."""

    total: np.ndarray   # summed over the choice's tokens and EOS
    first: np.ndarray   # of the choice's first token alone
    tokens: np.ndarray  # how many tokens `total` sums (EOS included)


@torch.no_grad()
def choice_logprobs(model, tok, rows: list[dict], batch_size: int, prompt_learning: bool = False) -> ChoiceScores:
    """Every choice's summed and first-token log-probability after its prompt, and its length.

    The tokens all prompts share (system prompt, instructions) run once; each row's own part of
    the prompt runs once from that cache, and its choices continue from the row's cache: a row
    costs its own tokens plus a few choice tokens (measured against free generation in bench/).
    Prompt-learning adapters bring their own cache: they score prompt + choice in full.
    """
    if prompt_learning:
        return full_logprobs(model, tok, rows, batch_size, prompt_learning)
    dev = next(model.parameters()).device
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    n = len(rows[0]["choices"])
    scores = ChoiceScores(*(np.full((len(rows), n), -np.inf) for _ in range(2)), np.zeros((len(rows), n), int))
    common, shared = shared_prefix(model, prompts, dev)
    for idx in batches(sorted(range(len(rows)), key=lambda i: len(prompts[i])), batch_size):
        batch = left_pad([{"input_ids": prompts[i][common:]} for i in idx], 0, dev)
        cache, prompt_mask = prefix_cache(shared, common, batch["attention_mask"])
        out = model(input_ids=batch["input_ids"], attention_mask=prompt_mask,
                    position_ids=batch["position_ids"] + common, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).repeat_interleave(n, 0)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        # each choice's tokens (+ EOS), right-padded: position k predicts token k + 1
        choices = [tok(rows[i]["choices"], add_special_tokens=False)["input_ids"] for i in idx]
        targets = [c + [tok.eos_token_id] for cs in choices for c in cs]
        width = max(len(t) for t in targets) - 1
        feed = torch.zeros((len(targets), width), dtype=torch.long)
        want = torch.full((len(targets), width), IGNORE, dtype=torch.long)
        for k, t in enumerate(targets):
            feed[k, : len(t) - 1] = torch.tensor(t[:-1], dtype=torch.long)
            want[k, : len(t) - 1] = torch.tensor(t[1:], dtype=torch.long)
        feed, want = feed.to(dev), want.to(dev)
        prompt_mask = prompt_mask.repeat_interleave(n, 0)
        start = prompt_mask.sum(-1, keepdim=True)
        total = first.gather(-1, torch.tensor([t[0] for t in targets], device=dev)[:, None]).squeeze(-1)
        head = total.clone()
        if width:
            logits = model(input_ids=feed, attention_mask=torch.cat([prompt_mask, torch.ones_like(feed)], -1),
                           position_ids=start + torch.arange(width, device=dev), past_key_values=cache,
                           use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1).gather(-1, want.clamp(min=0)[..., None]).squeeze(-1)
            total = total + (logp * (want != IGNORE)).sum(-1)
        at = (np.repeat(idx, n), np.tile(np.arange(n), len(idx)))
        scores.total[at], scores.first[at] = total.cpu().numpy(), head.cpu().numpy()
        scores.tokens[at] = [len(t) for t in targets]
    return scores


@torch.no_grad()
def full_logprobs(model, tok, rows: list[dict], batch_size: int, prompt_learning: bool = False) -> ChoiceScores:
    """`choice_logprobs` with every prompt + choice as its own row (no shared cache)."""
    dev = next(model.parameters()).device
    pairs = [(i, j, r["prompt"], c) for i, r in enumerate(rows) for j, c in enumerate(r["choices"])]
    encoded = encode_many(tok, [p for *_, p, _ in pairs], [c for *_, c in pairs], None, "response")
    items = sorted(((i, j, e) for (i, j, _, _), e in zip(pairs, encoded, strict=True)),
                   key=lambda x: len(x[2]["input_ids"]))
    shape = (len(rows), len(rows[0]["choices"]))
    scores = ChoiceScores(np.full(shape, -np.inf), np.full(shape, -np.inf), np.zeros(shape, int))
    for chunk in batches(items, batch_size):
        enc = [e for _, _, e in chunk]
        logp, mask = token_logprobs(model, left_pad(enc, 0, dev), response_width(enc), prompt_learning)
        heads = logp.gather(-1, mask.int().argmax(-1, keepdim=True)).squeeze(-1)  # the first labelled position
        for k, (i, j, _) in enumerate(chunk):
            scores.total[i, j], scores.first[i, j] = float(logp[k].sum()), float(heads[k])
            scores.tokens[i, j] = int(mask[k].sum())
    return scores


@torch.no_grad()
def eval_loss(model, rows: list[dict], batch_size: int, prompt_learning: bool = False) -> float:
    """The mean NLL per labelled token of the rows."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for chunk in batches(sorted(rows, key=lambda r: len(r["input_ids"])), batch_size):
        logp, mask = token_logprobs(model, left_pad(chunk, 0, dev), response_width(chunk), prompt_learning)
        total -= float(logp.sum())
        count += int(mask.sum())
    return total / max(count, 1)


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    """Greedy completion of one prompt; returns (text, stopped at EOS)."""
    dev = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tok, prompt)], device=dev)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return decode(tok, new), tok.eos_token_id in new


def decode(tok, new: list[int]) -> str:
    """Generated token ids as text, cut at the first EOS."""
    return tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new, skip_special_tokens=True)


@torch.no_grad()
def generate_many(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int,
                  prefix: bool = True) -> list[str]:
    """Greedy completions of many prompts in batches of similar length (answers up to EOS).

    As in label scoring, the tokens every prompt shares (system prompt, instructions, few-shot examples)
    run once, as a KV cache each batch continues from; each row's own tokens are left-padded after it,
    so a batch reads [shared prefix | padding | row], positions counting on from the prefix. Without a
    shared prefix (or `prefix` false: a prompt-learning adapter) the prompts are left-padded whole.
    """
    dev = next(model.parameters()).device
    encoded = [encode_prompt(tok, p) for p in prompts]
    common, shared = shared_prefix(model, encoded, dev) if prefix else (0, None)
    out: list[str] = [""] * len(prompts)
    for idx in batches(sorted(range(len(prompts)), key=lambda i: len(encoded[i])), batch_size):
        batch = left_pad([{"input_ids": encoded[i][common:]} for i in idx], tok.pad_token_id, dev)
        ids = batch["input_ids"]
        cache, mask = prefix_cache(shared, common, batch["attention_mask"])
        if common:  # generate takes the whole sequence; the cache already holds the prefix's part
            ids = torch.cat([torch.tensor([encoded[idx[0]][:common]], device=dev).expand(len(idx), -1), ids], -1)
        gen = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        for i, new in zip(idx, gen[:, ids.shape[1]:].tolist(), strict=True):
            out[i] = decode(tok, new)
    return out


def write_samples(model, tok, rows: list[dict], n: int, max_new_tokens: int, path: Path) -> float:
    """Greedy generations of base (adapter disabled) and adapter for the first `n` rows, side by side in a
    jsonl file; returns the adapter's ratio of answers that stopped at EOS."""
    samples = []
    for r in rows[:n]:
        with model.disable_adapter():
            base_text, base_stop = generate(model, tok, r["prompt"], max_new_tokens)
        text, stop = generate(model, tok, r["prompt"], max_new_tokens)
        samples.append({"row": r["row"], "prompt": r["prompt"], "reference": r["response"],
                        "base": base_text, "adapter": text, "base_stopped": base_stop, "adapter_stopped": stop})
    write_jsonl(path, samples)
    return round(sum(s["adapter_stopped"] for s in samples) / max(len(samples), 1), 3)


@torch.no_grad()
def pair_logprobs(model, pairs: list[dict], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probabilities of every preference pair's chosen and rejected answers."""
    out = []
    for side in sides(pairs):
        scores = np.zeros(len(side))
        order = sorted(range(len(side)), key=lambda i: len(side[i]["input_ids"]))
        for idx in batches(order, batch_size):
            scores[idx] = sequence_logprobs(model, [side[i] for i in idx]).float().cpu().numpy()
        out.append(scores)
    return out[0], out[1]


class Scorer:
    """The scoring and generation above for one model (adapter on; `base()` for the adapter disabled)."""

    def __init__(self, model, tok, batch_size: int, prompt_learning: bool = False) -> None:
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.prompt_learning = prompt_learning  # the active adapter adds virtual tokens (no shared KV prefix)

    @contextlib.contextmanager
    def base(self) -> Iterator[Scorer]:
        """The base model answers inside (the adapter disabled, so a KV cache applies)."""
        saved = self.prompt_learning
        with self.model.disable_adapter():
            self.prompt_learning = False
            try:
                yield self
            finally:
                self.prompt_learning = saved

    def choices(self, rows: list[dict]) -> ChoiceScores:
        return choice_logprobs(self.model, self.tok, rows, self.batch_size, self.prompt_learning)

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return generate_many(self.model, self.tok, prompts, max_new_tokens, self.batch_size,
                             prefix=not self.prompt_learning)

    def loss(self, rows: list[dict]) -> float:
        return eval_loss(self.model, rows, self.batch_size, self.prompt_learning)

    def pairs(self, pairs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        return pair_logprobs(self.model, pairs, self.batch_size)

    def samples(self, rows: list[dict], n: int, max_new_tokens: int, path: Path) -> float:
        return write_samples(self.model, self.tok, rows, n, max_new_tokens, path)

