"""pipeline/core/scoring.py: choice scores from the shared prefix's and each prompt's KV cache equal full
scoring, and generation continuing from the shared prefix equals each prompt generated alone."""

import contextlib
import json

import numpy as np

from pipeline.core import scoring
from pipeline.core.encoding import encode_prompt
from pipeline.core.loading import load_tokenizer
from pipeline.methods.adapters import load_adapter


def test_choice_scores_pick_the_likeliest_continuation(trained, tiny_base):
    tok = load_tokenizer(tiny_base)
    model = load_adapter(tiny_base, trained["adapter"])
    rows = [{"prompt": "Sentence: x", "choices": ["negative", "neutral", "positive"]}]
    scores = scoring.choice_logprobs(model, tok, rows, 2).total
    # scoring one choice at a time gives the same numbers as the batched pass
    for j, c in enumerate(rows[0]["choices"]):
        single = scoring.choice_logprobs(model, tok, [{"prompt": "Sentence: x", "choices": [c]}], 1).total
        assert abs(single[0, 0] - scores[0, j]) < 1e-4


def test_cached_choice_scores_equal_scoring_each_choice_in_full(trained, tiny_base):
    # shared prefix once + each row's prompt once + choices from its KV cache == every prompt + choice in full
    tok, model = load_tokenizer(tiny_base), load_adapter(tiny_base, trained["adapter"])
    rows = [json.loads(x) for x in (trained["formatted"] / "validation.jsonl").read_text().splitlines()][:10]
    rows = [{"prompt": r["prompt"], "choices": ["a much longer answer", "no", r["choices"][0]]} for r in rows]
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    assert scoring.shared_prefix(model, prompts, "cpu")[0] >= 8  # the template's instructions are shared
    unshared = rows + [{"prompt": "short", "choices": ["a much longer answer than the others", "no", "maybe"]}]
    assert scoring.shared_prefix(model, prompts + [encode_prompt(tok, "short")], "cpu")[0] == 0
    for case in (rows, unshared):
        cached, full = scoring.choice_logprobs(model, tok, case, 4).total, scoring.full_logprobs(model, tok, case, 4).total
        assert np.isfinite(cached).all() and np.abs(cached - full).max() < 1e-3
        with model.disable_adapter():
            assert np.abs(scoring.choice_logprobs(model, tok, case, 4).total - scoring.full_logprobs(model, tok, case, 4).total).max() < 1e-3


def test_generation_from_the_shared_prefix_equals_each_prompt_alone(trained, tiny_base):
    # batches that continue from the shared prefix's cache ([prefix | padding | row]) == each prompt left alone
    tok, model = load_tokenizer(tiny_base), load_adapter(tiny_base, trained["adapter"])
    rows = [json.loads(x) for x in (trained["formatted"] / "validation.jsonl").read_text().splitlines()][:6]
    prompts = [r["prompt"] for r in rows]
    assert scoring.shared_prefix(model, [encode_prompt(tok, p) for p in prompts], "cpu")[0] >= 8
    for case in (prompts, prompts + ["short"]):  # with, and without, a shared prefix
        for adapter in (True, False):
            with contextlib.nullcontext() if adapter else model.disable_adapter():
                alone = [scoring.generate(model, tok, p, 12)[0] for p in case]
                assert scoring.generate_many(model, tok, case, 12, 4) == alone
