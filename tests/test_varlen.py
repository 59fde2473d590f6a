"""pipeline/core/varlen.py: the attention each setting chooses, and varlen attention on one flat sequence of
rows (row by row on a CPU) equal to attending within each row alone."""

import torch

from pipeline.core import varlen

CPU = torch.device("cpu")


def test_auto_is_eager_on_cpu_and_varlen_is_registered_when_asked():
    assert varlen.implementation("auto", CPU, packing=True) == "eager"
    assert varlen.implementation("sdpa", CPU, packing=False) == "sdpa"
    assert varlen.implementation("varlen", CPU, packing=True) == varlen.NAME
    from transformers import AttentionInterface

    assert varlen.NAME in AttentionInterface._global_mapping


def test_flat_rows_attend_within_themselves_only():
    torch.manual_seed(0)
    lengths, heads, dim = [3, 5, 2], 4, 8
    q, k, v = (torch.randn(1, heads, sum(lengths), dim) for _ in range(3))
    cu = torch.tensor([0, 3, 8, 10])
    out, _ = varlen.attention(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=5)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = torch.nn.functional.scaled_dot_product_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :],
                                                                 is_causal=True)
        assert torch.allclose(out[0, a:b], alone[0].transpose(0, 1), atol=1e-6)
