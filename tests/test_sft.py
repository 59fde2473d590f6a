"""pipeline/recipes/sft.py: a micro-batch over `train.max_batch_tokens` runs in several passes with the same
loss and gradients as one pass (tiny model, fp32, in the shared-prefix and padded layouts)."""

from __future__ import annotations

import pytest
from conftest import recipe_on
from test_batching import lora_model, rows_of

from pipeline.recipes import sft


def rows_with(lengths: list[int]) -> list[dict]:
    return [{"input_ids": [1] * n, "labels": [-100] * n} for n in lengths]


def test_passes_keep_order_and_budget():
    rows = rows_with([10, 9, 9, 5, 5, 5])
    groups = sft.passes(rows, 20)
    assert [[len(r["input_ids"]) for r in g] for g in groups] == [[10, 9], [9, 5], [5, 5]]
    assert [r for g in groups for r in g] == rows  # every row once, in order
    assert all(len(g) * max(len(r["input_ids"]) for r in g) <= 20 for g in groups)
    assert sft.passes(rows, None) == [rows]
    assert sft.passes(rows_with([30, 4]), 20) == [rows_with([30]), rows_with([4])]  # too long: alone


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_split_step_gives_the_same_loss_and_gradients(tiny_base, prepared, shared_prefix):
    rows = rows_of(prepared, 8)
    widest = max(len(r["input_ids"]) for r in rows)
    out = {}
    for budget in (None, 3 * widest):  # one pass; three
        assert len(sft.passes(rows, budget)) == (1 if budget is None else 3)
        model = lora_model(tiny_base)
        loss, tokens = recipe_on(model, "lora", shared_prefix, budget).step([rows])
        out[budget] = (loss, tokens, {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad})
    (l1, t1, g1), (l3, t3, g3) = out.values()
    assert t1 == t3 == sum(len(r["input_ids"]) for r in rows)
    assert l3 == pytest.approx(l1, rel=1e-5)
    for name, g in g1.items():
        assert g.abs().sum() > 0, name
        assert (g - g3[name]).abs().max() <= 1e-5 * g.abs().max(), name
