"""dilated_compiler.compat against the old library's documented behaviour (shared/reference/old-library.md).

``old_dilated_attention`` below re-implements the old DilatedAttention algorithm directly from that
description, independently of the spec machinery: heads split into contiguous groups, one per
(segment, dilation); the first h % groups groups get one extra head; group i uses offset i % r; attention within
each dilated segment; skipped positions 0; output divided by the number of groups. n divisible by every segment.
"""

import math

import pytest
import torch

from dilated_compiler import compat
from dilated_compiler.nn import DilatedMultiheadAttention
from dilated_compiler.spec import AttentionSpec, Branch

from conftest import assert_close, make_qkv


def old_dilated_attention(q, k, v, segment_lengths, dilation_rates, is_causal=False, scale=None):
    b, n, h, d = q.shape
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    G = len(segment_lengths)
    sizes = [h // G + (1 if i < h % G else 0) for i in range(G)]
    starts = [sum(sizes[:i]) for i in range(G)]
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    for i, (s, r) in enumerate(zip(segment_lengths, dilation_rates)):
        assert n % s == 0
        offset = i % r
        heads = slice(starts[i], starts[i] + sizes[i])
        for seg in range(n // s):
            idx = torch.arange(seg * s + offset, (seg + 1) * s, r)
            qs, ks, vs = q[:, idx, heads], k[:, idx, heads], v[:, idx, heads]  # (b, L, g, d)
            scores = torch.einsum("blgd,bmgd->bglm", qs, ks) * scale
            if is_causal:
                L = len(idx)
                scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            o = torch.einsum("bglm,bmgd->blgd", scores.softmax(-1), vs)
            out[:, idx, heads] += o
    return out / G


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,segs,dils", [
    (4, [8, 16], [1, 2]),
    (5, [4, 8, 16], [1, 2, 4]),      # uneven groups: 2, 2, 1 heads
    (7, [8, 16, 32], [2, 3, 4]),     # offsets 0, 1, 2; r=3 leaves a remainder inside each segment
])
def test_dilated_attention_matches_old_algorithm(causal, heads, segs, dils):
    q, k, v = make_qkv(2, 32, heads, 8, dtype=torch.float64, seed=3)
    attn = compat.DilatedAttention(segs, dils, backend="torch")
    out = attn(q, k, v, is_causal=causal)
    expected = old_dilated_attention(q, k, v, segs, dils, is_causal=causal)
    assert out.dtype == torch.float64 and out.shape == q.shape
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    # float32: the tolerance of the dtype
    out32 = attn(q.float(), k.float(), v.float(), is_causal=causal)
    assert_close(out32, expected, torch.float32)


def test_softmax_scale_is_honoured_and_improved_is_the_same_computation():
    q, k, v = make_qkv(1, 16, 4, 8, dtype=torch.float64, seed=4)
    segs, dils = [4, 16], [1, 4]
    out = compat.DilatedAttention(segs, dils, softmax_scale=0.7, backend="torch")(q, k, v)
    torch.testing.assert_close(out, old_dilated_attention(q, k, v, segs, dils, scale=0.7), atol=1e-10, rtol=1e-10)
    improved = compat.ImprovedDilatedAttention(segs, dils, backend="torch", use_tf32=True)
    torch.testing.assert_close(improved(q, k, v), old_dilated_attention(q, k, v, segs, dils), atol=1e-10,
                               rtol=1e-10)


def test_any_length_is_accepted_and_equals_grouped_spec_over_groups():
    # the old code needed n divisible by every segment; here the last segment is shorter (spec semantics)
    from dilated_compiler import reference
    q, k, v = make_qkv(1, 27, 4, 8, dtype=torch.float64, seed=5)
    out = compat.DilatedAttention([8, 16], [1, 2], backend="torch")(q, k, v)
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2)), head_assignment="grouped")
    torch.testing.assert_close(out, reference.attention(q, k, v, spec) / 2, atol=1e-10, rtol=1e-10)


def test_key_padding_and_causal_mask_are_honoured():
    q, k, v = make_qkv(2, 16, 4, 8, dtype=torch.float64, seed=6)
    attn = compat.DilatedAttention([4, 16], [1, 2], backend="torch")
    causal_mask = torch.ones(16, 16, dtype=torch.bool).triu(1)
    torch.testing.assert_close(attn(q, k, v, attention_mask=causal_mask), attn(q, k, v, is_causal=True))
    kpm = torch.zeros(2, 16, dtype=torch.bool)
    kpm[0, 8:] = True
    from dilated_compiler import reference
    spec = AttentionSpec((Branch(4, 1), Branch(16, 2)))
    torch.testing.assert_close(attn(q, k, v, key_padding_mask=kpm),
                               reference.attention(q, k, v, spec, key_padding_mask=kpm) / 2, atol=1e-10, rtol=1e-10)


def _old_multihead(mha, x, segs, dils, is_causal=False):
    """The old MultiheadDilatedAttention computation (projections, old attention, sub-LN, out proj)."""
    b, n, e = x.shape
    h = mha.num_heads
    q = mha.q_proj(x).view(b, n, h, -1)
    k = mha.k_proj(x).view(b, n, h, -1)
    v = mha.v_proj(x).view(b, n, h, -1)
    o = old_dilated_attention(q, k, v, segs, dils, is_causal=is_causal).to(x.dtype).reshape(b, n, e)
    if mha.sub_ln is not None:
        o = mha.sub_ln(o)
    return mha.out_proj(o)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_multihead_dilated_attention_old_argument_order_and_numbers(layer_norm):
    torch.manual_seed(0)
    segs, dils = [8, 16], [1, 2]
    # old order: (embed_dim, num_heads, dilation_rates, segment_lengths, ...)
    mha = compat.MultiheadDilatedAttention(32, 4, dils, segs, layer_norm=layer_norm, layer_norm_eps=1e-6,
                                           dtype=torch.float64, backend="torch")
    assert mha.spec.branches == (Branch(8, 1), Branch(16, 2))
    assert (mha.sub_ln is not None) == layer_norm
    if layer_norm:
        assert mha.sub_ln.eps == 1e-6
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    out = mha(x)  # key and value default to query; returns the tensor alone, as the old class did
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(out, _old_multihead(mha, x, segs, dils), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(mha(x, x, x, is_causal=True), _old_multihead(mha, x, segs, dils, True),
                                   atol=1e-10, rtol=1e-10)
    improved = compat.ImprovedMultiheadDilatedAttention(32, 4, dils, segs, layer_norm=layer_norm, layer_norm_eps=1e-6,
                                                        dtype=torch.float64, use_tf32=True, backend="torch")
    improved.load_state_dict(mha.state_dict())
    torch.testing.assert_close(improved(x), out)


def test_multihead_magneto_init():
    torch.manual_seed(0)
    mha = compat.MultiheadDilatedAttention(256, 4, [1, 2], [8, 16], gamma_init=3.0, backend="torch")
    std = lambda w: w.std().item()  # noqa: E731
    xavier = math.sqrt(2.0 / (256 + 256))
    assert std(mha.q_proj.weight) == pytest.approx(xavier, rel=0.05)
    assert std(mha.k_proj.weight) == pytest.approx(xavier, rel=0.05)
    assert std(mha.v_proj.weight) == pytest.approx(3.0 * xavier, rel=0.05)
    assert std(mha.out_proj.weight) == pytest.approx(3.0 * xavier, rel=0.05)
    assert float(mha.q_proj.bias.detach().abs().max()) == 0.0


def test_factories():
    a = compat.create_dilated_attention("auto", [8, 16], [1, 2], backend="torch", use_tf32=True)
    assert type(a) is compat.DilatedAttention
    b = compat.create_dilated_attention("improved", [8, 16], [1, 2], dropout=0.0, backend="torch")
    assert type(b) is compat.ImprovedDilatedAttention
    c = compat.create_dilated_attention(attention_type="standard", backend="torch")
    assert c.segment_lengths == [2048, 4096, 8192] and c.dilation_rates == [1, 2, 4]
    q, k, v = make_qkv(1, 16, 4, 8, dtype=torch.float64)
    torch.testing.assert_close(a(q, k, v), b(q, k, v))
    # the "improved" kind keeps dropout and softmax_scale (the old config names)
    d = compat.create_dilated_attention("improved", [8, 16], [1, 2], dropout=0.1, softmax_scale=0.3, backend="torch")
    assert type(d) is compat.ImprovedDilatedAttention and d.dropout == 0.1
    d.eval()
    torch.testing.assert_close(d(q, k, v), compat.DilatedAttention([8, 16], [1, 2], softmax_scale=0.3,
                                                                   backend="torch")(q, k, v))
    assert not torch.allclose(d(q, k, v), a(q, k, v))
    with pytest.raises(RuntimeError, match=r"attention_dropout \(0.1\) in training"):
        d.train()(q, k, v)

    m = compat.create_multihead_dilated_attention("standard", embed_dim=32, num_heads=4, segment_lengths=[8, 16],
                                                  dilation_rates=[1, 2], layer_norm=False, backend="torch")
    assert type(m) is compat.MultiheadDilatedAttention and m.sub_ln is None
    assert m.spec.branches == (Branch(8, 1), Branch(16, 2))
    m2 = compat.create_multihead_dilated_attention("auto", backend="torch")
    assert m2.embed_dim == 768 and m2.num_heads == 12 and type(m2) is compat.MultiheadDilatedAttention
    assert type(compat.create_multihead_dilated_attention("improved", 32, 4, [8], [1], backend="torch")) \
        is compat.ImprovedMultiheadDilatedAttention


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match=r"unknown kind 'ring'; known kinds: \['auto', 'standard', 'improved'\]"):
        compat.create_dilated_attention("ring")
    with pytest.raises(ValueError, match=r"unknown kind 'fast'; known kinds"):
        compat.create_multihead_dilated_attention("fast")
    with pytest.raises(ValueError, match=r"must be non-empty and of equal length"):
        compat.DilatedAttention([8, 16], [1])
    with pytest.raises(ValueError, match=r"dilation_rates\[1\]: got 32; allowed: an integer with 1 <= "
                                         r"dilation_rates\[1\] <= segment_lengths\[1\]"):
        compat.DilatedAttention([8, 16], [1, 32])
    with pytest.raises(ValueError, match=r"segment_lengths\[0\]: got 0"):
        compat.MultiheadDilatedAttention(32, 4, [1], [0])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['use_flash'\]"):
        compat.create_dilated_attention("standard", [8], [1], use_flash=True)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['segment_length'\]"):
        compat.create_multihead_dilated_attention("standard", segment_length=[8])

    attn = compat.DilatedAttention([8], [1], attention_dropout=0.1, backend="torch")
    q, k, v = make_qkv(1, 8, 2, 4)
    with pytest.raises(RuntimeError, match=r"attention_dropout \(0.1\) in training mode is not supported"):
        attn(q, k, v)
    attn.eval()
    # eval: dropout is a no-op, the output that of the same attention without dropout
    torch.testing.assert_close(attn(q, k, v), compat.DilatedAttention([8], [1], backend="torch")(q, k, v), rtol=0,
                               atol=0)

    mha = compat.MultiheadDilatedAttention(16, 2, [1], [8], backend="torch")
    x = torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match=r"need_weights=True is not supported.*call with need_weights=False$"):
        mha(x, need_weights=True)
    with pytest.raises(ValueError, match=r"DilatedAttention: softmax_scale: got inf; allowed: a finite number > 0"):
        compat.DilatedAttention([8], [1], softmax_scale=float("inf"))
    with pytest.raises(ValueError, match=r"cannot honour this attn_mask.*supports attn_mask=None or the standard"):
        mha(x, attn_mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cannot honour this attention mask"):
        compat.DilatedAttention([8], [1], backend="torch")(q, k, v, attention_mask=torch.zeros(8, 8))


def test_compat_multihead_is_the_nn_layer_with_an_old_scale():
    # MultiheadDilatedAttention without sub-LN = DilatedMultiheadAttention with out_proj weight / num_groups
    torch.manual_seed(1)
    old = compat.MultiheadDilatedAttention(32, 4, [1, 2], [8, 16], layer_norm=False, dtype=torch.float64,
                                           backend="torch")
    new = DilatedMultiheadAttention(32, 4, old.spec, sub_layernorm=False, dtype=torch.float64, backend="torch")
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        new.out_proj.weight /= 2
    torch.testing.assert_close(old(x), new(x, x, x)[0])
