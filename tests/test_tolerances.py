"""The comparison every backend test goes through (conftest.assert_close): what it lets pass and what it catches."""

import pytest
import torch

from conftest import GRAD_TOLERANCES, assert_close


def _gradient_like(scale: float, n: int = 4096, spikes: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(n, generator=g, dtype=torch.float64) * scale
    if spikes:
        e[1:9] = spikes  # a heavy tail: a few entries tens of units large
    e[0] = 0.0  # an entry that is a difference of large terms
    return e


def test_rounding_at_a_near_zero_entry_of_a_large_gradient_passes():
    # fp16 rounding of a product whose terms are tens of units large, landing on an entry near zero: the
    # magnitudes of the case that showed it (dk's largest entry 45, root mean square 1.55, error 0.026)
    e = _gradient_like(1.0, spikes=45.0)
    a = e.clone()
    a[0] += 0.026
    assert_close(a, e, torch.float16, "grad k", grad=True)


def test_the_same_error_on_a_unit_scale_gradient_fails():
    e = _gradient_like(0.5)
    a = e.clone()
    a[0] += 0.026
    with pytest.raises(AssertionError, match="grad k"):
        assert_close(a, e, torch.float16, "grad k", grad=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_error_of_a_few_percent_of_a_large_gradient_fails(dtype):
    e = _gradient_like(15.0, spikes=200.0)
    rms = e.pow(2).mean().sqrt().item()
    a = e.clone()
    a[0] += 2 * GRAD_TOLERANCES[dtype]["atol"] * rms  # twice the scaled bound, at an entry near zero
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close(a, e, dtype, "grad q", grad=True)


def test_nan_and_misplaced_infinities_fail():
    e = torch.tensor([0.0, 1.0, float("-inf")], dtype=torch.float64)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(torch.tensor([0.0, float("nan"), float("-inf")]), e, torch.float32, "lse")
    with pytest.raises(AssertionError, match="infinities"):
        assert_close(torch.tensor([float("-inf"), 1.0, float("-inf")]), e, torch.float32, "lse")
