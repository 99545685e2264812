"""Chunked causal attention equals full causal attention (forward and backward), rope by offset."""

import math

import pytest
import torch

from ampipe.model import ModelConfig, TransformerLayer
from ampipe.model import block_pieces as bp
from ampipe.model.attention import attention_chunk
from ampipe.model.rope import rope_cos_sin

torch.set_num_threads(1)


def naive_causal(q, k, v):
    """Explicit masked softmax, [s,b,h,d] / [s,b,g,d] → [s,b,h*d] (full sequence, GQA by repeat)."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(d)
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)
    return out.reshape(s, b, h * d)


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (6, 1)])
def test_full_attention_matches_an_explicit_masked_softmax(heads, groups):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 2, heads, 8, generator=g, dtype=torch.float64)
    k = torch.randn(9, 2, groups, 8, generator=g, dtype=torch.float64)
    v = torch.randn(9, 2, groups, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(attention_chunk(q, k, v), naive_causal(q, k, v))


@pytest.mark.parametrize("boundaries", [[0, 3, 4, 11, 16], [0, 1, 16], [0, 8, 16], [0, 15, 16]])
@pytest.mark.parametrize("heads, groups", [(4, 2), (4, 4)])
def test_concatenated_chunks_equal_full_causal_attention_forward_and_backward(boundaries, heads, groups):
    g = torch.Generator().manual_seed(1)
    s, b, d = 16, 2, 8
    q = torch.randn(s, b, heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(s, b, groups, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(s, b, groups, d, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(s, b, heads * d, generator=g, dtype=torch.float64)

    full = attention_chunk(q, k, v)
    grads_full = torch.autograd.grad(full, (q, k, v), dout)

    chunks = [attention_chunk(q[a:e], k[:e], v[:e]) for a, e in zip(boundaries[:-1], boundaries[1:])]
    chunked = torch.cat(chunks)
    grads_chunked = torch.autograd.grad(chunked, (q, k, v), dout)

    torch.testing.assert_close(chunked, full)
    for gc, gf, name in zip(grads_chunked, grads_full, "qkv"):
        torch.testing.assert_close(gc, gf, msg=lambda m: f"d{name}: {m}")


def test_shape_errors_name_the_problem():
    q = torch.randn(5, 1, 4, 8)
    with pytest.raises(ValueError, match="longer than the key/value prefix"):
        attention_chunk(q, torch.randn(3, 1, 4, 8), torch.randn(3, 1, 4, 8))
    with pytest.raises(ValueError, match="do not divide"):
        attention_chunk(q, torch.randn(5, 1, 3, 8), torch.randn(5, 1, 3, 8))
    with pytest.raises(ValueError, match="backend"):
        attention_chunk(q, q, q, backend="xformers")


def test_rope_table_of_a_chunk_is_the_rows_of_the_full_table():
    cos, sin = rope_cos_sin(16, 10000.0, 0, 32)
    cos_c, sin_c = rope_cos_sin(16, 10000.0, 11, 7)
    torch.testing.assert_close(cos_c, cos[11:18])
    torch.testing.assert_close(sin_c, sin[11:18])
    # position 0 is the identity rotation
    assert torch.equal(cos[0], torch.ones_like(cos[0])) and torch.equal(sin[0], torch.zeros_like(sin[0]))


def test_qkv_of_a_chunk_at_an_offset_equals_the_rows_of_the_full_qkv():
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, num_query_groups=2, seq_length=12, num_experts=2)
    layer = TransformerLayer(cfg, 0).double()
    x = torch.randn(12, 3, 32, dtype=torch.float64)
    full = bp.qkv(layer, x, 0)
    part = bp.qkv(layer, x[5:9], 5)
    for a, f in ((part.q, full.q), (part.k, full.k), (part.v, full.v)):
        torch.testing.assert_close(a, f[5:9])
    assert full.q.shape == (12, 3, 4, 8) and full.k.shape == (12, 3, 2, 8)
    # without the offset the rotary angles are wrong
    wrong = bp.qkv(layer, x[5:9], 0)
    assert not torch.allclose(wrong.q, full.q[5:9])


def test_qkv_uses_megatrons_per_group_layout():
    """linear_qkv rows are [group0: q heads, k, v | group1: ...] (Megatron-Core)."""
    cfg = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=2,
                      seq_length=4, num_experts=2, position_embedding_type="learned_absolute")
    layer = TransformerLayer(cfg, 0).double()
    rows = (4 + 2 * 2) * 2  # 16 output rows; make row r produce the value r + 1
    with torch.no_grad():
        layer.self_attention.linear_qkv.weight.zero_()
        layer.self_attention.linear_qkv.weight[:, 0] = torch.arange(1, rows + 1, dtype=torch.float64)
        layer.input_layernorm.weight.zero_()
        layer.input_layernorm.bias.zero_()
        layer.input_layernorm.bias[0] = 1.0  # the norm's output is e_0 for every token
    t = bp.qkv(layer, torch.randn(1, 1, 8, dtype=torch.float64), 0)
    # group 0 = rows 1..8: q heads 0,1 (1-4), k (5-6), v (7-8); group 1 = rows 9..16
    assert t.q[0, 0].tolist() == [[1, 2], [3, 4], [9, 10], [11, 12]]
    assert t.k[0, 0].tolist() == [[5, 6], [13, 14]]
    assert t.v[0, 0].tolist() == [[7, 8], [15, 16]]
