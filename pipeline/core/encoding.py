"""Encoding: prompt + response -> input ids and labels, with the prompt masked.

The prompt and the response are tokenized separately (the prompt exactly as `predict` tokenizes
it at serving time) and joined; the labels are -100 over the prompt, so the loss is on the
response only, and an EOS token closes every response so the model learns to stop. Rows longer
than the limit follow the truncation policy: `response` cuts the end of the response, `prompt`
the start of the prompt, `drop` drops the row.
"""

from __future__ import annotations

IGNORE = -100  # the label of a position with no loss (PyTorch's and transformers' ignore index)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, as in training and at serving time."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def join(p_ids: list[int], r_ids: list[int], max_length: int | None, truncation: str) -> dict | None:
    """One training row from prompt and response ids (EOS included), or None if it is dropped
    (`max_length` None: no limit)."""
    excess = 0 if max_length is None else len(p_ids) + len(r_ids) - max_length
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


def encode_many(tokenizer, prompts: list[str], responses: list[str], max_length: int | None,
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


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive positions that have a label (a loss)."""
    runs, start = [], None
    for i, t in enumerate([*labels, IGNORE]):
        if t != IGNORE and start is None:
            start = i
        elif t == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def mask_audit(tokenizer, input_ids: list[int], labels: list[int], expected: list[str], truncated: bool) -> str | None:
    """Whether the loss falls on exactly the expected texts: each run of labelled tokens, decoded, must be
    the next expected text (a response and its EOS; an assistant turn's content and end-of-turn) and
    nothing else may be labelled. A truncated row may lose whole texts or the ends of one at its edges.
    Returns what is wrong (None when the mask is right)."""
    if any(lab != IGNORE and lab != i for lab, i in zip(labels, input_ids, strict=True)):
        return "a label differs from its input token"
    got = [tokenizer.decode(input_ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
           for a, b in labelled_runs(labels)]
    if not truncated:
        return None if got == expected else f"the loss covers {got!r}, expected {expected!r}"
    for k in range(len(expected) - len(got) + 1):  # the kept runs are consecutive expected texts, cut at the edges
        want = expected[k : k + len(got)]
        if all(g == w or (i == 0 and w.endswith(g)) or (i == len(got) - 1 and w.startswith(g.rstrip("\ufffd")))
               for i, (g, w) in enumerate(zip(got, want, strict=True))):
            return None
    return f"the loss covers {got!r}, expected a part of {expected!r}"


def sides(pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Preference pairs as two lists of rows: prompt + chosen, prompt + rejected."""
    chosen = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in pairs]
    rejected = [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in pairs]
    return chosen, rejected


def token_count(rows: list[dict]) -> int:
    """How many labelled tokens the rows hold."""
    return sum(sum(t != IGNORE for t in r["labels"]) for r in rows)
