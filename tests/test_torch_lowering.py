"""The torch lowering against the float64 reference: out, lse and gradients, per dtype."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from dilated_compiler import AttentionSpec, Branch, compile_attention
from conftest import attention_cases, check_against_reference, cuda, make_qkv, run_case

DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, pytest.mark.gpu])]

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


@given(attention_cases())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_specs_and_shapes_fp32(case):
    run_case(case, "torch")


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
    q, k, v = (q * 300).requires_grad_(), (k * 300).requires_grad_(), v.requires_grad_()
    out, lse = attn(q, k, v, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and lse.abs().max() > 1e4  # logits of ~1e5
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum() + lse.sum(), (q, k, v)))
    # the forward against the reference in float64, where exp(1e5) overflows too. The op's lse is float32 by
    # contract, and at |lse| = 1e5 its rounding (1e5 * 2^-24) moves softmax weights by about 0.6%: so "all" mode's
    # merge and every backward (which recompute the weights from lse) are off by that much at such logits, and
    # the comparison is grouped and forward only.
    spec = dataclasses.replace(spec, head_assignment="grouped")
    q, k, v = make_qkv(1, 32, 2, 8, dtype=torch.float64)
    check_against_reference(compile_attention(spec, backend="torch"), spec, q * 300, k * 300, v, check_grad=False)
