"""pipeline/core/lean.py: the lean model gives the plain model's loss and every adapter gradient bit for bit
(bf16 autocast, both batch layouts), keeps fewer bytes for the backward pass, and its dropout drops at the
asked rate with a mask it can replay."""

from __future__ import annotations

import pytest
import torch
from test_batching import rows_of

from pipeline.core import batching, lean
from pipeline.core.modeling import autocast

CPU = torch.device("cpu")


def lora_model(base, dropout: float = 0.0, **extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager")
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], **extra)
    return get_peft_model(model, config).train()


def step(model, layout, rows) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, every trainable gradient, and the bytes autograd kept for the backward pass (parameters excluded)."""
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: set[int] = set()
    kept = {"bytes": 0}

    def pack(x):
        ptr = x.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            kept["bytes"] += x.untyped_storage().nbytes()
        return x

    model.zero_grad(set_to_none=True)
    with autocast("bf16", CPU), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        n = batching.common_prefix(rows)
        logp = batching.prefixed(model, rows, n, CPU) if layout == "prefixed" else batching.padded(model, rows, CPU)
    loss = -logp.sum()
    loss.backward()
    return loss.detach(), {k: q.grad.clone() for k, q in model.named_parameters() if q.requires_grad}, kept["bytes"]


def make_lean(model) -> None:
    assert lean.frozen_weights_in(model, torch.bfloat16) > 0
    assert lean.recompute_attention(model)
    assert lean.recompute_swiglu(model) == 2  # the tiny model's two layers


@pytest.mark.parametrize("layout", ["padded", "prefixed"])
def test_lean_step_is_the_same_bits_with_less_kept(tiny_base, prepared, layout):
    rows = rows_of(prepared, 8)
    plain = step(lora_model(tiny_base), layout, rows)
    model = lora_model(tiny_base)
    make_lean(model)
    slim = step(model, layout, rows)
    assert torch.equal(plain[0], slim[0])
    assert plain[1].keys() == slim[1].keys() and len(plain[1]) == 2 * 2 * 5  # A and B, 2 layers, 5 targets
    for name, g in plain[1].items():
        assert g.abs().sum() > 0 and torch.equal(g, slim[1][name]), name
    assert slim[2] < 0.8 * plain[2], (slim[2], plain[2])


def test_frozen_weights_in_leaves_trainable_tied_and_dora_weights(tiny_base):
    model = lora_model(tiny_base)
    lean.frozen_weights_in(model, torch.bfloat16)
    dtypes = {n: q.dtype for n, q in model.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.mlp.down_proj.weight"] == torch.bfloat16  # not adapted
    assert all(q.dtype == torch.float32 for q in model.parameters() if q.requires_grad)
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32  # tied to lm_head
    assert all("norm" not in n for n, d in dtypes.items() if d == torch.bfloat16)

    dora = lora_model(tiny_base, use_dora=True)
    lean.frozen_weights_in(dora, torch.bfloat16)
    layer = dora.base_model.model.model.layers[0]
    assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.float32  # DoRA normalises it in fp32
    assert layer.mlp.down_proj.weight.dtype == torch.bfloat16


def test_recompute_attention_only_replaces_eager(tiny_base):
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation="sdpa")
    assert not lean.recompute_attention(sdpa)
    eager = AutoModelForCausalLM.from_pretrained(str(tiny_base), attn_implementation="eager")
    assert lean.recompute_attention(eager) and eager.config._attn_implementation == lean.RECOMPUTE


def test_mask_dropout_rate_scale_gradient_and_replay():
    drop = lean.MaskDropout(0.05)
    assert drop.threshold == 3277 and drop.scale == pytest.approx(1 / (1 - 3277 / 65536))
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    # 400,000 draws at p = 0.0500031: the kept share is within 5 standard deviations (0.0017) of 1 - p
    assert abs(kept - (1 - 3277 / 65536)) < 0.0017
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], drop.scale))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum)/dx = mask * scale
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)  # the same generator state gives the same mask (seeding, resuming)
    assert not torch.equal(drop(x), y)
    drop.eval()
    assert drop(x) is x
    assert lean.MaskDropout(0.0)(x) is x


def test_lean_dropout_replaces_every_lora_dropout(tiny_base):
    model = lora_model(tiny_base, dropout=0.1)
    assert lean.lean_dropout(model) == 2 * 5
    drops = [m for m in model.modules() if isinstance(m, lean.MaskDropout)]
    assert len(drops) == 10 and all(d.p == 0.1 for d in drops)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert lean.lean_dropout(lora_model(tiny_base, dropout=0.0)) == 0  # PEFT uses the identity then


def test_mask_dropout_is_the_product_with_its_mask():
    """The dropout's output and gradient are x * keep * scale and g * keep * scale (the formula before the
    masked fill), bit for bit, for the mask the same generator state draws."""
    drop = lean.MaskDropout(0.1)
    x = torch.randn(3, 7, 64, requires_grad=True)
    n = x.numel()
    torch.manual_seed(11)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    keep = (words.view(torch.int16)[:n].view(x.shape) >= drop.threshold - 2 ** (lean.BITS - 1)).float()
    torch.manual_seed(11)
    y = drop(x)
    assert torch.equal(y, x.detach() * keep * drop.scale) and 0 < (y == 0).float().mean() < 0.2
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g * keep * drop.scale)
