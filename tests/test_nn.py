"""dilated_compiler.nn layers against references built from the reference semantics: the module's own
projection weights + dilated_compiler.reference.attention (float64) + sub-LN + output projection."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dilated_compiler import reference
from dilated_compiler.nn import (DilatedMultiheadAttention, DilatedTransformerDecoderLayer,
                                 DilatedTransformerEncoderLayer, FeedForward, MultiheadCrossAttention, RotaryEmbedding)
from dilated_compiler.spec import AttentionSpec, Branch, load_spec

from conftest import TOLERANCES, assert_close, cuda

GROUPED = AttentionSpec((Branch(4, 1), Branch(8, 2), Branch(16, 4)), head_assignment="grouped")
ALL = AttentionSpec((Branch(4, 1), Branch(16, 4)), head_assignment="all")
F64 = torch.float64


def _linear(x, lin):
    return F.linear(x, lin.weight, lin.bias)


def _project(m, query, key, value):
    B, Nq, _ = query.shape
    Nk = key.shape[1]
    q = _linear(query, m.q_proj).view(B, Nq, m.num_heads, m.head_dim)
    k = _linear(key, m.k_proj).view(B, Nk, m.num_kv_heads, m.head_dim)
    v = _linear(value, m.v_proj).view(B, Nk, m.num_kv_heads, m.head_dim)
    return q, k, v


def _finish(m, o):
    o = o.reshape(o.shape[0], o.shape[1], m.embed_dim)
    if m.sub_ln is not None:
        o = F.layer_norm(o, (m.embed_dim,), m.sub_ln.weight, m.sub_ln.bias, m.sub_ln.eps)
    return _linear(o, m.out_proj)


def ref_dilated_mha(m, query, key, value, spec, key_padding_mask=None, rotary=None):
    q, k, v = _project(m, query, key, value)
    if rotary is not None:
        q, k = rotary(q, k)
    return _finish(m, reference.attention(q, k, v, spec, key_padding_mask=key_padding_mask))


def ref_dense_mha(m, query, key, value, allowed=None):
    """allowed: (B or 1, H or 1, Nq, Nk) bool or None. Rows with no allowed key give 0."""
    q, k, v = _project(m, query, key, value)
    g = m.num_heads // m.num_kv_heads
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(m.head_dim)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    return _finish(m, torch.einsum("bhij,bjhd->bihd", p, v))


def _params_and_input_grads(loss, module, inputs):
    tensors = list(inputs) + [p for p in module.parameters()]
    return torch.autograd.grad(loss, tensors)


def _padding(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(B, N, generator=g) < 0.3
    kpm[0, :] = False
    kpm[-1, 4:8] = True  # a whole w=4 segment padded: its rows in the w=4 branch have no key
    return kpm


@pytest.mark.parametrize("spec", [GROUPED, ALL], ids=["grouped", "all"])
@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_dilated_mha_matches_reference_with_padding_and_gqa(spec, num_kv_heads):
    torch.manual_seed(0)
    m = DilatedMultiheadAttention(32, 4, spec, num_kv_heads=num_kv_heads, dtype=F64, backend="torch")
    B, N = 2, 21  # 21: ragged last segments in every branch
    x = torch.randn(B, N, 32, dtype=F64, requires_grad=True)
    kv = torch.randn(B, N, 32, dtype=F64, requires_grad=True)
    kpm = _padding(B, N)
    out, weights = m(x, kv, kv, key_padding_mask=kpm)
    assert weights is None and out.shape == (B, N, 32)
    ref = ref_dilated_mha(m, x, kv, kv, spec, key_padding_mask=kpm)
    assert_close(out, ref, F64)
    dout = torch.randn_like(out)
    grads = _params_and_input_grads((out * dout).sum(), m, (x, kv))
    ref_grads = _params_and_input_grads((ref * dout).sum(), m, (x, kv))
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a, e, F64, f"grad {i}", grad=True)


def test_padding_changes_nothing_but_padded_keys_and_rows_without_keys_are_zero():
    torch.manual_seed(0)
    spec = AttentionSpec((Branch(4, 1),))
    m = DilatedMultiheadAttention(16, 2, spec, sub_layernorm=False, bias=False, dtype=F64, backend="torch")
    x = torch.randn(1, 8, 16, dtype=F64)
    kpm = torch.zeros(1, 8, dtype=torch.bool)
    kpm[0, 1:3] = True  # the first segment keeps keys 0 and 3
    kpm[0, 4:] = True  # the second segment has no key left
    out, _ = m(x, x, x, key_padding_mask=kpm)
    assert not out.isnan().any()
    assert torch.equal(out[0, 4:], torch.zeros(4, 16, dtype=F64))
    kept = [0, 3]  # rows whose query is unchanged below and whose segment has padded keys
    assert not torch.allclose(m(x, x, x)[0][0, kept], out[0, kept])  # the padding reaches these rows
    # the padded keys' values do not matter
    y = x.clone()
    y[0, 1:3] = 100.0
    y[0, 4:] = 100.0
    torch.testing.assert_close(m(y, y, y, key_padding_mask=kpm)[0][0, kept], out[0, kept])


def test_is_causal_attn_mask_batch_first_and_kdim_vdim():
    torch.manual_seed(0)
    m = DilatedMultiheadAttention(32, 4, ALL, kdim=12, vdim=20, batch_first=False, dtype=F64, backend="torch")
    N, B = 19, 2
    q = torch.randn(N, B, 32, dtype=F64)
    k = torch.randn(N, B, 12, dtype=F64)
    v = torch.randn(N, B, 20, dtype=F64)
    kpm = _padding(B, N, seed=2)
    causal_spec = dataclasses.replace(ALL, causal=True)
    expected = ref_dilated_mha(m, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal_spec,
                               key_padding_mask=kpm).transpose(0, 1)
    out, _ = m(q, k, v, key_padding_mask=kpm, is_causal=True)
    assert out.shape == (N, B, 32)
    assert_close(out, expected, F64)
    bool_mask = torch.ones(N, N, dtype=torch.bool).triu(1)
    float_mask = torch.zeros(N, N, dtype=F64).masked_fill(bool_mask, float("-inf"))
    for mask in (bool_mask, float_mask):
        torch.testing.assert_close(m(q, k, v, key_padding_mask=kpm, attn_mask=mask)[0], out)
    # a causal spec stays causal with is_causal=False
    m_causal = DilatedMultiheadAttention(32, 4, causal_spec, kdim=12, vdim=20, batch_first=False, dtype=F64,
                                         backend="torch")
    m_causal.load_state_dict(m.state_dict())
    torch.testing.assert_close(m_causal(q, k, v, key_padding_mask=kpm)[0], out)


def test_spec_forms_and_magneto_init():
    yaml_text = "branches:\n  - {segment_length: 4, dilation: 1}\n  - {segment_length: 8, dilation: 2}\n"
    for s in (yaml_text, load_spec(yaml_text).to_dict(), load_spec(yaml_text)):
        assert DilatedMultiheadAttention(16, 2, s, backend="torch").spec.branches == (Branch(4, 1), Branch(8, 2))
    torch.manual_seed(0)
    m = DilatedMultiheadAttention(512, 8, ALL, gamma_init=2.0, num_kv_heads=4)
    xavier = math.sqrt(2.0 / (512 + 512))
    xavier_kv = math.sqrt(2.0 / (512 + 256))
    assert m.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.03)
    assert m.k_proj.weight.std().item() == pytest.approx(xavier_kv, rel=0.03)
    assert m.v_proj.weight.std().item() == pytest.approx(2.0 * xavier_kv, rel=0.03)
    assert m.out_proj.weight.std().item() == pytest.approx(2.0 * xavier, rel=0.03)
    assert m.k_proj.weight.shape == (256, 512) and isinstance(m.sub_ln, torch.nn.LayerNorm)


def test_attention_dropout_raises_in_training_and_is_a_no_op_in_eval():
    m = DilatedMultiheadAttention(16, 2, ALL, dropout=0.1, backend="torch")
    x = torch.randn(1, 8, 16)
    with pytest.raises(RuntimeError, match=r"attention dropout \(0.1\) in training mode is not supported: no "
                                           r"backend \(torch, triton\) fuses dropout"):
        m(x, x, x)
    m.eval()
    ref = DilatedMultiheadAttention(16, 2, ALL, backend="torch").eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, x, x)[0], ref(x, x, x)[0])


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match=r"num_heads \(3\) must divide embed_dim \(16\)"):
        DilatedMultiheadAttention(16, 3, ALL)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        DilatedMultiheadAttention(16, 4, ALL, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"3 branches in grouped mode, which needs num_heads >= 3; got num_heads=2"):
        DilatedMultiheadAttention(16, 2, GROUPED)
    with pytest.raises(ValueError, match=r"dropout: got 1.5; allowed: a number with 0 <= dropout < 1"):
        DilatedMultiheadAttention(16, 2, ALL, dropout=1.5)
    with pytest.raises(ValueError, match=r"gamma_init: got -1"):
        DilatedMultiheadAttention(16, 2, ALL, gamma_init=-1)
    with pytest.raises(ValueError, match=r"gamma_init: got nan; allowed: a finite number > 0"):
        FeedForward(8, 16, gamma_init=float("nan"))
    with pytest.raises(ValueError, match=r"d_model: got 0; allowed: an integer >= 1"):
        FeedForward(0, 16)
    with pytest.raises(ValueError, match=r"invalid attention spec.*branches"):
        DilatedMultiheadAttention(16, 2, {"branches": []})
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'"):
        DilatedMultiheadAttention(16, 2, ALL, backend="cuda")
    m = DilatedMultiheadAttention(16, 2, ALL, backend="torch")
    x = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match=r"need_weights=True is not supported"):
        m(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match=r"cannot honour this attn_mask \(torch.bool \(8, 8\)\); a dilated pattern "
                                         r"supports attn_mask=None or the standard \(8, 8\) causal mask"):
        m(x, x, x, attn_mask=torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key/value length \(6\) must equal the query length \(8\).*"
                                         r"MultiheadCrossAttention"):
        m(x, x[:, :6], x[:, :6])
    with pytest.raises(ValueError, match=r"key_padding_mask must be a bool tensor of shape \(batch, seq\)"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"query has 12 features; this layer expects 16"):
        m(torch.randn(2, 8, 12), x, x)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, features\)"):
        m(x[0], x, x)


def test_cross_attention_matches_dense_reference():
    torch.manual_seed(0)
    m = MultiheadCrossAttention(32, 4, num_kv_heads=2, kdim=24, vdim=24, dtype=F64)
    B, Nq, Nk = 2, 7, 11
    q = torch.randn(B, Nq, 32, dtype=F64, requires_grad=True)
    mem = torch.randn(B, Nk, 24, dtype=F64, requires_grad=True)
    kpm = torch.zeros(B, Nk, dtype=torch.bool)
    kpm[0, 5:] = True
    amask = torch.rand(Nq, Nk, generator=torch.Generator().manual_seed(1)) < 0.3
    amask[2, :5] = True  # query 2 of batch 0 is left with no key: its output is 0 before sub-LN / out_proj
    out, w = m(q, mem, mem, key_padding_mask=kpm, attn_mask=amask)
    assert w is None
    allowed = ~kpm[:, None, None, :] & ~amask[None, None]
    ref = ref_dense_mha(m, q, mem, mem, allowed)
    assert_close(out, ref, F64)
    dout = torch.randn_like(out)
    for a, e in zip(_params_and_input_grads((out * dout).sum(), m, (q, mem)),
                    _params_and_input_grads((ref * dout).sum(), m, (q, mem))):
        assert not a.isnan().any()
        assert_close(a, e, F64, grad=True)
    causal, _ = m(q, mem, mem, is_causal=True)
    assert_close(causal, ref_dense_mha(m, q, mem, mem, ~torch.ones(Nq, Nk, dtype=torch.bool).triu(1)), F64)


def _ref_ffn(ffn, x):
    h = ffn.activation(_linear(x, ffn.fc1))
    h = F.layer_norm(h, h.shape[-1:], ffn.ffn_ln.weight, ffn.ffn_ln.bias, ffn.ffn_ln.eps)
    return _linear(h, ffn.fc2)


def _ln(norm, x):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def test_encoder_layer_matches_reference_composition():
    torch.manual_seed(0)
    layer = DilatedTransformerEncoderLayer(32, 4, GROUPED, dim_feedforward=48, dropout=0.0, gamma_init=1.7,
                                           num_kv_heads=2, dtype=F64, backend="torch")
    x = torch.randn(2, 20, 32, dtype=F64)
    kpm = _padding(2, 20, seed=3)
    h = _ln(layer.norm1, x)
    x1 = x + ref_dilated_mha(layer.self_attn, h, h, h, GROUPED, key_padding_mask=kpm)
    expected = x1 + _ref_ffn(layer.ffn, _ln(layer.norm2, x1))
    assert_close(layer(x, src_key_padding_mask=kpm), expected, F64)
    # MAGNETO gains: fc1/fc2 get gamma_init (in the weights' spread, on a layer wide enough to measure it)
    assert layer.ffn.gamma_init == 1.7 and layer.self_attn.gamma_init == 1.7
    wide = DilatedTransformerEncoderLayer(512, 8, GROUPED, dim_feedforward=1024, gamma_init=1.7, backend="torch")
    xavier = math.sqrt(2.0 / (512 + 1024))
    for fc in (wide.ffn.fc1, wide.ffn.fc2):
        assert fc.weight.std().item() == pytest.approx(1.7 * xavier, rel=0.03)


def test_decoder_layer_matches_reference_composition():
    torch.manual_seed(0)
    layer = DilatedTransformerDecoderLayer(32, 4, ALL, dim_feedforward=48, dropout=0.0, dtype=F64, backend="torch")
    assert layer.spec.causal and layer.cross_attn.gamma_init == 1.0
    tgt = torch.randn(2, 13, 32, dtype=F64)
    mem = torch.randn(2, 9, 32, dtype=F64)
    tkpm = _padding(2, 13, seed=4)
    mkpm = torch.zeros(2, 9, dtype=torch.bool)
    mkpm[1, 3:] = True
    h = _ln(layer.norm1, tgt)
    x1 = tgt + ref_dilated_mha(layer.self_attn, h, h, h, dataclasses.replace(ALL, causal=True),
                               key_padding_mask=tkpm)
    h = _ln(layer.norm2, x1)
    x2 = x1 + ref_dense_mha(layer.cross_attn, h, mem, mem, ~mkpm[:, None, None, :])
    expected = x2 + _ref_ffn(layer.ffn, _ln(layer.norm3, x2))
    out = layer(tgt, mem, tgt_key_padding_mask=tkpm, memory_key_padding_mask=mkpm)
    assert_close(out, expected, F64)
    # seq-first layout gives the same numbers
    layer_sf = DilatedTransformerDecoderLayer(32, 4, ALL, dim_feedforward=48, dropout=0.0, batch_first=False,
                                              dtype=F64, backend="torch")
    layer_sf.load_state_dict(layer.state_dict())
    out_sf = layer_sf(tgt.transpose(0, 1), mem.transpose(0, 1), tgt_key_padding_mask=tkpm,
                      memory_key_padding_mask=mkpm)
    torch.testing.assert_close(out_sf.transpose(0, 1), out)


def test_layer_errors():
    with pytest.raises(ValueError, match=r"activation: got 'tanhh'; allowed: \['gelu', 'relu', 'silu'\]"):
        DilatedTransformerEncoderLayer(16, 2, ALL, activation="tanhh")
    with pytest.raises(ValueError, match=r"dim_feedforward: got 0"):
        DilatedTransformerDecoderLayer(16, 2, ALL, dim_feedforward=0)
    for scale in (-1.0, 0.0, float("inf"), "a", True):
        with pytest.raises(ValueError, match="scale: got"):
            MultiheadCrossAttention(16, 2, scale=scale)


def test_decoder_layer_dropout_reaches_the_cross_attention():
    layer = DilatedTransformerDecoderLayer(16, 2, ALL, dim_feedforward=8, dropout=0.25, backend="torch")
    assert layer.cross_attn.dropout == 0.25 and layer.self_attn.dropout == 0.0
    # and it acts: in training two calls of the cross attention differ (random weights dropped), in eval they agree
    x, mem = torch.randn(2, 12, 16), torch.randn(2, 9, 16)
    cross = layer.cross_attn.train()
    torch.manual_seed(1)
    a = cross(x, mem, mem)[0]
    torch.manual_seed(2)
    assert not torch.allclose(a, cross(x, mem, mem)[0])
    cross.eval()
    torch.testing.assert_close(cross(x, mem, mem)[0], cross(x, mem, mem)[0], rtol=0, atol=0)


def test_forward_takes_multihead_attentions_positional_order():
    # nn.MultiheadAttention: (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
    # is_causal): a 7th positional True is average_attn_weights, which changes nothing here
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16, dtype=F64)
    for m in (DilatedMultiheadAttention(16, 2, ALL, dtype=F64, backend="torch"),
              MultiheadCrossAttention(16, 2, dtype=F64)):
        torch.testing.assert_close(m(x, x, x, None, False, None, True)[0], m(x, x, x)[0])
        torch.testing.assert_close(m(x, x, x, None, False, None, True, True)[0], m(x, x, x, is_causal=True)[0])
        assert not torch.allclose(m(x, x, x, is_causal=True)[0], m(x, x, x)[0])


def _complex_pairs(x):
    """RotaryEmbedding rotates pairs (x_f, x_{f + D/2}): those pairs as complex numbers, (..., D/2)."""
    return torch.complex(*x.double().chunk(2, dim=-1))


def test_rotary_is_relative_and_xpos_decays():
    D, N, base = 8, 6, 10000.0
    theta = base ** (-torch.arange(0, D, 2, dtype=F64) / D)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, N, 1, D, generator=g, dtype=F64)
    k = torch.randn(1, N, 1, D, generator=g, dtype=F64)
    i = torch.arange(N, dtype=F64)
    dist = i[:, None] - i[None, :]  # i - j
    # closed form: score(i, j) = Re sum_f zq_i conj(zk_j) exp(1j (i - j) theta_f)
    pair = torch.einsum("if,jf->ijf", _complex_pairs(q[0, :, 0]), _complex_pairs(k[0, :, 0]).conj())
    expected = (pair * torch.exp(1j * dist[..., None] * theta)).real.sum(-1)
    rot = RotaryEmbedding(D, base=base)
    for offset in (0, 7):
        rq, rk = rot(q, k, offset=offset)
        torch.testing.assert_close(torch.einsum("bihd,bjhd->ij", rq, rk), expected, atol=1e-5, rtol=1e-5)
    # the offset places the rows at positions offset.. (a cache's continuation): the same rotation as the last N
    # rows of a sequence with 7 rows before them (the scores above cannot tell, they depend on i - j alone)
    pad = torch.randn(1, 7, 1, D, generator=g, dtype=F64)
    lq, lk = rot(torch.cat([pad, q], 1), torch.cat([pad, k], 1))
    rq, rk = rot(q, k, offset=7)
    torch.testing.assert_close(rq, lq[:, 7:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rk, lk[:, 7:], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(rq, rot(q, k)[0])
    # same content at every position: the score depends on i - j only, and does change with it
    rq, rk = rot(q[:, :1].expand(1, N, 1, D), k[:, :1].expand(1, N, 1, D))
    scores = torch.einsum("bihd,bjhd->ij", rq, rk)
    diag = torch.stack([torch.diagonal(scores, offset=-d)[0] for d in range(N)])
    assert (diag.max() - diag.min()).item() > 0.1
    # XPOS: each pair's product also scales by zeta_f ** ((i - j) / scale_base), zeta_f < 1: it decays with i - j
    xpos = RotaryEmbedding(D, base=base, xpos_scale_base=4.0)
    zeta = (torch.arange(0, D, 2, dtype=F64) + 0.4 * D) / (1.4 * D)
    assert bool((zeta < 1).all())
    xq, xk = xpos(q, k)
    got = torch.einsum("if,jf->ijf", _complex_pairs(xq[0, :, 0]), _complex_pairs(xk[0, :, 0]).conj())
    want = pair * torch.exp(1j * dist[..., None] * theta) * zeta ** (dist[..., None] / 4.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    size = got[:, 0].abs() / pair[:, 0].abs()  # key 0, queries 0..N-1: strictly decaying
    assert bool((size[1:] < size[:-1]).all())
    with pytest.raises(ValueError, match=r"head_dim: got 7; rotary embedding needs an even integer"):
        RotaryEmbedding(7)


def test_rotary_positions_stay_float32_when_the_module_is_cast():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4096, 1, 64, generator=g) for _ in range(2))
    rot = RotaryEmbedding(64)
    want = rot(q, k)
    rot.to(torch.bfloat16)  # a model cast for inference: the frequencies are not rounded with it
    for a, b in zip(rot(q, k), want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not list(rot.buffers())


def test_xpos_in_float16_refuses_lengths_past_its_range():
    xpos = RotaryEmbedding(8, xpos_scale_base=512.0)
    q = torch.randn(1, 4096, 1, 8, dtype=torch.float16)
    xq, xk = xpos(q, q)  # scales up to 3.5 ** 4 = 150: within range
    assert torch.isfinite(xq).all() and torch.isfinite(xk).all()
    q = torch.randn(1, 8192, 1, 8)
    with pytest.raises(ValueError, match=r"XPOS in float16: at N=8192 .* Use bfloat16 or float32"):
        xpos(q.half(), q.half())
    for dtype in (torch.bfloat16, torch.float32):  # same length, wider range: runs
        xq, xk = xpos(q.to(dtype), q.to(dtype))
        assert torch.isfinite(xq).all() and torch.isfinite(xk).all()


def test_encoder_layer_inside_nn_transformer_encoder_with_float_padding_mask():
    # nn.TransformerEncoder deep-copies the layer and hands it the padding mask as float 0 / -inf
    torch.manual_seed(0)
    layer = DilatedTransformerEncoderLayer(16, 2, ALL, 32, dropout=0.0, backend="torch")
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 12, 16)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, 6:] = True
    expected = x
    for copy_ in enc.layers:
        expected = copy_(expected, src_key_padding_mask=kpm)
    torch.testing.assert_close(enc(x, src_key_padding_mask=kpm), expected)
    with pytest.raises(ValueError, match=r"a float key_padding_mask may hold only 0 \(keep\) and -inf \(ignore\)"):
        layer.self_attn(x, x, x, key_padding_mask=torch.full((2, 12), 0.5))


def test_masks_under_fullgraph_compile_in_nn_transformer_encoder():
    """torch.compile(fullgraph=True) of nn.TransformerEncoder over the layer: the padding mask the encoder turns into
    float 0 / -inf and the standard causal mask are checked in the graph (no data-dependent graph break), give the
    eager results, and a mask that is not the causal one still raises, with the eager error's message."""
    torch.manual_seed(0)
    layer = DilatedTransformerEncoderLayer(16, 2, ALL, 32, dropout=0.0, backend="torch")
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 12, 16)
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, 6:] = True
    causal = torch.ones(12, 12, dtype=torch.bool).triu(1)
    compiled = torch.compile(enc, fullgraph=True)
    for mask, is_causal in ((None, False), (causal, True)):
        torch.testing.assert_close(compiled(x, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal),
                                   enc(x, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal))
    bad = causal.clone()
    bad[3, 1] = True
    message = r"cannot honour this attn_mask \(torch.float32 \(12, 12\)\); a dilated pattern supports"
    with pytest.raises(ValueError, match=message):
        enc(x, mask=bad, src_key_padding_mask=kpm)
    with pytest.raises(RuntimeError, match=message):
        compiled(x, mask=bad, src_key_padding_mask=kpm)
    # a float padding mask other than 0 / -inf, given to the attention directly
    attend = torch.compile(lambda x, m: layer.self_attn(x, x, x, key_padding_mask=m)[0], fullgraph=True)
    ninf = torch.zeros(2, 12).masked_fill(kpm, float("-inf"))
    torch.testing.assert_close(attend(x, ninf), layer.self_attn(x, x, x, key_padding_mask=kpm)[0])
    with pytest.raises(RuntimeError, match=r"a float key_padding_mask may hold only 0 \(keep\) and -inf"):
        attend(x, torch.zeros(2, 12).masked_fill(kpm, -1e9))


@pytest.mark.gpu
@cuda
def test_gpu_masks_under_fullgraph_compile():
    """As the CPU test above, on CUDA with backend "auto" (the Triton kernels): under torch.compile(fullgraph=True)
    the encoder's float padding mask and the causal mask are checked in the graph and give the eager results.
    float32, so that the compiled and eager runs (the same attention kernels; the layer norms and residuals fused
    by Inductor or not) differ by float32 rounding only; in bf16 the two read 2 ULPs apart at a few entries.
    (A failing mask here is a device-side assertion, which would end the process's CUDA context: not run.)"""
    torch.manual_seed(0)
    layer = DilatedTransformerEncoderLayer(64, 4, ALL, 128, dropout=0.0, device="cuda")
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 200, 64, device="cuda")
    kpm = torch.zeros(2, 200, dtype=torch.bool, device="cuda")
    kpm[1, 150:] = True
    causal = torch.ones(200, 200, dtype=torch.bool, device="cuda").triu(1)
    compiled = torch.compile(enc, fullgraph=True)
    with torch.no_grad():
        for mask, is_causal in ((None, False), (causal, True)):
            torch.testing.assert_close(compiled(x, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal),
                                       enc(x, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", ["whole tiles", "gqa, padding, ragged"])
def test_gpu_dilated_mha_auto_backend(case):
    """The layer on a GPU with backend "auto" (the Triton kernels), bf16, against the float64 reference on the
    module's own weights: forward and the gradients of input and weights. "whole tiles": segments of whole
    128-row tiles, the Hopper kernels' case; the other: grouped-query heads, key padding and a ragged N."""
    import copy
    from dilated_compiler.runtime import resolve_backend
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    torch.manual_seed(0)
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2), Branch(1024, 4)), causal=True)
    if case == "whole tiles":
        m = DilatedMultiheadAttention(512, 8, spec, device="cuda", dtype=torch.bfloat16)
        B, N, kpm = 2, 2048, None
    else:
        m = DilatedMultiheadAttention(384, 6, spec, num_kv_heads=3, device="cuda", dtype=torch.bfloat16)
        B, N = 2, 1000
        kpm = torch.rand(B, N) < 0.2
    m64 = copy.deepcopy(m).to("cpu", F64)
    x = torch.randn(B, N, m.embed_dim, dtype=F64)
    x_gpu = x.to("cuda", torch.bfloat16).requires_grad_()
    x64 = x_gpu.detach().to("cpu", F64).requires_grad_()
    out, _ = m(x_gpu, x_gpu, x_gpu, key_padding_mask=None if kpm is None else kpm.cuda())
    ref = ref_dilated_mha(m64, x64, x64, x64, spec, key_padding_mask=kpm)
    assert_close(out, ref, torch.bfloat16)
    dout = torch.randn(out.shape, dtype=F64)
    grads = _params_and_input_grads((out * dout.to("cuda", torch.bfloat16)).sum(), m, (x_gpu,))
    ref_grads = _params_and_input_grads((ref * dout).sum(), m64, (x64,))
    # the input's gradient goes through the layer's own bf16 products, for which there is no rounding term:
    # entry by entry at 5x the output tolerance, and as a whole by norm at bf16's relative tolerance, as the weights
    bf16 = TOLERANCES[torch.bfloat16]
    assert_close(grads[0], ref_grads[0], torch.bfloat16, "grad of the input", grad=True,
                 tol=dict(atol=5 * bf16["atol"], rtol=5 * bf16["rtol"]))
    rel = ((grads[0].double().cpu() - ref_grads[0]).norm() / ref_grads[0].norm()).item()
    assert rel <= bf16["rtol"], f"grad of the input: relative error {rel:.3g} (norm)"
    # a weight's gradient sums over the batch's B·N tokens: bf16 rounding in the layer's own products grows with
    # the tensor's scale, not each entry's, so these compare by norm at bf16's relative tolerance
    # (the key bias's gradient is zero in exact arithmetic: it shifts all of a row's scores alike; what is left is
    # rounding, measured against the value bias's gradient, a sum of as many terms of the same shape)
    named = {name: (a.detach().double().cpu(), e.detach().double().cpu())
             for (name, _), a, e in zip(m.named_parameters(), grads[1:], ref_grads[1:], strict=True)}
    for name, (a, e) in named.items():
        scale = named["v_proj.bias"][1].norm() if name == "k_proj.bias" else e.norm()
        rel = ((a - e).norm() / scale).item()
        assert rel <= TOLERANCES[torch.bfloat16]["rtol"], f"grad of {name}: relative error {rel:.3g} (norm)"


def test_float_mask_with_a_bias_below_the_diagonal_is_not_causal():
    """-inf above the diagonal and a bias below it is not the causal mask: the layer refuses it, not drops the bias."""
    from dilated_compiler.nn import is_causal_mask
    mask = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    assert is_causal_mask(mask, 4)
    mask[2, 0] = 0.5
    assert not is_causal_mask(mask, 4)
    mha = DilatedMultiheadAttention(16, 2, {"branches": [{"segment_length": 4}]}, backend="torch")
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="cannot honour this attn_mask"):
        mha(x, x, x, attn_mask=mask)


# MultiheadCrossAttention(scale=...) must reach SDPA
def test_cross_attention_honours_scale():
    torch.manual_seed(0)
    m = MultiheadCrossAttention(16, 2, scale=0.05, dtype=F64)
    q, mem = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 7, 16, dtype=F64)
    B, Nq, Nk, H, D = 2, 5, 7, 2, 8
    qp = F.linear(q, m.q_proj.weight, m.q_proj.bias).view(B, Nq, H, D)
    kp = F.linear(mem, m.k_proj.weight, m.k_proj.bias).view(B, Nk, H, D)
    vp = F.linear(mem, m.v_proj.weight, m.v_proj.bias).view(B, Nk, H, D)
    p = (torch.einsum("bihd,bjhd->bhij", qp, kp) * 0.05).softmax(-1)
    o = torch.einsum("bhij,bjhd->bihd", p, vp).reshape(B, Nq, 16)
    ref = F.linear(m.sub_ln(o), m.out_proj.weight, m.out_proj.bias)
    torch.testing.assert_close(m(q, mem, mem)[0], ref)


# encoder layer's is_causal must reach the attention
def test_encoder_layer_is_causal_runs_the_causal_spec():
    torch.manual_seed(0)
    layer = DilatedTransformerEncoderLayer(16, 2, ALL, 32, dropout=0.0, dtype=F64, backend="torch")
    causal = DilatedTransformerEncoderLayer(16, 2, dataclasses.replace(ALL, causal=True), 32, dropout=0.0,
                                            dtype=F64, backend="torch")
    causal.load_state_dict(layer.state_dict())
    x = torch.randn(2, 20, 16, dtype=F64)
    torch.testing.assert_close(layer(x, is_causal=True), causal(x))
    assert not torch.allclose(layer(x, is_causal=True), layer(x))


# decoder layer's memory_is_causal must reach the cross attention
def test_decoder_layer_memory_is_causal_reaches_cross_attention():
    torch.manual_seed(0)
    layer = DilatedTransformerDecoderLayer(16, 2, ALL, 32, dropout=0.0, dtype=F64, backend="torch").eval()
    tgt, mem = torch.randn(2, 10, 16, dtype=F64), torch.randn(2, 10, 16, dtype=F64)
    mem2 = mem.clone()
    mem2[:, 6:] += 3.0
    a, b = layer(tgt, mem, memory_is_causal=True), layer(tgt, mem2, memory_is_causal=True)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # query i sees memory j <= i only
    assert not torch.allclose(layer(tgt, mem)[:, :6], layer(tgt, mem2)[:, :6])


# FeedForward applies its dropout (between act and the sub-LN) in training
def test_feed_forward_dropout_acts_in_training_only():
    torch.manual_seed(0)
    ffn = FeedForward(16, 32, dropout=0.5)
    x = torch.randn(4, 16)
    ffn.eval()
    ref = ffn(x)
    ffn.train()
    torch.manual_seed(1)
    assert not torch.allclose(ffn(x), ref)
    ffn.eval()
    torch.testing.assert_close(ffn(x), ref, rtol=0, atol=0)


# the decoder applies residual dropout on all three branches (self, cross, ffn)
def test_decoder_layer_residual_dropout_on_every_branch():
    calls = []
    for cls, args in ((DilatedTransformerEncoderLayer, ()), (DilatedTransformerDecoderLayer, (torch.randn(2, 5, 16),))):
        layer = cls(16, 2, ALL, 32, dropout=0.0, backend="torch")
        count = [0]
        layer.dropout.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        layer(torch.randn(2, 8, 16), *args)
        calls.append(count[0])
    assert calls == [2, 3]


# query/key batch mismatch is a clear ValueError (not a view RuntimeError deep inside)
def test_batch_mismatch_is_a_clear_error():
    from dilated_compiler.nn import DilatedMultiheadAttention
    q, kv = torch.randn(2, 5, 16), torch.randn(1, 5, 16)
    for m in (MultiheadCrossAttention(16, 2),
              DilatedMultiheadAttention(16, 2, AttentionSpec((Branch(4, 1),)), backend="torch")):
        with pytest.raises(ValueError, match=r"query, key, value must share the batch size; got \(2, 1, 1\)"):
            m(q, kv, kv)
