"""Variable-length attention for packed training (`train.attn_implementation: varlen`).

A packed micro-batch (pipeline/core/batching.py `packed`) is, with this kernel, one flat sequence of
every row's tokens, no padding at all, with the row boundaries as cumulative lengths (`cu_seq_lens_q`).
Each row attends causally to itself only:
  - on CUDA (Ampere or newer) under bf16/fp16 through PyTorch's own flash-attention varlen kernel
    (`torch.nn.attention.varlen`), which never builds a mask and does no work across rows;
  - otherwise (CPU, the tests, fp32 training: the kernel has no fp32) row by row with
    `scaled_dot_product_attention`, the same function in the inputs' own precision.
A call without row boundaries (evaluation, padded or shared-prefix batches) is ordinary sdpa with the
mask transformers builds for sdpa, so a model loaded with this kernel runs every layout.

Input: the query, key and value transformers hands an attention function ((batch, heads, tokens, dim)).
Output: the attention output as (batch, tokens, heads, dim), as transformers' own kernels return it.
"""

from __future__ import annotations

import functools
import inspect

import torch

NAME = "varlen"


@functools.cache
def available_on_cuda() -> bool:
    """Whether this torch build has the flash varlen kernel and a CUDA device that runs it (sm80+)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _causal() -> dict:
    """varlen_attn's causal argument (renamed between torch releases), looked up once."""
    from torch.nn.attention.varlen import varlen_attn

    named = inspect.signature(varlen_attn).parameters
    return {"is_causal": True} if "is_causal" in named else {"window_size": (-1, 0)}


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
           scale: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
    out = varlen_attn(q.to(dtype), k.to(dtype), v.to(dtype), cu, cu, longest, longest, scale=scale, **_causal())
    return out.to(q.dtype)


def _rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None) -> torch.Tensor:
    bounds = cu.tolist()
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        parts.append(torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True,
            scale=scale).transpose(0, 1))
    return torch.cat(parts)


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, scaling=None,
              dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function registered under NAME (transformers' AttentionInterface signature)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("varlen attention takes one flat sequence of rows (batch size 1)")
    if dropout:
        raise ValueError("varlen attention has no attention dropout; use sdpa for a model that sets one")
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups`
    q = query[0].transpose(0, 1)  # (tokens, heads, dim)
    k = key[0].repeat_interleave(groups, 0).transpose(0, 1)
    v = value[0].repeat_interleave(groups, 0).transpose(0, 1)
    half = torch.is_autocast_enabled("cuda") or q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and half and available_on_cuda():
        out = _flash(q, k, v, cu_seq_lens_q.to(torch.int32), int(max_length_q), scaling)
    else:
        out = _rows(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


def register() -> None:
    """Make NAME a valid `attn_implementation` for transformers (masks as for sdpa: see the docstring)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def implementation(name: str, dev: torch.device, packing: bool) -> str:
    """`train.attn_implementation` as transformers takes it: `auto` is eager on CPU (training steps measured
    faster than sdpa there), on a GPU this kernel for packed half-precision training (`packing`) where torch
    has it, else sdpa. NAME is registered with transformers when chosen."""
    if name == "auto":
        name = "eager" if dev.type == "cpu" else NAME if packing and available_on_cuda() else "sdpa"
    if name == NAME:
        register()
    return name


def in_use(model) -> bool:
    """Whether `model` (a PEFT model or a plain one) was loaded with this attention."""
    base = getattr(model, "get_base_model", lambda: model)()
    return getattr(base.config, "_attn_implementation", None) == NAME
