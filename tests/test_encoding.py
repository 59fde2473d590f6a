"""pipeline/core/encoding.py: the prompt masked and the response labelled with EOS, training's prompt
tokens equal serving's, and the truncation policies."""

import pytest

from pipeline.core.encoding import IGNORE, encode, encode_prompt
from pipeline.core.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_base):
    return load_tokenizer(tiny_base)


def test_prompt_masked_response_labelled_with_eos(tok):
    e = encode(tok, "Sentence: Sales rose .", "positive", max_length=256, truncation="response")
    n_prompt = len(encode_prompt(tok, "Sentence: Sales rose ."))
    assert e["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]
    assert e["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(e["input_ids"][n_prompt:-1]) == "positive"
    assert not e["truncated"]


def test_training_prompt_tokens_equal_serving_prompt_tokens(tok):
    prompt = "<|im_start|>user\nClassify: Sales rose .<|im_end|>\n<|im_start|>assistant\n"
    e = encode(tok, prompt, "positive", max_length=256, truncation="response")
    served = encode_prompt(tok, prompt)
    assert e["input_ids"][: len(served)] == served


@pytest.mark.parametrize("policy", ["response", "prompt", "drop"])
def test_truncation_policies(tok, policy):
    prompt, response = "market " * 20, "silver " * 20
    full = encode(tok, prompt, response, max_length=10_000, truncation=policy)
    e = encode(tok, prompt, response, max_length=30, truncation=policy)
    if policy == "drop":
        assert e is None
        return
    assert len(e["input_ids"]) == 30 and e["truncated"]
    if policy == "response":
        assert e["input_ids"] == full["input_ids"][:30]
        assert e["input_ids"][-1] != tok.eos_token_id
    else:
        assert e["input_ids"] == full["input_ids"][-30:]
        assert e["labels"][-1] == tok.eos_token_id
