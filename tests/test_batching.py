"""Layouts of a train step (pipeline/core/batching.py): the shared-prefix and packed layouts give the
padded layout's per-token log-probabilities and every adapter gradient, on the tiny model in fp32."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.core import batching, varlen
from pipeline.core.encoding import IGNORE


def lora_model(base, seed: int = 0, attn: str = "eager"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation=varlen.implementation(attn, torch.device("cpu"), False))
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], init_lora_weights=False)
    return get_peft_model(model, config).train()  # B != 0: the adapters change the prefix's keys and values


def rows_of(prepared, n: int, start: int = 0) -> list[dict]:
    from datasets import load_from_disk

    ds = load_from_disk(str(prepared["tokenized"] / "train"))
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in ds.select(range(start, start + n))]


def run(model, layout, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token log-probs and the gradient of their sum for every trainable tensor."""
    model.zero_grad(set_to_none=True)
    logp = layout(model, *args)
    logp.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), grads


def same(a: tuple, b: tuple) -> None:
    assert a[0].shape == b[0].shape
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for name in a[1]:
        assert b[1][name].abs().sum() > 0, f"{name}: no gradient"
        scale = a[1][name].abs().max()  # float32 sums in another order: equal to ~1e-6 of the tensor's size
        assert (a[1][name] - b[1][name]).abs().max() <= 1e-5 * scale, name


def test_common_prefix_is_the_rows_shared_tokens(prepared):
    rows = rows_of(prepared, 8)
    n = batching.common_prefix(rows)
    shared = os.path.commonprefix([r["input_ids"] for r in rows])
    first_label = min(next(i for i, t in enumerate(r["labels"]) if t != IGNORE) for r in rows)
    assert batching.MIN_PREFIX <= n == min(len(shared), first_label - 1)
    assert batching.common_prefix(rows[:1]) == 0  # one row: nothing to share
    other = [{"input_ids": [7, *r["input_ids"]], "labels": [IGNORE, *r["labels"]]} for r in rows[:1]]
    assert batching.common_prefix(rows[:3] + other) == 0  # one row starts otherwise


def test_shared_prefix_equals_padded(tiny_base, prepared):
    model = lora_model(tiny_base)
    rows = rows_of(prepared, 8)
    n = batching.common_prefix(rows)
    assert n >= batching.MIN_PREFIX
    dev = torch.device("cpu")
    same(run(model, batching.padded, rows, dev), run(model, batching.prefixed, rows, n, dev))


@pytest.mark.parametrize("attn", ["eager", "varlen"])
def test_packing_equals_padded(tiny_base, prepared, attn):
    """Packed into few sequences (eager: a block-diagonal mask from the position ids), or one flat sequence
    with row boundaries (varlen: row by row on CPU, the flash varlen kernel on CUDA)."""
    model = lora_model(tiny_base, seed=1, attn=attn)
    assert varlen.in_use(model) == (attn == "varlen")
    rows = rows_of(prepared, 12)
    rows[3] = {"input_ids": rows[3]["input_ids"][:10], "labels": rows[3]["labels"][:10]}  # short rows: several
    rows[7] = {"input_ids": rows[7]["input_ids"][:14], "labels": rows[7]["labels"][:14]}  # fit one sequence
    rows[3]["labels"][-2:] = rows[3]["input_ids"][-2:]
    rows[7]["labels"][-3:] = rows[7]["input_ids"][-3:]
    lengths = [len(r["input_ids"]) for r in rows]
    bins = batching.pack(lengths, max(lengths))
    assert len(bins) < len(rows) and sorted(i for b in bins for i in b) == list(range(len(rows)))
    assert all(sum(lengths[i] for i in b) <= max(lengths) for b in bins)
    dev = torch.device("cpu")
    same(run(model, batching.padded, rows, dev), run(model, batching.packed, rows, dev))


def test_packing_keeps_rows_apart(tiny_base, prepared):
    """Changing one row's tokens changes no other row's log-probs in a packed sequence."""
    model = lora_model(tiny_base).eval()
    rows = rows_of(prepared, 2)
    width = sum(len(r["input_ids"]) for r in rows)
    with torch.no_grad():
        before = batching.packed(model, rows + [{"input_ids": [1] * width, "labels": [IGNORE] * width}],
                                 torch.device("cpu"))
        assert rows[0]["input_ids"][0] != 5
        changed = [{**rows[0], "input_ids": [5] + rows[0]["input_ids"][1:]}, rows[1]]
        after = batching.packed(model, changed + [{"input_ids": [1] * width, "labels": [IGNORE] * width}],
                                torch.device("cpu"))
    k = sum(t != IGNORE for t in rows[0]["labels"][1:])
    assert len(batching.pack([len(r["input_ids"]) for r in rows] + [width], width)) == 2  # rows 0 and 1 share one
    torch.testing.assert_close(before[k:], after[k:], rtol=0, atol=1e-7)
    assert not torch.equal(before[:k], after[:k])


@pytest.mark.parametrize("lengths,width,expect", [([5, 3, 2], 5, [[0], [1, 2]]), ([4, 4, 4], 8, [[0, 1], [2]])])
def test_pack_first_fit_decreasing(lengths, width, expect):
    assert batching.pack(lengths, width) == expect
