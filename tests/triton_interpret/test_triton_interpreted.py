"""The generated Triton kernels under Triton's CPU interpreter, against the float64 reference.

Run only with TRITON_INTERPRET=1 set before triton is imported: tests/test_triton_lowering.py spawns
``python -m pytest tests/triton_interpret`` with it. Collected in a plain run, these tests skip.
Shapes are tiny (the interpreter runs every program in Python); tiles are 16x16 so that every case has several
tiles, ragged ends and all three loop phases. bf16 is tested on GPU only (the interpreter's bf16 is wrong, and
the lowering refuses it there).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 before triton is imported (see module docstring)")

from dilated_compiler import AttentionSpec, Branch, compile_attention  # noqa: E402
from dilated_compiler.lowering.triton import lowering as triton_lowering  # noqa: E402
from conftest import (assert_close, assert_eager_path_matches_op, attention_cases, check_against_reference,  # noqa: E402
                      make_qkv, run_case, upstream_gradients)


@pytest.fixture(autouse=True, params=["tma", "pointers"])
def load_path(request, monkeypatch):
    """Every test runs both tile paths (tensor descriptors and pointer loads), and with the outputs the kernels
    fill by themselves poisoned with NaN: a gap the zero fill misses fails the comparison."""
    monkeypatch.setattr(triton_lowering, "USE_TMA", request.param == "tma")
    calls = []

    def poisoned(shape, dtype, device):
        calls.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_lowering, "_uninitialized", poisoned)
    return calls

PATTERNS = {
    "three-branch": (Branch(8, 1), Branch(16, 2), Branch(32, 4)),
    "offsets": (Branch(12, 3, offset=2), Branch(10, 5, offset=0), Branch(7, 7, offset=6)),
    "long-segment": (Branch(48, 1), Branch(40, 2)),
    "odd": (Branch(5, 2), Branch(9, 3), Branch(3, 1)),
}


def _spec(name, mode, causal):
    branches = PATTERNS[name]
    if mode == "all":
        branches = tuple(Branch(b.segment_length, b.dilation) for b in branches)
    return AttentionSpec(branches, head_assignment=mode, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward(dtype, mode, causal, load_path):
    spec = _spec("three-branch", mode, causal)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(2, 45, 4, 16, dtype=dtype, requires_grad=True)
    check_against_reference(attn, spec, q, k, v)
    # grouped: out, dq, dk and dv come from the zero-filling kernels (no memset); all mode: the branches' outputs
    # are read only where the branch's lse is finite (poisoned here), and dq, dk, dv accumulate into zeros
    assert len(load_path) == (4 if mode == "grouped" else 1)   # out; dq, dk, dv / the branches' outputs


@pytest.mark.parametrize("name,mode,causal,seq", [
    ("offsets", "grouped", True, 50),
    ("long-segment", "grouped", True, 64),
    ("long-segment", "all", False, 61),
    ("odd", "all", True, 23),
])
def test_branch_mixes(name, mode, causal, seq):
    spec = _spec(name, mode, causal)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, seq, 3, 16, dtype=torch.float32, requires_grad=True, seed=seq)
    check_against_reference(attn, spec, q, k, v)


@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_eager_path_matches_the_custom_op(mode):
    """The module's plain eager call (runtime.op.EagerAttention) and the custom op run the same kernels: bitwise
    equal out, lse and gradients (conftest.assert_eager_path_matches_op)."""
    attn = compile_attention(_spec("three-branch", mode, True), backend="triton")
    q, k, v = make_qkv(2, 45, 4, 16, dtype=torch.float32, kv_heads=2)
    mask = torch.zeros(2, 45, dtype=torch.bool)
    mask[0, 30:] = True
    assert_eager_path_matches_op(attn, q, k, v, mask)


def test_backward_follows_the_float32_setting_it_runs_under(load_path):
    """Should torch's float32 matmul setting change between a forward and its backward, the backward runs under the
    setting of its own time (as torch's matmuls do), on the eager path and through the custom op alike: both take
    the plan compiled for that setting, and their gradients are bitwise equal."""
    from dilated_compiler.runtime import op
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    attn = compile_attention(_spec("three-branch", "grouped", False), backend="triton")
    q, k, v = make_qkv(1, 40, 3, 16, dtype=torch.float32)
    ran = []
    real_backward = triton_lowering.TritonLowering.backward

    def recording(self, *args):
        ran.append(self.dot_precision)
        return real_backward(self, *args)
    grads = []
    try:
        for eager in (True, False):
            matmul.fp32_precision = "ieee"
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            if eager:
                out, lse = attn(*leaves, return_lse=True)
            else:
                out, lse, _ = op.attention(*leaves, None, attn.spec_key, "triton")
            assert (type(out.grad_fn).__name__ == "EagerAttentionBackward") == eager
            dout, dlse = upstream_gradients(out, lse)
            matmul.fp32_precision = "tf32"
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(triton_lowering.TritonLowering, "backward", recording)
                torch.autograd.backward([out, lse], [dout.to(out.dtype), dlse.to(lse.dtype)])
            grads.append([t.grad for t in leaves])
    finally:
        matmul.fp32_precision = before
    assert ran == ["tf32", "tf32"]
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a, b), f"{name}: eager path and custom op differ"


@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_gqa_and_key_padding(mode):
    spec = AttentionSpec((Branch(8, 1), Branch(16, 4)), head_assignment=mode, causal=mode == "all")
    attn = compile_attention(spec, backend="triton")
    q, _, _ = make_qkv(2, 40, 4, 16, requires_grad=True)
    _, k, v = make_qkv(2, 40, 4, 16, kv_heads=2, seed=3, requires_grad=True)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :16] = True          # whole segments with every key padded: out 0, lse -inf, no NaN
    mask[1, 5::3] = True
    check_against_reference(attn, spec, q, k, v, key_padding_mask=mask)
    out, lse = attn(q, k, v, key_padding_mask=mask, return_lse=True)
    assert torch.isneginf(lse[0, :, :8]).all() and (out[0, :8] == 0).all()


@pytest.mark.parametrize("causal,seq", [(False, 48), (True, 64)])
def test_key_padding_in_unmasked_tiles(causal, seq):
    # one segment of several 16-row tiles, so the middle phase (no position or causal mask) runs with a padding
    # mask: it must still apply that mask (the other padding tests have segments of at most 8 selected rows)
    spec = AttentionSpec((Branch(seq, 1),), causal=causal)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(2, seq, 2, 16, requires_grad=True)
    mask = torch.zeros(2, seq, dtype=torch.bool)
    mask[1, 5::3] = True
    check_against_reference(attn, spec, q, k, v, key_padding_mask=mask)


def test_gqa_single_kv_head_fp16_no_lse_grad():
    spec = AttentionSpec((Branch(16, 1), Branch(32, 2)), causal=True)
    attn = compile_attention(spec, backend="triton")
    q, _, _ = make_qkv(1, 37, 4, 16, dtype=torch.float16, requires_grad=True)
    _, k, v = make_qkv(1, 37, 4, 16, dtype=torch.float16, kv_heads=1, seed=5, requires_grad=True)
    check_against_reference(attn, spec, q, k, v, lse_grad=False)


@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_contiguous_inputs_with_other_strides_on_size_one_dims(mode):
    # contiguous() keeps any stride of a size-1 dimension: batch 1 of a (seq, batch, heads, D) layout transposed,
    # or one head of a (B, H, N, D) layout; the kernels pass one tensor's strides for several
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2)), head_assignment=mode)
    attn = compile_attention(spec, backend="triton")
    dims = (1, 0, 2, 3) if mode == "grouped" else (0, 2, 1, 3)  # (N, 1, H, D) or (B, 1, N, D) in memory
    shape = (1, 32, 2, 16) if mode == "grouped" else (2, 32, 1, 16)
    q, k, v = (torch.empty(t.permute(dims).shape).copy_(t.detach().permute(dims)).permute(dims).requires_grad_()
               for t in make_qkv(*shape))
    assert q.shape == shape and q.is_contiguous() and q.stride() != torch.empty(shape).stride()
    check_against_reference(attn, spec, q, k, v)


@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_head_dim_with_a_stride_other_than_one(mode):
    # q, k, v laid out as (B, N, D, H): the lowering restrides them for the kernels
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2)), head_assignment=mode, causal=True)
    attn = compile_attention(spec, backend="triton")
    q, k, v = (t.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_() for t in make_qkv(1, 24, 2, 16))
    assert q.stride(-1) == 2
    check_against_reference(attn, spec, q, k, v)


@pytest.mark.parametrize("head_dim", [24, 32])
def test_head_dims(head_dim):
    spec = AttentionSpec((Branch(32, 1), Branch(64, 2)), head_assignment="all")
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, 64, 2, head_dim, requires_grad=True)
    check_against_reference(attn, spec, q, k, v)


@pytest.mark.parametrize("block,partner,seq", [(32, 16, 50), (16, 32, 51)])
def test_tiles_of_unequal_sizes(block, partner, seq, monkeypatch):
    """The GPU's tile configs are seldom square (dk/dv 64x32, dq 128x64: a pass's own tile and the partner tiles
    its inner loop walks differ), the interpreter's one config is 16x16: here a pass's own tiles and its partner
    tiles differ, both ways, so a launch or kernel that takes one for the other fails. Ragged segments (40 rows:
    32 + 8) and a causal diagonal crossing tiles of either size; GQA (dk, dv add over two query heads)."""
    from dilated_compiler.runtime import clear_cache
    from dilated_compiler.lowering.triton import autotune
    monkeypatch.setattr(autotune, "INTERPRETER_CONFIG", autotune.TileConfig(block, partner, 1, 1))
    assert autotune.candidates("dkdv", 16, 4) == [(block, partner, 1, 1, True, 0)]  # what every pass gets
    clear_cache()  # no lowering compiled with other tiles (they keep their configs) is reused, nor kept after
    try:
        spec = AttentionSpec((Branch(40, 1), Branch(48, 3, offset=1)), causal=True)
        attn = compile_attention(spec, backend="triton")
        q, _, _ = make_qkv(1, seq, 2, 16, requires_grad=True, seed=seq)
        _, k, v = make_qkv(1, seq, 2, 16, kv_heads=1, seed=seq + 1, requires_grad=True)
        check_against_reference(attn, spec, q, k, v)
    finally:
        clear_cache()


def test_scores_with_a_large_common_offset():
    """Scores of every pair raised by 30 (a feature that every q and k share): the softmax is unchanged and lse
    is about 30 (sharper scores are not needed for that). The backward recomputes P = exp2(s log2(e) scale -
    lse log2(e)): an error in either base change grows with lse, so a log2(e) off by 5e-6 (1.4427) fails here in
    float32, where the other tests' lse of a few units leave it within the tolerance."""
    spec = AttentionSpec((Branch(16, 1), Branch(32, 2)), causal=True)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, 32, 2, 16, seed=7)
    shift = (30 / spec.softmax_scale(16)) ** 0.5
    q[..., 0] = shift
    k[..., 0] = shift
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    check_against_reference(attn, spec, q, k, v)
    _, lse = attn(q, k, v, return_lse=True)
    assert lse[torch.isfinite(lse)].min() > 25  # rows a head's branch selects (r = 2: half of them)


def test_nothing_selected_gives_zero_and_neg_inf():
    # N shorter than the offset: no row is selected anywhere (empty tile tables)
    spec = AttentionSpec((Branch(8, 4, offset=3),))
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, 3, 2, 16, requires_grad=True)
    check_against_reference(attn, spec, q, k, v)


def test_bfloat16_is_refused_under_the_interpreter():
    """The interpreter computes bfloat16 matrix products wrongly (by orders of magnitude), so bfloat16 on CPU tensors
    is refused with a BackendError that says what runs instead, not computed silently wrong."""
    from dilated_compiler.lowering import BackendError
    spec = _spec("three-branch", "grouped", False)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, 20, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(BackendError, match="cannot run bfloat16.*float16 or float32.*'torch'"):
        attn(q, k, v)


def test_torch_compile_fullgraph():
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2)), head_assignment="all", causal=True)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, 32, 2, 16, requires_grad=True)
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, return_lse=True), fullgraph=True)
    check_against_reference(lambda q, k, v, key_padding_mask=None, return_lse=True: compiled(q, k, v),
                            spec, q, k, v)


@given(attention_cases(max_dilation=5, max_kv_heads=2, max_seq=48, head_dims=(3, 8, 16)))
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_random_specs_and_shapes(case):
    """Random specs and shapes (ragged N, offsets, odd head counts, GQA, key padding, head_dim needing padding)
    through both tile paths, against the reference, with self-filled outputs poisoned."""
    run_case(case, "triton")


@pytest.mark.parametrize("mode,is_causal", [("grouped", False), ("all", True)])
def test_dilated_mha_layer(mode, is_causal):
    """The nn layer on this backend: its projections, grouped-query heads, key padding and is_causal around the
    kernels, against the float64 reference (the module's weights + reference.attention), forward and the gradients
    of input and weights."""
    import copy
    import dataclasses
    from dilated_compiler.nn import DilatedMultiheadAttention
    from test_nn import _padding, _params_and_input_grads, ref_dilated_mha
    spec = _spec("odd", mode, False)
    torch.manual_seed(0)
    m = DilatedMultiheadAttention(48, 6, spec, num_kv_heads=2, dtype=torch.float32, backend="triton")
    m64 = copy.deepcopy(m).double()
    B, N = 2, 21
    x = torch.randn(B, N, 48, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    kpm = _padding(B, N)
    out, _ = m(x, x, x, key_padding_mask=kpm, is_causal=is_causal)
    ref_spec = dataclasses.replace(spec, causal=is_causal)
    ref = ref_dilated_mha(m64, x64, x64, x64, ref_spec, key_padding_mask=kpm)
    assert_close(out, ref, torch.float32)
    dout = torch.randn(out.shape, dtype=torch.float64)
    grads = _params_and_input_grads((out * dout.float()).sum(), m, (x,))
    ref_grads = _params_and_input_grads((ref * dout).sum(), m64, (x64,))
    assert len(grads) == len(ref_grads) > 1
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        assert_close(a, e, torch.float32, f"grad {i}", grad=True)
