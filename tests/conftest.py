"""Shared test helpers: inputs, per-dtype tolerances, comparison against the float64 reference."""

from __future__ import annotations

import math


import pytest
import torch
from hypothesis import strategies as st

from dilated_compiler import AttentionSpec, Branch, compile_attention, reference

# Tolerances per dtype for |x - ref| <= atol * m + rtol * |ref|, compared in float64, where m is the reference
# tensor's root mean square, at least 1. Rounding in a low-precision product grows with its terms, and an entry of
# a gradient can be a small difference of large terms: with a large softmax scale, dq and dk reach tens while some
# of their entries are near zero, and an absolute error fixed at the unit scale failed there for rounding alone
# (fp16: 0.026 against 0.02 at entries of a dk whose largest was 45; in float32 the same case used a fifth of
# float32's bound). This does not cover every sharp softmax: there dq's rounding error follows the terms
# (scale * |P| (|dP| + |delta|) |K|), not the result, and a bf16 case with scale 0.72 at D = 128 still used 1.03 of
# the bound (benchmarks/results/H200-triton.md, stop 18). A bound from the terms' magnitudes is not built yet.
# float64 inputs still go through a float32 lse (the op's lse is float32 by contract), hence 1e-5.
TOLERANCES = {
    torch.float64: dict(atol=1e-5, rtol=1e-5),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
# Gradients accumulate more rounding than outputs.
GRAD_TOLERANCES = {dt: dict(atol=t["atol"] * 5, rtol=t["rtol"] * 5) for dt, t in TOLERANCES.items()}


@st.composite
def attention_cases(draw, max_dilation=6, max_kv_heads=3, max_seq=70, head_dims=(1, 3, 8, 16), max_segment=40):
    """A random valid spec (either mode, explicit offsets, causal, a scale) and shapes for it: ragged N, odd head
    counts, GQA, key padding, head_dim needing padding; as a dict for :func:`run_case`."""
    mode = draw(st.sampled_from(["grouped", "all"]))
    n_branches = draw(st.integers(1, 3))
    branches = []
    for _ in range(n_branches):
        w = draw(st.integers(1, max_segment))
        r = draw(st.integers(1, min(w, max_dilation)))
        off = draw(st.one_of(st.none(), st.integers(0, r - 1))) if mode == "grouped" else None
        branches.append(Branch(w, r, off))
    spec = AttentionSpec(tuple(branches), head_assignment=mode, causal=draw(st.booleans()),
                         scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))))
    kv_heads = draw(st.integers(1, max_kv_heads))
    heads = kv_heads * draw(st.integers(max(1, -(-n_branches // kv_heads)), 3))  # odd counts included
    return dict(spec=spec, batch=draw(st.integers(1, 2)), seq=draw(st.integers(1, max_seq)), heads=heads,
                kv_heads=kv_heads, head_dim=draw(st.sampled_from(head_dims)), mask=draw(st.booleans()),
                lse_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@st.composite
def gluon_cases(draw, modes=("grouped",)):
    """Specs whose every segment is whole 128-row tiles, which the Hopper kernels take: 1 to 4 branches, dilations
    1 to 8 (3 among them: in "all" mode its rows and those of r = 2 do not include one another), offsets (grouped),
    causal or not, batch 1 or 2. Segment lengths are 128 * r * (1 or 2), and N is a multiple of their least
    common multiple (so of each). ``modes``: head assignments to draw from."""
    mode = draw(st.sampled_from(modes)) if len(modes) > 1 else modes[0]
    branches = []
    for _ in range(draw(st.integers(1, 4))):
        r = draw(st.sampled_from([1, 2, 3, 4, 8]))
        w = 128 * r * draw(st.sampled_from([1, 2]))
        off = draw(st.one_of(st.none(), st.integers(0, r - 1))) if mode == "grouped" else None
        branches.append(Branch(w, r, off))
    spec = AttentionSpec(tuple(branches), head_assignment=mode, causal=draw(st.booleans()))
    period = math.lcm(*(b.segment_length for b in branches))
    heads = draw(st.integers(len(branches) if mode == "grouped" else 1, 6))
    return dict(spec=spec, batch=draw(st.integers(1, 2)), seq=period * draw(st.integers(1, 3 if period <= 4096 else 1)),
                heads=heads, kv_heads=heads, head_dim=draw(st.sampled_from([64, 128])), mask=False,
                lse_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def run_case(case, backend, dtype=torch.float32, device="cpu"):
    """Compile ``case["spec"]`` for ``backend`` and check it against the reference on the case's inputs."""
    spec = case["spec"]
    attn = compile_attention(spec, backend=backend)
    q, k, v = make_qkv(case["batch"], case["seq"], case["heads"], case["head_dim"], dtype=dtype, device=device,
                       kv_heads=case["kv_heads"], seed=case["seed"], requires_grad=True)
    mask = None
    if case["mask"]:
        g = torch.Generator().manual_seed(case["seed"])
        mask = (torch.rand(case["batch"], case["seq"], generator=g) < 0.3).to(device)
    check_against_reference(attn, spec, q, k, v, key_padding_mask=mask, lse_grad=case["lse_grad"])


def poison_uninitialized(monkeypatch):
    """Outputs the Triton lowering fills by itself start as NaN (a missed gap fails the comparison). Returns the
    lowering module."""
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    monkeypatch.setattr(triton_lowering, "_uninitialized",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    return triton_lowering


def record_gluon_calls(lowering_module, monkeypatch):
    """The Gluon launches from here on, by kernel: {"fwd": [q shapes], "dq": [...], "dkdv": [...]}."""
    calls = {"fwd": [], "dq": [], "dkdv": []}

    def record(name):
        launch = getattr(lowering_module.TritonLowering, f"_launch_gluon_{name}")
        return lambda self, *a, **kw: calls[name].append(a[0].shape) or launch(self, *a, **kw)
    for name in calls:
        monkeypatch.setattr(lowering_module.TritonLowering, f"_launch_gluon_{name}", record(name))
    return calls


def make_qkv(batch, seq, heads, head_dim, dtype=torch.float32, device="cpu", kv_heads=None, seed=0,
             requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device).requires_grad_(requires_grad) for t in (q, k, v)]


def assert_close(actual, expected, dtype, what="out", grad=False):
    """Compare in float64 with the tolerance of ``dtype`` (atol in units of the reference's root mean square, at
    least 1; see TOLERANCES); -inf must match -inf exactly; no NaN anywhere."""
    tol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN in result"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e), f"{what}: infinities differ from the reference at {(inf_a != inf_e).sum()} places"
    if inf_e.any():
        assert torch.equal(a[inf_e], e[inf_e]), f"{what}: sign of infinities differs"
    a, e = torch.where(inf_e, 0.0, a), torch.where(inf_e, 0.0, e)
    err = (a - e).abs()
    m = max(1.0, e.pow(2).mean().sqrt().item()) if e.numel() else 1.0
    bound = tol["atol"] * m + tol["rtol"] * e.abs()
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, (f"{what} ({dtype}): max abs error {err.max().item():.3g} exceeds atol={tol['atol']} "
                        f"(times the reference's root mean square, {m:.3g}) rtol={tol['rtol']}")


def check_against_reference(attn, spec, q, k, v, key_padding_mask=None, check_grad=True, lse_grad=True, seed=1):
    """Run ``attn`` and the reference; compare out, lse and (optionally) gradients of q, k, v."""
    dtype = q.dtype
    out, lse = attn(q, k, v, key_padding_mask=key_padding_mask, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    qr, kr, vr = [t.detach().double().cpu().requires_grad_(check_grad) for t in (q, k, v)]
    mask_cpu = None if key_padding_mask is None else key_padding_mask.cpu()
    ref_out, ref_lse = reference.attention(qr, kr, vr, spec, key_padding_mask=mask_cpu, return_lse=True)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    if not check_grad:
        return
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(ref_out.shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64) if lse_grad else None

    def loss(o, l):
        total = (o * dout.to(o.device, o.dtype)).sum()
        if dlse is not None:
            total = total + (torch.where(torch.isinf(l), 0.0, l) * dlse.to(l.device, l.dtype)).sum()
        return total

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (qr, kr, vr))
    for name, a, e in zip("qkv", grads, ref_grads):
        assert_close(a, e, dtype, f"grad {name}", grad=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
