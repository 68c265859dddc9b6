"""The comparison every backend test goes through (conftest.assert_close, conftest.rounding_terms): what it lets
pass and what it catches."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from conftest import (LSE_TOLERANCES, ROUNDING_FACTOR, TOLERANCES, UNIT_ROUNDOFF, assert_close, assert_lse_close,
                      attention_cases, backward_loss, case_inputs, product_rounding_terms, rounding_terms,
                      upstream_gradients)
from dilated_compiler import AttentionSpec, Branch, reference


def _reference_gradients(case):
    q, k, v, mask = case_inputs(case, torch.float64)
    out, lse = reference.attention(q, k, v, case["spec"], key_padding_mask=mask, return_lse=True)
    dout, dlse = upstream_gradients(out, lse, case["lse_grad"])
    grads = torch.autograd.grad(backward_loss(out, lse, dout, dlse), (q, k, v))
    return grads, rounding_terms(case["spec"], q, k, v, out, lse, dout, dlse, mask)


@given(case=attention_cases())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_rounding_terms_bound_the_exact_gradients(case):
    # each gradient entry is a sum of the terms whose sizes rounding_terms adds up, so it can be no larger
    grads, terms = _reference_gradients(case)
    for name, g, t in zip("qkv", grads, terms):
        assert t.shape == g.shape
        assert bool((g.abs() <= t * (1 + 1e-9) + 1e-12).all()), f"grad {name} exceeds its terms"


def test_score_roundoff_weights_each_pair_by_its_scores_size():
    """score_roundoff adds the weights' own rounding: each pair's term grows by score_roundoff (|s| + |lse|), so
    the terms grow with the scale of the scores, and 0 leaves them as they were."""
    base = dict(batch=1, seq=24, heads=2, kv_heads=2, head_dim=8, mask=False, lse_grad=False, seed=5)
    added = []
    for scale in (None, 1.5):
        case = dict(base, spec=AttentionSpec((Branch(8, 1),), scale=scale))
        q, k, v, mask = case_inputs(case, torch.float64)
        out, lse = reference.attention(q, k, v, case["spec"], return_lse=True)
        dout, dlse = upstream_gradients(out, lse, False)
        plain = rounding_terms(case["spec"], q, k, v, out, lse, dout, dlse)
        assert all(torch.equal(a, b) for a, b in zip(plain, rounding_terms(case["spec"], q, k, v, out, lse, dout,
                                                                            dlse, score_roundoff=0.0)))
        grown = rounding_terms(case["spec"], q, k, v, out, lse, dout, dlse, score_roundoff=1e-3)
        for a, b in zip(plain, grown):
            assert bool((b >= a).all()) and bool((b > a).any())
        added.append(sum(((b - a) / a.clamp_min(1e-300)).max().item() for a, b in zip(plain, grown)))
    # scale 1.5 is 4.2 times 1/sqrt(8): larger scores, a larger share added
    assert added[1] > 2 * added[0], added


def test_rounding_terms_vanish_where_no_branch_selects():
    # grouped, dilation 2, offset 0: odd positions are in no segment, so nothing of theirs is summed
    case = dict(spec=AttentionSpec((Branch(8, 2, 0),)), batch=1, seq=16, heads=2, kv_heads=2, head_dim=4,
                mask=False, lse_grad=True, seed=3)
    grads, terms = _reference_gradients(case)
    for t in terms:
        assert bool((t[:, 1::2] == 0).all()) and bool((t[:, 0::2] > 0).all())


def _near_zero_entry_of_large_terms(term: float):
    e = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e[0] = 0.0
    terms = torch.full_like(e, 0.01)
    terms[0] = term
    return e, terms


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rounding_of_large_terms_passes_with_its_term_and_fails_without(dtype):
    # the stop-18 case: an error of about one roundoff of large terms, at an entry near zero
    e, terms = _near_zero_entry_of_large_terms(2.0 * TOLERANCES[dtype]["atol"] / UNIT_ROUNDOFF[dtype])
    a = e.clone()
    a[0] += 1.5 * TOLERANCES[dtype]["atol"]
    assert_close(a, e, dtype, "grad q", grad=True, terms=terms)
    with pytest.raises(AssertionError, match="grad q"):
        assert_close(a, e, dtype, "grad q")
    with pytest.raises(TypeError, match="rounding term"):  # a half-precision gradient is never compared without it
        assert_close(a, e, dtype, "grad q", grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_error_past_the_rounding_term_fails(dtype):
    term = 10.0 * TOLERANCES[dtype]["atol"] / UNIT_ROUNDOFF[dtype]
    e, terms = _near_zero_entry_of_large_terms(term)
    a = e.clone()
    a[0] += TOLERANCES[dtype]["atol"] + 1.01 * ROUNDING_FACTOR * UNIT_ROUNDOFF[dtype] * term
    with pytest.raises(AssertionError, match="plus the rounding term"):
        assert_close(a, e, dtype, "grad q", grad=True, terms=terms)


def test_nan_and_misplaced_infinities_fail():
    e = torch.tensor([0.0, 1.0, float("-inf")], dtype=torch.float64)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(torch.tensor([0.0, float("nan"), float("-inf")]), e, torch.float32, "lse")
    with pytest.raises(AssertionError, match="infinities"):
        assert_close(torch.tensor([float("-inf"), 1.0, float("-inf")]), e, torch.float32, "lse")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lse_is_compared_at_float32_level_whatever_the_inputs(dtype):
    # lse is float32; from half inputs it carries float32 rounding only, so a shift of 1e-3 (0.1% of the softmax
    # mass) fails, while rounding to float32 passes
    e = torch.linspace(-2.0, 12.0, 64, dtype=torch.float64)
    assert_lse_close(e.float(), e, dtype)
    with pytest.raises(AssertionError, match="lse"):
        assert_lse_close(e.float() + 1e-3, e, dtype)


def _to_tf32(x):
    """x (float32) rounded to the nearest TF32 value (10 mantissa bits), as float64."""
    bits = x.float().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()


@given(case=attention_cases(max_seq=120, head_dims=(16, 64, 128), max_segment=64))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_tf32_terms_bound_rounded_operands(case):
    """The TF32 comparison of out and lse (product_rounding_terms at TF32's unit roundoff, with atol and rtol set
    to zero) lets pass the exact attention of q, k and v rounded to TF32, explicit scales included (their larger
    scores carry larger rounding)."""
    q, k, v, mask = case_inputs(case, torch.float32)
    exact = [t.double() for t in (q, k, v)]
    out, lse = reference.attention(*exact, case["spec"], key_padding_mask=mask, return_lse=True)
    rounded, rounded_lse = reference.attention(*(_to_tf32(t) for t in (q, k, v)), case["spec"], key_padding_mask=mask,
                                               return_lse=True)
    out_terms, lse_terms = product_rounding_terms(case["spec"], *exact, out, lse, mask)
    assert_close(rounded, out, "tf32", "out", terms=out_terms, tol=dict(atol=0.0, rtol=0.0))
    assert_close(rounded_lse, lse, "tf32", "lse", terms=lse_terms, tol=dict(atol=1e-12, rtol=0.0))


def test_tf32_terms_catch_an_error_past_them():
    """An out or lse off by more than TF32's bound fails the comparison."""
    case = dict(batch=1, seq=24, heads=2, kv_heads=2, head_dim=16, mask=False, lse_grad=False, seed=3,
                spec=AttentionSpec((Branch(8, 1),), scale=1.0))
    q, k, v, mask = case_inputs(case, torch.float64)
    out, lse = reference.attention(q, k, v, case["spec"], return_lse=True)
    out_terms, lse_terms = product_rounding_terms(case["spec"], q, k, v, out, lse)
    tol, lse_tol = TOLERANCES["tf32"], LSE_TOLERANCES["tf32"]
    u = ROUNDING_FACTOR * UNIT_ROUNDOFF["tf32"]
    bad = out.clone()
    bad[0, 5, 1, 3] += 1.5 * (tol["atol"] + tol["rtol"] * out[0, 5, 1, 3].abs() + u * out_terms[0, 5, 1, 3])
    with pytest.raises(AssertionError, match="out"):
        assert_close(bad, out, "tf32", "out", terms=out_terms)
    bad_lse = lse.clone()
    bad_lse[0, 1, 7] += 1.5 * (lse_tol["atol"] + lse_tol["rtol"] * lse[0, 1, 7].abs() + u * lse_terms[0, 1, 7])
    with pytest.raises(AssertionError, match="lse"):
        assert_close(bad_lse, lse, "tf32", "lse", tol=lse_tol, terms=lse_terms)
