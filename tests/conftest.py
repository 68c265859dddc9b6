"""Shared test helpers: inputs, per-dtype tolerances, comparison against the float64 reference."""

from __future__ import annotations

import math


import pytest
import torch
from hypothesis import strategies as st

from dilated_compiler import AttentionSpec, Branch, compile_attention, reference
from dilated_compiler.spec import load_spec

# Tolerances per dtype for |x - ref| <= atol + rtol * |ref|, compared in float64. Gradients add a rounding
# term: ROUNDING_FACTOR * unit roundoff * E, where E (rounding_terms) is the size of the terms each entry sums,
# e.g. scale * sum_j P_ij (|dP|_ij + |delta|_i + |dlse_i|) |k_j| for dq. The term is in units of the roundoff, so
# an error of the size of the terms themselves (a wrong or missing term) still fails. With a sharp softmax (a
# scale several times 1/sqrt(D)), dS = P (dP - delta) is a difference of nearly equal numbers, and delta comes
# from the rounded output, so rounding reaches entries of dq and dk near zero whatever their size: a bf16 case
# with scale 0.72 at D = 128 erred 0.164 at an entry of 0.056 of a dq whose entries in that row were all below 1
# (benchmarks/results/H200-triton.md, stop 18).
# Gradients use the outputs' tolerance plus that term (a gradient check without it is an error in half precision,
# see assert_close): the term, not a wider tolerance, is what covers the rounding they accumulate.
# float64 inputs keep float64 throughout (their lse travels in aux, in float64: lowering/base.py); only the lse
# the op returns is float32 (by contract), hence its float32 tolerance below.
# "tf32": float32 inputs whose products run on the TF32 tensor cores (torch's setting allows TF32 for float32
# matmuls; lowering.base.float32_products): every product's operands are rounded to 11 significant bits, the
# inputs included, so the scores carry that rounding too (score_roundoff 1). Measured on an H100 at N = 16K (stop
# 38): out and gradients 1.6e-3 to 2.3e-3 relative in norm, at most 4.2e-3 of the largest entry.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    "tf32": dict(atol=4e-3, rtol=4e-3),
}
# lse is float32 whatever the inputs. From fp16 or bf16 inputs (the reference gets the same rounded values) the
# score products are exact in float32, so lse carries float32 rounding only: a tolerance of the inputs' dtype
# (3e-2 + 3e-2 |lse| in bf16) would pass an lse off by 0.1, softmax mass off by a tenth.
# TF32's lse carries the scores' rounding: 2^-11 of the size of their terms (several units at D = 128)
LSE_TOLERANCES = {**TOLERANCES, torch.float64: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=1e-4, rtol=1e-4),
                  torch.bfloat16: dict(atol=1e-4, rtol=1e-4), "tf32": dict(atol=1e-2, rtol=4e-3)}
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8, "tf32": 2.0 ** -11}
ROUNDING_FACTOR = 2.0  # tensor-core rounding emulated on the GPU tests' cases uses at most 0.37 of the bound (stop 20)


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
    causal or not, batch 1 or 2, kv heads any divisor of the heads (grouped-query attention; in grouped mode a kv
    head's query heads may span branches, :func:`splits_kv_heads`). Segment lengths are 128 * r * (1 or 2), and N is a multiple of their least
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
    kv_heads = draw(st.sampled_from([d for d in range(heads, 0, -1) if heads % d == 0]))
    return dict(spec=spec, batch=draw(st.integers(1, 2)), seq=period * draw(st.integers(1, 3 if period <= 4096 else 1)),
                heads=heads, kv_heads=kv_heads, head_dim=draw(st.sampled_from([64, 128])), mask=False,
                lse_grad=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def gluon_kernels_for(case) -> tuple[str, ...]:
    """The Gluon kernels (record_gluon_calls' names) that run a :func:`gluon_cases` case on Hopper: all three, with
    grouped-query attention too; where grouped mode splits a kv head's query heads between branches, dk/dv runs in
    phases, or (gluon_hopper.SPLIT_BACKWARD off) the backward runs the tl kernels."""
    from dilated_compiler.lowering.triton import gluon_hopper
    if splits_kv_heads(case) and not gluon_hopper.SPLIT_BACKWARD:
        return ("fwd",)
    return ("fwd", "dq", "dkdv")


def splits_kv_heads(case) -> bool:
    """Whether grouped mode puts query heads of one kv head in two branches (branch i of G gets a contiguous run
    of H // G heads, the first H % G branches one more)."""
    H, gqa, spec = case["heads"], case["heads"] // case["kv_heads"], case["spec"]
    if gqa == 1 or spec.head_assignment != "grouped":
        return False
    G = spec.num_branches
    counts = [H // G + (i < H % G) for i in range(G)]
    return any(c and (sum(counts[:i]) % gqa or c % gqa) for i, c in enumerate(counts))


def case_inputs(case, dtype=torch.float32, device="cpu"):
    """q, k, v (requiring grad) and the key padding mask (or None) of a case from the strategies."""
    q, k, v = make_qkv(case["batch"], case["seq"], case["heads"], case["head_dim"], dtype=dtype, device=device,
                       kv_heads=case["kv_heads"], seed=case["seed"], requires_grad=True)
    mask = None
    if case["mask"]:
        g = torch.Generator().manual_seed(case["seed"])
        mask = (torch.rand(case["batch"], case["seq"], generator=g) < 0.3).to(device)
    return q, k, v, mask


def run_case(case, backend, dtype=torch.float32, device="cpu", precision=None):
    """Compile ``case["spec"]`` for ``backend`` and check it against the reference on the case's inputs
    (``precision``: as check_against_reference's)."""
    spec = case["spec"]
    attn = compile_attention(spec, backend=backend)
    q, k, v, mask = case_inputs(case, dtype, device)
    check_against_reference(attn, spec, q, k, v, key_padding_mask=mask, lse_grad=case["lse_grad"],
                            precision=precision)


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


def assert_close(actual, expected, dtype, what="out", grad=False, terms=None, tol=None):
    """Compare in float64 with the tolerance of ``dtype`` (``tol``: another {atol, rtol}), plus ROUNDING_FACTOR *
    roundoff * ``terms`` where given (the size of the terms each entry sums; see rounding_terms); -inf must match
    -inf exactly; no NaN anywhere. ``grad``: a gradient, which in fp16 and bf16 needs ``terms`` or ``tol``."""
    if grad and terms is None and tol is None and dtype in (torch.float16, torch.bfloat16, "tf32"):
        raise TypeError(f"{what}: a {dtype} gradient is compared with its rounding term (rounding_terms)")
    tol = tol or TOLERANCES[dtype]
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
    bound = tol["atol"] + tol["rtol"] * e.abs()
    if terms is not None:
        bound = bound + ROUNDING_FACTOR * UNIT_ROUNDOFF[dtype] * terms.detach().double().cpu()
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, (f"{what} ({dtype}): max abs error {err.max().item():.3g} exceeds atol={tol['atol']} "
                        f"rtol={tol['rtol']}" + (" plus the rounding term" if terms is not None else ""))


def assert_lse_close(actual, expected, dtype, what="lse"):
    """lse (float32) against the reference's, at LSE_TOLERANCES[dtype] (``dtype``: the inputs')."""
    assert_close(actual, expected, dtype, what, tol=LSE_TOLERANCES[dtype])


def _size(x, y, subscripts):
    """max(|sum_d x_d y_d|, sqrt(sum_d (x_d y_d)^2)) by einsum ``subscripts``: at least the inner product's size,
    and the typical size of its rounding error in units of the roundoff when x or y is rounded entry by entry,
    which a cancelling sum would hide."""
    return torch.maximum(torch.einsum(subscripts, x, y).abs(), torch.einsum(subscripts, x * x, y * y).sqrt())


def score_roundoff(dtype: torch.dtype) -> float:
    """rounding_terms' ``score_roundoff`` for gradients compared in ``dtype``: the scores accumulate in float32
    (float64 for float64 inputs), relative to the roundoff of ``dtype``; with TF32 products ("tf32") the scores'
    operands are rounded to TF32 themselves."""
    if dtype == "tf32":
        return 1.0
    return UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32] / UNIT_ROUNDOFF[dtype]


def _head_weights(spec, q, k, lse, key_padding_mask):
    """Per query head h (float64 q, k, lse): (h, its kv head, its branches' masks (reference.head_masks), which rows
    have keys, lse with 0 where they have none, the weights exp(s - lse) (B, N, N) over all pairs, and the size of
    the scores' terms scale sum_d |q_id k_jd|)."""
    B, N, H, D = q.shape
    scale = spec.softmax_scale(D)
    for h, kv, masks in reference.head_masks(spec, B, N, H, k.shape[2], key_padding_mask, "cpu"):
        qh, kh = q[:, :, h], k[:, :, kv]
        has_keys = torch.isfinite(lse[:, h])
        lse_h = torch.where(has_keys, lse[:, h], 0.0)
        weights = torch.exp(torch.einsum("bid,bjd->bij", qh, kh) * scale - lse_h[..., None])
        size = scale * torch.einsum("bid,bjd->bij", qh.abs(), kh.abs())
        yield h, kv, masks, has_keys, lse_h, weights, size


def rounding_terms(spec, q, k, v, out, lse, dout, dlse=None, key_padding_mask=None, score_roundoff=0.0):
    """The size of the terms that each entry of dq, dk and dv sums, in float64 from the reference's inputs and
    results (q, k, v (B, N, H or Hkv, D); out, lse, dout, dlse (or None) as the reference's). With P the attention
    weights exp(s - lse) on each branch's pairs, and |dP|_ij, |delta|_i the sizes of dO_i . v_j and dO_i . O_i as
    _size gives them (rounding in O and V grows with the products' terms, not with their sums):
    E_q = scale sum_j P_ij (|dP|_ij + |delta|_i + |dlse_i| + m_i) |k_j|, E_k the same summed over i with |q_i| (and
    over the query heads sharing a key head), E_v = sum_i P_ij |dO_i|. Where a head has several branches, m_i =
    2 |dO_i . O_g,i| (sized so) on branch g's pairs, O_g that branch's own output: a backward that merges per
    branch computes delta and the merge's lse gradient from O_g, and they cancel only in exact arithmetic; else
    m = 0. |exact gradient| <= E entry by entry.

    ``score_roundoff`` > 0 adds the rounding of the weights themselves: P = exp(s - lse) is off by a relative
    u_s (|s|_ij + |lse_i|), |s|_ij = scale sum_d |q_id k_jd| the size of the score's terms, where the scores are
    computed with unit roundoff u_s (float32 for every half-precision input: they accumulate in float32). Each pair's
    term above is then weighted by 1 + score_roundoff (|s|_ij + |lse_i|), score_roundoff = u_s / u of the compared
    dtype. It matters where the scores are large (an explicit scale several times 1/sqrt(D)): there torch's own
    float32 attention backward on the CPU is off by about 50 roundoffs of the terms."""
    spec = load_spec(spec)
    scale = spec.softmax_scale(q.shape[-1])
    q, k, v, out, lse, dout = (t.detach().double().cpu() for t in (q, k, v, out, lse, dout))
    terms = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
    for h, kv, masks, has_keys, lse_h, weights, size in _head_weights(spec, q, k, lse, key_padding_mask):
        qh, kh, vh, doh = q[:, :, h], k[:, :, kv], v[:, :, kv], dout[:, :, h]
        if score_roundoff:
            # the weights' own rounding, relative to the terms each pair contributes
            weights = weights * (1 + score_roundoff * (size + lse_h.abs()[..., None]))
        dp = _size(doh, vh, "bid,bjd->bij")
        row = _size(doh, out[:, :, h], "bid,bid->bi")
        if dlse is not None:
            row = row + torch.where(has_keys, dlse.detach().double().cpu()[:, h], 0.0).abs()
        t = torch.zeros_like(weights)
        p = torch.zeros_like(weights)
        for allowed in masks:
            p_g = torch.where(allowed & has_keys[..., None], weights, 0.0)
            extra = row
            if len(masks) > 1:
                out_g, _ = reference.masked_softmax_attention(qh, kh, vh, allowed, scale)
                extra = row + 2 * _size(doh, out_g, "bid,bid->bi")
            t += p_g * (dp + extra[..., None])
            p += p_g
        terms[0][:, :, h] = scale * t @ kh.abs()
        terms[1][:, :, kv] += scale * t.transpose(1, 2) @ qh.abs()
        terms[2][:, :, kv] += p.transpose(1, 2) @ doh.abs()
    return terms


def product_rounding_terms(spec, q, k, v, out, lse, key_padding_mask=None):
    """For products whose operands are rounded (TF32: q and k in the scores, the weights and v in P V), the size of
    what out and lse sum, per entry (float64, from the reference's inputs and results): a score's error is up to u
    |s|_ij (|s|_ij = scale sum_d |q_id k_jd|), which moves lse_i by sum_j P_ij u |s|_ij and out_i by
    sum_j P_ij u |s|_ij |v_j - out_i| <= sum_j P_ij u |s|_ij (|v_j| + |out_i|); rounding P and v adds
    u sum_j P_ij |v_j|. Returns (out terms (B, N, H, D), lse terms (B, H, N)), in units of u."""
    q, k, v, out, lse = (t.detach().double().cpu() for t in (q, k, v, out, lse))
    out_terms, lse_terms = torch.zeros_like(q), torch.zeros_like(lse)
    for h, kv, masks, has_keys, lse_h, weights, size in _head_weights(load_spec(spec), q, k, lse, key_padding_mask):
        vh, oh = v[:, :, kv], out[:, :, h]
        for allowed in masks:
            p = torch.where(allowed & has_keys[..., None], weights, 0.0)
            lse_terms[:, h] += (p * size).sum(-1)
            # |v_j - out_i| <= |v_j| + |out_i|
            ps = p * size
            out_terms[:, :, h] += ps @ vh.abs() + ps.sum(-1, keepdim=True) * oh.abs() + p @ vh.abs()
    return out_terms, lse_terms


def upstream_gradients(out, lse, lse_grad=True, seed=1):
    """The gradients the tests send back (float64, CPU): dout, and dlse (None unless ``lse_grad``)."""
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    # dlse reaches the op as the gradient of its float32 lse, so it is drawn in float32: the reference gets the
    # values the op gets (a float64 draw would differ by float32 rounding, beyond float64 inputs' tolerance)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float32).double() if lse_grad else None
    return dout, dlse


def backward_loss(out, lse, dout, dlse):
    """sum(out * dout) + sum(lse * dlse), rows without keys (lse -inf) left out of the second sum."""
    total = (out * dout.to(out.device, out.dtype)).sum()
    if dlse is not None:
        total = total + (torch.where(torch.isinf(lse), 0.0, lse) * dlse.to(lse.device, lse.dtype)).sum()
    return total


def check_against_reference(attn, spec, q, k, v, key_padding_mask=None, check_grad=True, lse_grad=True, seed=1,
                            precision=None):
    """Run ``attn`` and the reference; compare out, lse and (optionally) gradients of q, k, v, at the tolerances of
    q's dtype or of ``precision`` (a key of TOLERANCES: "tf32" for float32 with TF32 products)."""
    out, lse = attn(q, k, v, key_padding_mask=key_padding_mask, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    dtype = precision or q.dtype
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    qr, kr, vr = [t.detach().double().cpu().requires_grad_(check_grad) for t in (q, k, v)]
    mask_cpu = None if key_padding_mask is None else key_padding_mask.cpu()
    ref_out, ref_lse = reference.attention(qr, kr, vr, spec, key_padding_mask=mask_cpu, return_lse=True)
    if dtype == "tf32":   # rounded operands in every product: the scores' rounding reaches out and lse
        out_terms, lse_terms = product_rounding_terms(spec, qr, kr, vr, ref_out, ref_lse, mask_cpu)
        assert_close(out, ref_out, dtype, "out", terms=out_terms)
        assert_close(lse, ref_lse, dtype, "lse", tol=LSE_TOLERANCES[dtype], terms=lse_terms)
    else:
        assert_close(out, ref_out, dtype, "out")
        assert_lse_close(lse, ref_lse, dtype)
    if not check_grad:
        return
    dout, dlse = upstream_gradients(ref_out, ref_lse, lse_grad, seed)
    grads = torch.autograd.grad(backward_loss(out, lse, dout, dlse), (q, k, v))
    ref_grads = torch.autograd.grad(backward_loss(ref_out, ref_lse, dout, dlse), (qr, kr, vr))
    terms = rounding_terms(spec, qr, kr, vr, ref_out, ref_lse, dout, dlse, mask_cpu,
                           score_roundoff=score_roundoff(dtype))
    for name, a, e, t in zip("qkv", grads, ref_grads, terms):
        assert_close(a, e, dtype, f"grad {name}", grad=True, terms=t)


def assert_eager_path_matches_op(attn, q, k, v, key_padding_mask=None):
    """The module's plain eager call (runtime.op.EagerAttention, no custom-op dispatch) against the custom op
    ``dilated_compiler::attention`` itself, on copies of q, k, v: out, lse and the gradients of q, k, v (from random
    gradients of out and lse) are bitwise equal, and each call took the path it should."""
    from dilated_compiler.runtime import op
    from dilated_compiler.runtime.module import resolve_backend
    results = []
    for eager in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if eager:
            out, lse = attn(*leaves, key_padding_mask=key_padding_mask, return_lse=True)
        else:
            out, lse, _ = op.attention(*leaves, key_padding_mask, attn.spec_key,
                                       resolve_backend(attn.backend, q.device))
        assert (type(out.grad_fn).__name__ == "EagerAttentionBackward") == eager, type(out.grad_fn)
        dout, dlse = upstream_gradients(out, lse)
        torch.autograd.backward([out, lse], [dout.to(out.device, out.dtype), dlse.to(lse.device, lse.dtype)])
        results.append([out.detach(), lse.detach(), *(t.grad for t in leaves)])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name}: eager path and custom op differ"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
