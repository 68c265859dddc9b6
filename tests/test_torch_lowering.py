"""The torch lowering against the float64 reference: out, lse and gradients, per dtype."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from dilated_compiler import AttentionSpec, Branch, compile_attention
from conftest import check_against_reference, cuda, make_qkv

DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]

PATTERNS = {
    "three-branch": (Branch(8, 1), Branch(16, 2), Branch(32, 4)),
    "offsets": (Branch(12, 3, offset=2), Branch(10, 5, offset=0), Branch(7, 7, offset=6)),
    "dense-segment": (Branch(64, 1),),
    "odd": (Branch(5, 2), Branch(9, 3), Branch(3, 1)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True])
def test_patterns_all_dtypes(device, dtype, mode, causal):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is not supported by the torch backend on CUDA")
    for name, branches in PATTERNS.items():
        if mode == "all":
            branches = tuple(Branch(b.segment_length, b.dilation) for b in branches)
        spec = AttentionSpec(branches, head_assignment=mode, causal=causal)
        attn = compile_attention(spec, backend="torch")
        q, k, v = make_qkv(2, 45, 4, 16, dtype=dtype, device=device, requires_grad=True)
        check_against_reference(attn, spec, q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_gqa_and_key_padding(device, mode):
    spec = AttentionSpec((Branch(8, 1), Branch(16, 4)), head_assignment=mode, causal=mode == "all")
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(2, 40, 6, 8, kv_heads=2, device=device, requires_grad=True)
    mask = torch.rand(2, 40, generator=torch.Generator().manual_seed(5)) < 0.4
    mask[1] = True  # every key of one batch element padded: all its rows output 0
    check_against_reference(attn, spec, q, k, v, key_padding_mask=mask.to(device))
    out = attn(q, k, v, key_padding_mask=mask.to(device))
    assert (out[1] == 0).all()


@st.composite
def cases(draw):
    mode = draw(st.sampled_from(["grouped", "all"]))
    n_branches = draw(st.integers(1, 3))
    branches = []
    for _ in range(n_branches):
        w = draw(st.integers(1, 40))
        r = draw(st.integers(1, min(w, 6)))
        off = draw(st.one_of(st.none(), st.integers(0, r - 1))) if mode == "grouped" else None
        branches.append(Branch(w, r, off))
    spec = AttentionSpec(tuple(branches), head_assignment=mode, causal=draw(st.booleans()),
                         scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))))
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(max(1, -(-n_branches // kv_heads)), 3))  # odd counts included
    return dict(spec=spec, batch=draw(st.integers(1, 2)), seq=draw(st.integers(1, 70)), heads=heads,
                kv_heads=kv_heads, head_dim=draw(st.sampled_from([1, 3, 8, 16])), mask=draw(st.booleans()),
                lse_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@given(cases())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_specs_and_shapes_fp32(case):
    spec = case["spec"]
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(case["batch"], case["seq"], case["heads"], case["head_dim"], kv_heads=case["kv_heads"],
                       seed=case["seed"], requires_grad=True)
    mask = None
    if case["mask"]:
        mask = torch.rand(case["batch"], case["seq"], generator=torch.Generator().manual_seed(case["seed"])) < 0.3
    check_against_reference(attn, spec, q, k, v, key_padding_mask=mask, lse_grad=case["lse_grad"])


def test_sequence_shorter_than_every_segment():
    spec = AttentionSpec((Branch(64, 2), Branch(128, 8)), head_assignment="all")
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(1, 5, 2, 8, requires_grad=True)
    check_against_reference(attn, spec, q, k, v)


def test_explicit_scale_is_used():
    spec = AttentionSpec((Branch(16, 2),), scale=0.05)
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(1, 32, 1, 8, requires_grad=True)
    check_against_reference(attn, spec, q, k, v)


def test_no_nan_with_large_logits():
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2)), head_assignment="all")
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(1, 32, 2, 8)
    out, lse = attn(q * 300, k * 300, v, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
