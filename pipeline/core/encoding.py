"""Encoding: prompt + response -> input ids and labels, with the prompt masked.

The prompt and the response are tokenized separately (the prompt exactly as `predict` tokenizes
it at serving time) and joined; the labels are -100 over the prompt, so the loss is on the
response only, and an EOS token closes every response so the model learns to stop. Rows longer
than the limit follow the truncation policy: `response` cuts the end of the response, `prompt`
the start of the prompt, `drop` drops the row.
"""

from __future__ import annotations

from pipeline.core.modeling import IGNORE


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, as in training and at serving time."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def join(p_ids: list[int], r_ids: list[int], max_length: int, truncation: str) -> dict | None:
    """One training row from prompt and response ids (EOS included), or None if it is dropped."""
    excess = len(p_ids) + len(r_ids) - max_length
    truncated = excess > 0
    if truncated:
        if truncation == "drop":
            return None
        if truncation == "prompt" and excess < len(p_ids):
            p_ids = p_ids[excess:]
        elif truncation == "response" and excess < len(r_ids):
            r_ids = r_ids[: len(r_ids) - excess]
        else:
            return None  # nothing left of the part we may cut: dropped
    return {
        "input_ids": p_ids + r_ids,
        "labels": [IGNORE] * len(p_ids) + r_ids,
        "length": len(p_ids) + len(r_ids),
        "truncated": truncated,
    }


def encode_many(tokenizer, prompts: list[str], responses: list[str], max_length: int,
                truncation: str) -> list[dict | None]:
    """`encode` for many rows with two batched calls to the fast tokenizer (see bench/)."""
    if not prompts:
        return []
    p_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    return [join(p, r + eos, max_length, truncation) for p, r in zip(p_ids, r_ids, strict=True)]


def encode(tokenizer, prompt: str, response: str, max_length: int, truncation: str) -> dict | None:
    """One training row, or None if it is dropped. `truncated` says whether it was cut."""
    return encode_many(tokenizer, [prompt], [response], max_length, truncation)[0]

