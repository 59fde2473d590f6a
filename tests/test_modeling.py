"""pipeline/core/modeling.py: left padding keeps each row's positions, the response width covers every
labelled token, token log-probabilities equal a plain forward's, seeding is repeatable."""

import pytest
import torch

from pipeline.core.encoding import IGNORE
from pipeline.core.loading import load_base_model
from pipeline.core.modeling import (
    autocast_dtype,
    batches,
    left_pad,
    response_width,
    seed_everything,
    sequence_logprobs,
    token_logprobs,
)

CPU = torch.device("cpu")
ROWS = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, IGNORE, IGNORE, 8, 9]},
        {"input_ids": [11, 12], "labels": [IGNORE, 12]}]


def test_left_pad_ends_every_row_at_the_last_position_with_its_own_positions():
    b = left_pad(ROWS, 0, CPU)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 0, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert b["position_ids"][1, 3:].tolist() == [0, 1] and b["labels"][1].tolist() == [IGNORE] * 4 + [12]
    assert response_width(ROWS) == 3  # row 0's labels start 2 from the end, +1 for the shift


def test_token_logprobs_equal_a_plain_forward(tiny_base):
    model = load_base_model(tiny_base, CPU).eval()
    batch = left_pad(ROWS, 0, CPU)
    logp, mask = token_logprobs(model, batch, response_width(ROWS))
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([ROWS[0]["input_ids"]])).logits.float(), -1)[0]
    want = [float(full[i - 1, ROWS[0]["input_ids"][i]]) for i in (3, 4)]
    assert mask[0].tolist() == [True, True] and logp[0].tolist() == pytest.approx(want, abs=1e-5)
    assert sequence_logprobs(model, ROWS)[0].item() == pytest.approx(sum(want), abs=1e-5)


def test_seeding_repeats_and_precision_names_its_dtype():
    seed_everything(3)
    a = torch.rand(4)
    seed_everything(3)
    assert torch.equal(a, torch.rand(4)) and torch.are_deterministic_algorithms_enabled()
    # deterministic kernels, without filling every new tensor first (docs/speed.md#where-the-step-goes)
    assert torch.utils.deterministic.fill_uninitialized_memory is False
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert autocast_dtype("bf16") is torch.bfloat16 and autocast_dtype("fp32") is None
    assert list(batches(list(range(5)), 2)) == [[0, 1], [2, 3], [4]]
