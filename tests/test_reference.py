"""The float64 reference against a per-query loop written from the definition, and known special cases."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from dilated_compiler import AttentionSpec, Branch, reference
from conftest import make_qkv


def _loop_reference(q, k, v, spec, key_padding_mask=None):
    """Per (batch, head, query) loops, straight from the README's wording; tiny sizes only."""
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    scale = spec.scale if spec.scale is not None else 1 / math.sqrt(D)
    G = len(spec.branches)
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    lse = torch.full((B, H, N), -math.inf, dtype=torch.float64)

    def selected(p, w, r, off):
        s = p // w
        local = p - s * w
        return local >= off and (local - off) % r == 0

    def head_branches(h):
        if spec.head_assignment == "all":
            return [(b.segment_length, b.dilation, h % b.dilation) for b in spec.branches]
        sizes = [H // G + (1 if i < H % G else 0) for i in range(G)]
        i = next(i for i in range(G) if h < sum(sizes[: i + 1]))
        b = spec.branches[i]
        return [(b.segment_length, b.dilation, b.offset if b.offset is not None else i % b.dilation)]

    for b in range(B):
        for h in range(H):
            kvh = h // (H // Hkv)
            for i in range(N):
                parts = []  # (lse_i, out_i) per branch that selects i
                for (w, r, off) in head_branches(h):
                    if not selected(i, w, r, off):
                        continue
                    keys = [j for j in range(N) if j // w == i // w and selected(j, w, r, off)
                            and (not spec.causal or j <= i)
                            and (key_padding_mask is None or not key_padding_mask[b, j])]
                    if not keys:
                        continue
                    s = torch.stack([q[b, i, h].double() @ k[b, j, kvh].double() * scale for j in keys])
                    p = torch.softmax(s, 0)
                    parts.append((torch.logsumexp(s, 0), sum(p[t] * v[b, j, kvh].double() for t, j in enumerate(keys))))
                if parts:
                    total = torch.logsumexp(torch.stack([l for l, _ in parts]), 0)
                    lse[b, h, i] = total
                    out[b, i, h] = sum(torch.exp(l - total) * o for l, o in parts)
    return out, lse


@st.composite
def small_cases(draw):
    mode = draw(st.sampled_from(["grouped", "all"]))
    n_branches = draw(st.integers(1, 3))
    branches = []
    for _ in range(n_branches):
        w = draw(st.integers(1, 9))
        r = draw(st.integers(1, w))
        off = draw(st.one_of(st.none(), st.integers(0, r - 1))) if mode == "grouped" else None
        branches.append(Branch(w, r, off))
    spec = AttentionSpec(tuple(branches), head_assignment=mode, causal=draw(st.booleans()),
                         scale=draw(st.one_of(st.none(), st.floats(0.1, 2))))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(max(1, -(-n_branches // kv_heads)), 3))
    n = draw(st.integers(1, 13))
    return spec, n, heads, kv_heads, draw(st.booleans()), draw(st.integers(0, 10**6))


@given(small_cases())
@settings(max_examples=40, deadline=None)
def test_reference_matches_definition_loops(case):
    spec, n, heads, kv_heads, use_mask, seed = case
    q, k, v = make_qkv(2, n, heads, 3, dtype=torch.float64, kv_heads=kv_heads, seed=seed)
    mask = (torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) < 0.3) if use_mask else None
    out, lse = reference.attention(q, k, v, spec, key_padding_mask=mask, return_lse=True)
    want_out, want_lse = _loop_reference(q, k, v, spec, key_padding_mask=mask)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    torch.testing.assert_close(torch.where(torch.isinf(lse), 0, lse), torch.where(torch.isinf(lse), 0, want_lse))
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("causal", [False, True])
def test_single_dense_segment_is_sdpa(causal):
    q, k, v = make_qkv(2, 20, 3, 8, dtype=torch.float64)
    spec = AttentionSpec((Branch(32, 1),), causal=causal)
    out, lse = reference.attention(q, k, v, spec, return_lse=True)
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)
    torch.testing.assert_close(out, want)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8)
    if causal:
        scores = scores.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_grouped_unselected_rows_are_zero_with_lse_minus_inf():
    q, k, v = make_qkv(1, 16, 2, 4, dtype=torch.float64)
    spec = AttentionSpec((Branch(8, 1), Branch(8, 4)))  # head 1: offset 1 % 4 = 1
    out, lse = reference.attention(q, k, v, spec, return_lse=True)
    picked = torch.tensor([p % 8 in (1, 5) for p in range(16)])
    assert (out[0, ~picked, 1] == 0).all() and torch.isinf(lse[0, 1, ~picked]).all()
    assert torch.isfinite(lse[0, 1, picked]).all() and torch.isfinite(lse[0, 0]).all()


def test_all_mode_equals_attention_over_union_of_keys_with_multiplicity():
    # head 0 with r=1 and r=2 (offset 0): even keys of the segment count twice.
    q, k, v = make_qkv(1, 8, 1, 4, dtype=torch.float64, seed=3)
    spec = AttentionSpec((Branch(8, 1), Branch(8, 2)), head_assignment="all")
    out = reference.attention(q, k, v, spec)
    s = (q[0, :, 0] @ k[0, :, 0].T) / 2
    weights = torch.exp(s) * torch.tensor([2.0 if j % 2 == 0 else 1.0 for j in range(8)])
    weights_odd_rows = torch.exp(s)  # odd queries are selected by r=1 only
    for i in range(8):
        w = weights[i] if i % 2 == 0 else weights_odd_rows[i]
        torch.testing.assert_close(out[0, i, 0], (w / w.sum()) @ v[0, :, 0])


def test_fully_padded_rows_are_zero_not_nan_and_gradients_finite():
    q, k, v = make_qkv(1, 8, 2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 8, dtype=torch.bool)
    out, lse = reference.attention(q, k, v, AttentionSpec((Branch(4, 1), Branch(8, 2)), head_assignment="all"),
                                   key_padding_mask=mask, return_lse=True)
    assert (out == 0).all() and torch.isinf(lse).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_head_masks_map_heads_to_kv_heads_and_drop_padded_keys():
    spec = AttentionSpec((Branch(4, 1), Branch(8, 2)), head_assignment="all")
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 3] = True
    rows = list(reference.head_masks(spec, 2, 8, 4, 2, key_padding_mask=mask))
    assert [(h, kv) for h, kv, _ in rows] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    for h, _, masks in rows:
        assert len(masks) == 2
        for allowed, (w, r, off) in zip(masks, reference.head_branches(spec, 4)[h]):
            want = reference.allowed_pairs(8, w, r, off, spec.causal)
            assert allowed.shape == (2, 8, 8)
            assert torch.equal(allowed[0], want)
            want[:, 3] = False
            assert torch.equal(allowed[1], want)


def test_grouped_requires_enough_heads():
    q, k, v = make_qkv(1, 8, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="heads >= number of branches"):
        reference.attention(q, k, v, AttentionSpec((Branch(4), Branch(8))))


def test_reference_checks_its_inputs_as_the_module_does():
    spec = AttentionSpec((Branch(4), Branch(8, 2)), head_assignment="all")
    q, k, v = make_qkv(1, 16, 2, 4, dtype=torch.float64)
    bad = [
        (dict(key_padding_mask=torch.ones(1, 16)), ValueError, "bool tensor of shape"),  # float: 1 = keep?
        (dict(key_padding_mask=torch.zeros(16, dtype=torch.bool)), ValueError, r"\(batch, seq\) = \(1, 16\)"),
        (dict(key_padding_mask=torch.zeros(1, 17, dtype=torch.bool)), ValueError, r"got torch.bool \(1, 17\)"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            reference.attention(q, k, v, spec, **kwargs)
    with pytest.raises(ValueError, match="every dimension must be >= 1"):
        reference.attention(q, k[:, :, :0], v[:, :, :0], spec)
    with pytest.raises(TypeError, match="q must be a torch.Tensor; got list"):
        reference.attention(q.tolist(), k, v, spec)


def test_head_branches_refuses_fewer_heads_than_branches_in_grouped_mode():
    # head_branches is public (the tests' rounding terms reach it through head_masks, without check_inputs): with
    # fewer heads than branches it would drop branches without a word
    spec = AttentionSpec((Branch(4), Branch(8, 2), Branch(8, 4)))
    with pytest.raises(ValueError, match=r"grouped mode needs heads >= branches; got heads=2, branches=3"):
        reference.head_branches(spec, 2)
    # 4 heads in 3 groups of 2, 1, 1; offsets i % r_i
    assert reference.head_branches(spec, 4) == [[(4, 1, 0)], [(4, 1, 0)], [(8, 2, 1)], [(8, 4, 2)]]
    every = dataclasses.replace(spec, head_assignment="all")  # any number of heads; offsets h % r_i
    assert reference.head_branches(every, 2) == [[(4, 1, 0), (8, 2, 0), (8, 4, 0)], [(4, 1, 0), (8, 2, 1), (8, 4, 1)]]


@pytest.mark.parametrize("causal", [False, True])
def test_all_mode_merge_at_logits_beyond_exp_range(causal):
    # logits of ~1e4, where exp() overflows float64: the merge must subtract the largest branch lse before exp.
    # Expected: the union-of-keys form (keys of both branches, even keys of even queries counted twice) as a
    # softmax of the logits plus log(multiplicity), which torch computes stably.
    q, k, v = make_qkv(1, 8, 1, 4, dtype=torch.float64, seed=3)
    q, k = q * 100, k * 100
    spec = AttentionSpec((Branch(8, 1), Branch(8, 2)), head_assignment="all", causal=causal)
    out, lse = reference.attention(q, k, v, spec, return_lse=True)
    s = (q[0, :, 0] @ k[0, :, 0].T) / 2
    assert s.abs().max() > 1000
    multiplicity = torch.tensor([[2.0 if i % 2 == 0 and j % 2 == 0 else 1.0 for j in range(8)] for i in range(8)])
    logits = s + multiplicity.log()
    if causal:
        logits = logits.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(out[0, :, 0], torch.softmax(logits, -1) @ v[0, :, 0])
    torch.testing.assert_close(lse[0, 0], torch.logsumexp(logits, -1))


def test_reference_refuses_kv_heads_that_do_not_divide_heads():
    spec = AttentionSpec((Branch(4), Branch(8, 2)), head_assignment="all")
    for heads, kv_heads in ((3, 2), (4, 3)):
        q, k, v = make_qkv(1, 8, heads, 4, dtype=torch.float64, kv_heads=kv_heads)
        with pytest.raises(ValueError, match=rf"kv heads \({kv_heads}\) must divide heads \({heads}\)"):
            reference.attention(q, k, v, spec)
