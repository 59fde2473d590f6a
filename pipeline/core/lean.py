"""The train step's computation kept, its memory and copies cut: changes to a model built for training.

- `frozen_weights_in(model, dtype)`: under bf16 (fp16) autocast every linear layer casts its fp32 weight
  to bf16 on every call, and the cast copy is kept for the backward pass (the input's gradient needs it;
  docs/speed.md#memory has the figures). Frozen linear weights
  stored in the autocast dtype once give the same matmuls bit for bit (autocast would have rounded them
  the same way) with none of the copies, and half their resident memory. Trainable weights, weights
  shared with the embedding (a tied output layer), quantized layers and DoRA's base layers (DoRA reads
  the base weight in fp32 to normalise it) stay as they are, copied out of the checkpoint's memory map
  (transformers maps the safetensors file; its pages, read once by the conversion, would stay resident).
- `lean_dropout(model)`: PEFT's LoRA dropout (`nn.Dropout`) keeps a full fp32 mask per call on a CPU
  (4 bytes per element of each adapted layer's input, as much as the input itself) and draws it with a
  per-element Bernoulli sampler that costs more than the layer's matmul. `MaskDropout` draws 16 random
  bits per element from 64-bit draws of the same torch generator (so seeding and resuming work as
  before), keeps a 1-byte mask, and drops with probability round(p * 65536) / 65536 (0.05 ->
  0.0500031), scaling the kept elements by 1 / (1 - that). The same regulariser, a different random
  stream: adapters trained before and after differ by their dropout draws only.
- `recompute_attention(model)`: eager attention keeps, per layer, the fp32 and the bf16 attention
  probabilities and the key/value heads repeated for grouped-query attention. Its core (scores,
  mask, softmax, weighted values) runs under a non-reentrant activation checkpoint instead,
  registered as the attention implementation
  `eager_recompute`: only query (in the autocast dtype, which the core's first matmul casts it to
  anyway), key, value and mask are kept, and the core is run again in the backward pass with the same kernels, so
  the gradients are the same bits (one more QK^T and softmax per layer).
- `recompute_swiglu(model)`: a gated MLP (`down(act(gate(x)) * up(x))`: Llama, Mistral, Qwen, Gemma, ...)
  keeps gate, act(gate) and up; with `act(gate) * up` checkpointed it keeps gate and up only (the
  activation is recomputed in the backward pass, the same bits), a third less.

`apply(model, dtype, recompute)` does all four (the train stage's `train.lean`).

Inputs: a model made trainable by a method (pipeline/methods). Output: the same model, changed in place.
"""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

BITS = 16  # resolution of the drop probability: p is rounded to a multiple of 2**-16


class _MaskDropout(torch.autograd.Function):
    # the kept elements scaled, the dropped ones set to zero in place: two passes over x and no float copy of
    # the mask (multiplying by the uint8 mask made one, and a third pass); the kept values are the same bits
    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        drop = words.view(torch.int16)[:n].view(x.shape) < threshold - 2 ** (BITS - 1)
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.mul(scale).masked_fill_(drop, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return grad.mul(ctx.scale).masked_fill_(drop, 0), None, None


class MaskDropout(torch.nn.Module):
    """Inverted dropout with a 1-byte mask; the identity in eval mode or at p = 0."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 2**BITS)  # values below it (of 2**16 equally likely) are dropped
        self.scale = 2**BITS / (2**BITS - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        return _MaskDropout.apply(x, self.threshold, self.scale)

    def extra_repr(self) -> str:
        return f"p={self.threshold / 2**BITS:.7f}"


def lean_dropout(model: torch.nn.Module) -> int:
    """Replace every LoRA dropout (`lora_dropout[adapter]`, an `nn.Dropout`) by `MaskDropout`; returns how many."""
    n = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is torch.nn.Dropout:
                drops[name] = MaskDropout(drop.p)
                n += 1
    return n


def frozen_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights (and biases) of plain linear layers in `dtype`, the autocast dtype the
    step runs in; returns the number of values converted."""
    tied = {id(q) for m in model.modules() if isinstance(m, torch.nn.Embedding) for q in m.parameters()}
    dora = {id(m.base_layer) for m in model.modules()
            if any(getattr(m, "use_dora", {}).values()) and hasattr(m, "base_layer")}
    n = 0
    for m in model.modules():
        if type(m) is not torch.nn.Linear or id(m) in dora:
            continue
        for q in (m.weight, m.bias):
            if q is None or q.requires_grad or id(q) in tied or q.dtype != torch.float32:
                continue
            q.data = q.data.to(dtype)
            n += q.numel()
    if n:  # the rest copied out of the checkpoint file's memory map, which is then released with the fp32
        for q in [*model.parameters(), *model.buffers()]:  # pages the conversion read (RSS counts them)
            if q.dtype == torch.float32:
                q.data = q.data.clone()
    return n


RECOMPUTE = "eager_recompute"


def _eager_core(module, query, key, value, attention_mask, scaling, dropout, training):
    from transformers.models.llama.modeling_llama import repeat_kv

    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value)


def eager_recompute(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' eager attention (the same operations in the same order), its core checkpointed while
    gradients are recorded. Returns no attention weights (they are not kept)."""
    if torch.is_autocast_enabled(query.device.type):  # what the core's first matmul would cast it to: kept at
        query = query.to(torch.get_autocast_dtype(query.device.type))  # half the size (RoPE made it fp32); not
        # the keys, whose gradient is summed over the heads that share them in the dtype they arrive in
    args = (module, query, key, value, attention_mask, scaling, dropout, module.training)
    if torch.is_grad_enabled() and module.training:
        out = checkpoint(_eager_core, *args, use_reentrant=False, preserve_rng_state=dropout > 0)
    else:
        out = _eager_core(*args)
    return out.transpose(1, 2).contiguous(), None


def recompute_attention(model: torch.nn.Module) -> bool:
    """Switch a model running eager attention to `eager_recompute` (registered with transformers once);
    returns whether it did (other implementations keep little already: sdpa, flash)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    config = getattr(model, "config", None)
    if config is None or config._attn_implementation != "eager":
        return False
    AttentionInterface.register(RECOMPUTE, eager_recompute)
    ALL_MASK_ATTENTION_FUNCTIONS.register(RECOMPUTE, eager_mask)
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == "eager":
            c._attn_implementation = RECOMPUTE
    return True


def _gated(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act(gate) * up


def _swiglu_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and self.training:
        return self.down_proj(checkpoint(_gated, self.act_fn, gate, up, use_reentrant=False, preserve_rng_state=False))
    return self.down_proj(_gated(self.act_fn, gate, up))


def recompute_swiglu(model: torch.nn.Module) -> int:
    """Checkpoint `act(gate) * up` in every gated MLP whose forward is the plain `down(act(gate(x)) * up(x))`
    (its class's forward is checked against that shape); returns how many MLPs."""
    n = 0
    for m in model.modules():
        if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) and _plain_gated(type(m)):
            m.forward = types.MethodType(_swiglu_forward, m)
            n += 1
    return n


def _plain_gated(cls: type) -> bool:
    import inspect

    try:
        src = "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return False
    return "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))" in src


def apply(model: torch.nn.Module, dtype: torch.dtype | None, recompute: bool) -> None:
    """All of the above: frozen weights in the autocast `dtype` (None: fp32, left as they are), lean
    dropout, and, when `recompute` (not under activation checkpointing, which recomputes whole layers
    already), attention and SwiGLU recomputed in backward."""
    if dtype is not None:
        frozen_weights_in(model, dtype)
    lean_dropout(model)
    if recompute:
        recompute_attention(model)
        recompute_swiglu(model)
