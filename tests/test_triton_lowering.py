"""The Triton lowering: interpreter suite (spawned), source without a GPU, disk cache, errors; GPU correctness.

The kernels themselves are tested on CPU in tests/triton_interpret/, which needs TRITON_INTERPRET=1 before triton
is imported; :func:`test_interpreter_suite` runs that folder in a fresh process with it set.
"""

import multiprocessing
import os
import queue as queue_module
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

from dilated_compiler import AttentionSpec, Branch, compile_attention, reference
from dilated_compiler.lowering import BackendError, triton_available, triton_unavailable_reason
from conftest import (assert_close, assert_eager_path_matches_op, assert_lse_close, attention_cases,
                      check_against_reference, cuda, gluon_cases, gluon_kernels_for, make_qkv, poison_uninitialized,
                      record_gluon_calls, rounding_terms, run_case, score_roundoff, splits_kv_heads)

pytestmark = pytest.mark.skipif(not triton_available(), reason=f"triton unavailable: {triton_unavailable_reason()}")

ROOT = Path(__file__).resolve().parent.parent
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
FOUR_BRANCH = (Branch(2048, 1), Branch(4096, 2), Branch(8192, 4), Branch(16384, 8))


# ---- CPU ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_interpreter_suite(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", DILATED_COMPILER_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/triton_interpret"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter suite failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


def test_kernel_source_without_gpu():
    spec = AttentionSpec(FOUR_BRANCH, name="longnet-4")
    text = compile_attention(spec, backend="triton").kernel_source(65536, 16, 128, dtype=torch.bfloat16,
                                                                    device="cpu")
    for kernel in ("dilated_fwd", "dilated_bwd_dq", "dilated_bwd_dkdv"):
        assert f"def {kernel}(" in text
    assert "# dilated_fwd: out and lse of one query tile." in text
    kernels = re.findall(r"^def ((?:dilated|gluon)_\w+)\(", text, re.M)
    assert set(kernels) == {"dilated_fwd", "dilated_merge", "dilated_bwd_dq", "dilated_bwd_dkdv", "gluon_fwd",
                            "gluon_bwd_dq", "gluon_bwd_dkdv"}
    for kernel in kernels:                                                 # each has a glossary of its symbols
        assert re.search(rf"^#\s+{kernel}\b", text, re.M), kernel
    assert "r = tl.where(branch == 3, 8, r)" in text                       # the spec's dilations are baked in
    assert "grid=(" in text and "useful FLOPs fwd" in text                  # launches and the plan
    all_mode = AttentionSpec(tuple(Branch(b.segment_length, b.dilation) for b in FOUR_BRANCH), head_assignment="all")
    assert "def dilated_merge(" in compile_attention(all_mode, backend="triton").kernel_source(
        16384, 16, 64, dtype=torch.float16, device="cuda")


def test_kernel_source_says_when_the_gluon_kernels_are_off(monkeypatch):
    """With the Hopper kernels turned off (DILATED_COMPILER_GLUON=0) the source says so and shows only the tl kernels
    that then run everywhere."""
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    attn = compile_attention(AttentionSpec(FOUR_BRANCH), backend="triton")
    monkeypatch.setattr(triton_lowering, "USE_GLUON", False)
    text = attn.kernel_source(65536, 16, 128, dtype=torch.bfloat16, device="cpu")
    assert "turned off (DILATED_COMPILER_GLUON=0)" in text and "runs instead" not in text
    assert "def dilated_fwd(" in text and "def gluon_fwd(" not in text
    monkeypatch.setattr(triton_lowering, "USE_GLUON", True)
    text = attn.kernel_source(65536, 16, 128, dtype=torch.bfloat16, device="cpu")
    assert "turned off" not in text and "def gluon_fwd(" in text


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available(), reason="CPU tensors are allowed under the interpreter")
def test_cpu_tensors_without_interpreter_raise():
    attn = compile_attention(AttentionSpec((Branch(8, 1),)), backend="triton")
    q, k, v = make_qkv(1, 16, 2, 16)
    with pytest.raises(BackendError, match="CUDA tensors"):
        attn(q, k, v)


def test_gluon_forward_selection_without_gpu():
    """Which calls the Gluon forward would take, decided without a GPU; its source is valid Python."""
    import triton
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton import gluon_hopper
    from dilated_compiler.lowering.triton.lowering import TritonLowering
    from dilated_compiler.lowering.triton.tables import tile_table
    four = (Branch(256, 1), Branch(512, 2), Branch(1024, 4), Branch(2048, 8))

    def reason(spec, N=4096, H=8, Hkv=8, D=128, dtype=torch.bfloat16, kpm=False, device="cuda"):
        table = tile_table(build_plan(spec, N, H, D), "q", 128, 128)
        return gluon_hopper.unsupported_reason(spec=spec, seq_len=N, heads=H, kv_heads=Hkv, head_dim=D, dtype=dtype,
                                               device=torch.device(device), table=table, has_kpm=kpm,
                                               triton_version=triton.__version__)
    # "all" mode: the forward (each branch's out and lse; the merge follows)
    assert reason(AttentionSpec(four, head_assignment="all"), device="cpu") == "not a CUDA device"
    assert reason(AttentionSpec(four, causal=True), device="cpu") == "not a CUDA device"  # causal: both forms
    assert "padding" in reason(AttentionSpec(four), kpm=True)
    # grouped-query attention (forward and backward have the same reasons), whether a kv head's query heads lie in
    # one branch (Hkv 4: 2 of 8 heads per branch) or in several (Hkv 2)
    for Hkv in (4, 2):
        assert reason(AttentionSpec(four), Hkv=Hkv, device="cpu") == "not a CUDA device"
    assert reason(AttentionSpec(four, head_assignment="all"), Hkv=1, device="cpu") == "not a CUDA device"
    assert "head_dim" in reason(AttentionSpec(four), D=96)
    assert reason(AttentionSpec(four), D=64, device="cpu") == "not a CUDA device"
    assert "bf16" in reason(AttentionSpec(four), dtype=torch.float32)
    assert "branches" in reason(AttentionSpec(four + (Branch(4096, 16),)), H=10, Hkv=10)
    assert "multiple of every dilation" in reason(AttentionSpec(four), N=4092)
    assert "multiples of their dilations" in reason(AttentionSpec(four[:3] + (Branch(2046, 4),)))
    assert "multiple of 128" in reason(AttentionSpec(four), N=3840)
    assert reason(AttentionSpec(four), device="cpu") == "not a CUDA device"
    low = TritonLowering(build_plan(AttentionSpec(four), 4096, 8, 128), torch.device("cpu"), torch.bfloat16)
    x = torch.zeros(1, 4096, 8, 128, dtype=torch.bfloat16)
    assert low.gluon_unsupported(x, x, x, False) == "not a CUDA device"
    n = 4096 * 8 * 128
    unaligned = torch.zeros(n + 8, dtype=torch.bfloat16)[1:1 + n].view(1, 4096, 8, 128)
    assert "16 bytes" in low.gluon_unsupported(x, unaligned, x, False)
    compile(low._gluon_text, "gluon_fwd", "exec")
    assert "gluon_fwd" in low.source() and "def gluon_fwd(" in low.source()


@given(case=gluon_cases(modes=("grouped", "all")))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_gluon_cases_are_what_the_gluon_kernels_take(case):
    """The GPU tests' and the soak's Gluon strategy draws only cases the Hopper kernels take (on a CPU the one
    reason left is the device), and gluon_kernels_for names the kernels the lowering's own checks pick: the
    backward's too, grouped-query attention included."""
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton import gluon_hopper
    from dilated_compiler.lowering.triton.tables import tile_table, whole_groups_reason
    spec, N, H, Hkv, D = case["spec"], case["seq"], case["heads"], case["kv_heads"], case["head_dim"]
    assert H % Hkv == 0
    table = tile_table(build_plan(spec, N, H, D, kv_heads=Hkv), "q", gluon_hopper.BLOCK_M, gluon_hopper.BLOCK_N)
    reason = gluon_hopper.unsupported_reason(spec=spec, seq_len=N, heads=H, kv_heads=Hkv, head_dim=D,
                                             dtype=torch.bfloat16, device=torch.device("cpu"), table=table,
                                             has_kpm=False, triton_version=gluon_hopper.CHECKED_TRITON[0])
    # the lowering's split test (whole_groups_reason) and the strategy's own agree
    plan = build_plan(spec, N, H, D, kv_heads=Hkv)
    assert splits_kv_heads(case) == (whole_groups_reason(plan, H // Hkv) is not None)
    taken = ["fwd"] if reason == "not a CUDA device" else []
    if taken and (gluon_hopper.SPLIT_BACKWARD or not splits_kv_heads(case)):
        taken += ["dq", "dkdv"]
    assert tuple(taken) == gluon_kernels_for(case), (case, reason)


def test_gluon_cases_draw_grouped_query_attention():
    """The strategy draws grouped-query cases of every kind: "all" mode, and grouped mode with each kv head's query
    heads in one branch or (dk/dv in phases) in two."""
    from hypothesis import find
    for mode, split in (("all", False), ("grouped", False), ("grouped", True)):
        case = find(gluon_cases(modes=("grouped", "all")),
                    lambda c: c["kv_heads"] < c["heads"] and c["spec"].head_assignment == mode
                    and splits_kv_heads(c) == split)
        assert case["heads"] % case["kv_heads"] == 0


def _record_gluon_launches(low, monkeypatch, tl_calls):
    """Replace the Gluon kernels with recorders of (name, bound arguments), and the tl backward's launchers with
    ``tl_calls.append``; a Hopper GPU's answers from the spec and the call's facts (device checks aside)."""
    import inspect
    from dilated_compiler.lowering.triton import gluon_hopper, lowering as triton_lowering
    launches = []

    def recorder(name):
        kernel = getattr(low.gluon_kernels, name)
        kernel = getattr(kernel, "recorded_kernel", kernel)   # the module is shared: it may hold an earlier recorder

        class Recorder:
            def __getitem__(self, grid):
                def launch(*a, **kw):
                    kw.pop("launch_cooperative_grid", None)
                    kw.pop("launch_pdl", None)
                    launches.append((name, inspect.signature(kernel.fn).bind(*a, **kw)))
                return launch
        rec = Recorder()
        rec.recorded_kernel = kernel
        return rec
    for name in ("gluon_fwd", "gluon_bwd_dq", "gluon_bwd_dkdv"):
        monkeypatch.setattr(low.gluon_kernels, name, recorder(name))
    monkeypatch.setattr(low, "_launch_dq", lambda *a, **kw: tl_calls.append("dq"))
    monkeypatch.setattr(low, "_launch_dkdv", lambda *a, **kw: tl_calls.append("dkdv"))
    monkeypatch.setattr(low, "_config", lambda *a, **kw: None)

    def unsupported(q, k, v, has_kpm, *more):
        return gluon_hopper.spec_reason(low.spec, heads=low.heads, kv_heads=low.kv_heads, head_dim=low.head_dim,
                                        dtype=q.dtype)
    monkeypatch.setattr(low, "gluon_unsupported", unsupported)
    monkeypatch.setattr(triton_lowering, "_sm_count", lambda device: 5)
    monkeypatch.setattr(triton_lowering, "_ensure_allocator", lambda: None)
    monkeypatch.setattr(triton_lowering.TritonLowering, "_check_device", lambda self, t: None)
    return launches


def test_gluon_gqa_wiring_without_gpu(monkeypatch):
    """Grouped-query attention on the Gluon kernels: gluon_fwd and gluon_bwd_dq read kv head h // GQA (K and V
    with Hkv heads and their own batch stride); gluon_bwd_dkdv walks the kv heads' key tiles (kv_tile_table: a row
    per kv head, its query heads in turn) and writes dK and dV of Hkv heads, zero fill included. Where grouped mode
    splits a kv head's query heads between branches, it runs a phase per branch into float32 buffers, and
    kernel_source() says so. The kernels themselves run on a Hopper GPU only (test_gpu_gluon_gqa)."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton import gluon_hopper, lowering as triton_lowering
    from dilated_compiler.lowering.triton.tables import kv_tile_heads, kv_tile_table, persistent_order
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)))
    B, N, H, Hkv, D = 2, 1024, 6, 2, 128   # branch 0: heads 0-2 (kv head 0), branch 1: heads 3-5 (kv head 1)
    low = triton_lowering.TritonLowering(build_plan(spec, N, H, D, kv_heads=Hkv), torch.device("cpu"),
                                         torch.bfloat16)
    tl_calls = []
    launches = _record_gluon_launches(low, monkeypatch, tl_calls)
    q = torch.randn(B, N, H, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, N, Hkv, D, dtype=torch.bfloat16) for _ in range(2))
    out, lse, aux = low.forward(q, k, v)
    (name, bound), = launches
    a = bound.arguments
    assert name == "gluon_fwd" and a["GQA"] == H // Hkv == 3
    assert a["K"] is k and a["V"] is v and a["stride_b"] == N * H * D and a["stride_kb"] == N * Hkv * D
    launches.clear()
    dq, dk, dv = low.backward(torch.randn_like(q), None, q, k, v, out, lse, aux)
    assert tl_calls == [] and [n for n, _ in launches] == ["gluon_bwd_dq", "gluon_bwd_dkdv"]
    a1, a2 = (b.arguments for _, b in launches)
    for a in (a1, a2):
        assert a["GQA"] == 3 and a["K"] is k and a["V"] is v and a["H"] == H
        assert a["stride_b"] == N * H * D and a["stride_kb"] == N * Hkv * D
    assert a2["DK"] is dk and a2["DV"] is dv and dk.shape == dv.shape == k.shape
    assert a1["OVERLAP"] is a2["OVERLAP"] is True and a1["BAR"] is a2["BAR"]   # [Note: overlap]
    table = kv_tile_table(low.plan, gluon_hopper.BWD_BLOCK, gluon_hopper.BWD_STEP, 3)
    assert sorted(set(table[:, 0].tolist())) == [0, 3]   # the first query head of each kv head
    heads = kv_tile_heads(low.plan, table, 3)
    assert heads.tolist() == [3] * table.shape[0]
    assert torch.equal(a2["TABLE"].cpu(), persistent_order(table, 5, gluon_hopper.BWD_STEP, heads))
    assert a2["ZFILL"] is True   # the kv heads' tiles cover every row of dK and dV
    text = low.source()
    assert "gluon_bwd_dq and gluon_bwd_dkdv run instead of dilated_bwd_dq and dilated_bwd_dkdv" in text
    assert "gluon_bwd_dkdv starts on the SMs that gluon_bwd_dq's last wave leaves idle" in text

    # three kv heads of 6 query heads: kv head 1 (query heads 2, 3) spans both branches, so dK and dV of its rows add
    # over tiles of two branches: dk/dv runs a phase per branch (SPLIT), adding into float32, then cast
    monkeypatch.setattr(gluon_hopper, "SPLIT_BACKWARD", True)
    low = triton_lowering.TritonLowering(build_plan(spec, N, H, D, kv_heads=3), torch.device("cpu"), torch.bfloat16)
    tl_calls = []
    launches = _record_gluon_launches(low, monkeypatch, tl_calls)
    k, v = (torch.randn(B, N, 3, D, dtype=torch.bfloat16) for _ in range(2))
    out, lse, aux = low.forward(q, k, v)
    launches.clear()
    dq, dk, dv = low.backward(torch.randn_like(q), None, q, k, v, out, lse, aux)
    assert tl_calls == [] and [n for n, _ in launches] == ["gluon_bwd_dq", "gluon_bwd_dkdv"]
    a1, a2 = (b.arguments for _, b in launches)
    assert a1["GQA"] == a2["GQA"] == 2 and a1["PHASED"] is False and a1["DQ"] is dq
    assert a2["PHASED"] is True and a2["ACC"] == 1 and a2["SPLIT"] is True and a2["NPH"] == 2
    assert "OVERLAP" not in a1 and "OVERLAP" not in a2   # a phased dk/dv launch overlaps nothing
    assert a2["HEAD_END"].tolist() == [3, 6, 0, 0] and a2["ZFILL"] is False
    assert a2["DK"].dtype == torch.float32 and a2["DK"].shape == k.shape and dk.dtype == torch.bfloat16
    # the phases: branch 0's tiles (kv heads 0 and 1: first query heads 0 and 2), then branch 1's (kv heads 1, 2:
    # first query heads 3 and 4)
    table, bounds = a2["TABLE"].cpu(), a2["PHASES"].cpu().tolist()
    assert sorted(set(map(tuple, table[bounds[0]:bounds[1], :2].tolist()))) == [(0, 0), (2, 0)]
    assert sorted(set(map(tuple, table[bounds[1]:bounds[2], :2].tolist()))) == [(3, 1), (4, 1)]
    text = low.source()
    assert ("branch 0 has query heads 0..2, not whole groups of the 2 query heads that share a kv head, so "
            "gluon_bwd_dkdv runs a phase per branch adding into float32 dk and dv, then cast") in text
    assert "def gluon_fwd(" in text
    # with that form off, the tl backward runs such calls, and kernel_source() says so
    monkeypatch.setattr(gluon_hopper, "SPLIT_BACKWARD", False)
    low = triton_lowering.TritonLowering(build_plan(spec, N, H, D, kv_heads=3), torch.device("cpu"), torch.bfloat16)
    tl_calls = []
    launches = _record_gluon_launches(low, monkeypatch, tl_calls)
    monkeypatch.setattr(low, "_zfill", lambda *a, **kw: False)
    out, lse, aux = low.forward(q, k, v)
    low.backward(torch.randn_like(q), None, q, k, v, out, lse, aux)
    assert [n for n, _ in launches] == ["gluon_fwd"] and tl_calls == ["dq", "dkdv"]
    assert ("the backward runs dilated_bwd_dq and dilated_bwd_dkdv (branch 0 has query heads 0..2, not whole groups "
            "of the 2 query heads that share a kv head, and gluon_bwd_dkdv's phased form for that is off: "
            "gluon_hopper.SPLIT_BACKWARD)") in low.source()


def test_gluon_gqa_all_mode_wiring_without_gpu(monkeypatch):
    """"all" mode under grouped-query attention: the phased backward's dk/dv launch walks kv_tile_table (a kv
    head's query heads of one offset per tile), adds into float32 buffers of Hkv heads, and its last phase reads
    the kv heads' SEL."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2), Branch(1024, 4)), head_assignment="all")
    B, N, H, Hkv, D = 1, 4096, 8, 2, 64
    low = triton_lowering.TritonLowering(build_plan(spec, N, H, D, kv_heads=Hkv), torch.device("cpu"),
                                         torch.bfloat16)
    tl_calls = []
    launches = _record_gluon_launches(low, monkeypatch, tl_calls)
    monkeypatch.setattr(low, "_merge", lambda dest, aux: (torch.zeros(B, N, H, D, dtype=torch.bfloat16),
                                                          torch.zeros(B, H, N)))
    q = torch.randn(B, N, H, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, N, Hkv, D, dtype=torch.bfloat16) for _ in range(2))
    out, lse, aux = low.forward(q, k, v)
    launches.clear()
    dq, dk, dv = low.backward(torch.randn_like(q), None, q, k, v, out, lse, aux)
    assert tl_calls == [] and [n for n, _ in launches] == ["gluon_bwd_dq", "gluon_bwd_dkdv"]
    a1, a2 = (b.arguments for _, b in launches)
    order, acc, sel, sel_kv = low._all_mode_phases(q.device)
    assert acc == 3 and a2["ACC"] == 3 and a2["PHASED"] is True and a2["GQA"] == 4
    assert a1["SEL"] is sel and a2["SEL"] is sel_kv and sel_kv.shape == (Hkv, N)
    assert a2["DK"].dtype == torch.float32 and a2["DK"].shape == k.shape and a2["DKF"] is dk
    assert a2["stride_kb"] == N * Hkv * D
    # per branch (phase), the kv heads' tiles: a tile per kv head and offset (r of them where r <= GQA), each of
    # its N / r rows in 128-row tiles once
    table = a2["TABLE"].cpu()
    for branch, r in enumerate((1, 2, 4)):
        rows = table[table[:, 1] == branch]
        assert rows.shape[0] == Hkv * r * (N // r // 128)
        assert sorted(set(rows[:, 0].tolist())) == [h for h in range(H) if h % 4 < r]


def test_gluon_launch_wiring_without_gpu(monkeypatch):
    """The launchers' arguments bind to the generated Gluon kernels' parameters, with the right values, forward
    and backward (the kernels themselves run only on a Hopper GPU: tests marked gpu)."""
    pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")
    import inspect
    import math
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton import gluon_hopper, lowering as triton_lowering
    from dilated_compiler.lowering.triton.tables import persistent_order, tile_table
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2), Branch(1024, 4)))
    B, N, H, D = 2, 4096, 6, 128
    low = triton_lowering.TritonLowering(build_plan(spec, N, H, D), torch.device("cpu"), torch.bfloat16)
    launches = []

    class Recorder:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(low.gluon_kernels, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                options = {k: kwargs.pop(k) for k in ("launch_cooperative_grid", "launch_pdl") if k in kwargs}
                bound = inspect.signature(self.kernel.fn).bind(*args, **kwargs)
                bound.arguments["launch options"] = options
                launches.append((self.name, grid, bound))
            return launch
    for name in ("gluon_fwd", "gluon_bwd_dq", "gluon_bwd_dkdv"):
        monkeypatch.setattr(low.gluon_kernels, name, Recorder(name))
    monkeypatch.setattr(triton_lowering.TritonLowering, "gluon_unsupported", lambda self, q, k, v, has_kpm, *m: None)
    monkeypatch.setattr(triton_lowering, "_sm_count", lambda device: 5)
    monkeypatch.setattr(triton_lowering, "_ensure_allocator", lambda: None)
    monkeypatch.setattr(triton_lowering.TritonLowering, "_check_device", lambda self, t: None)  # CPU tensors here
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.bfloat16) for _ in range(3))
    out, lse, aux = low.forward(q, k, v)
    (name, grid, bound), = launches
    a = bound.arguments
    assert name == "gluon_fwd"
    table = persistent_order(tile_table(low.plan, "q", gluon_hopper.BLOCK_M, gluon_hopper.BLOCK_N), 5,
                             gluon_hopper.BLOCK_N)
    assert grid == (5, B) and a["T"] == table.shape[0] and torch.equal(a["TABLE"].cpu(), table)
    assert a["Q"] is q and a["K"] is k and a["V"] is v and a["OUT"] is out and a["LSE"] is lse
    assert a["RB"].tolist() == [1, 2, 4, 1] and (a["B"], a["N"], a["H"]) == (B, N, H)
    assert a["stride_b"] == a["stride_kb"] == N * H * D and (a["stride_lb"], a["stride_lh"]) == (H * N, N)
    assert a["GQA"] == 1
    assert math.isclose(a["qk_scale"], D ** -0.5 * math.log2(math.e), rel_tol=1e-6)
    assert a["HEAD_DIM"] == D and a["ZFILL"] is True and a["CONSUMER_REGS"] == gluon_hopper.CONSUMER_REGS
    assert a["CAUSAL"] is False and a["STAGES"] == gluon_hopper.FWD_STAGES[D]
    assert a["MERGE"] is False and (a["stride_og"], a["stride_lg"]) == (0, 0)
    assert torch.isinf(lse).all()  # nothing ran: the kernel would fill the selected rows

    # the backward: dq (and delta) first, then dk/dv reading that delta
    launches.clear()
    lse = torch.randn_like(lse)
    dout, dlse = torch.randn_like(q), torch.randn_like(lse)
    dq, dk, dv = low.backward(dout, dlse, q, k, v, out, lse, aux)
    (n1, grid1, b1), (n2, grid2, b2) = launches
    a1, a2 = b1.arguments, b2.arguments
    assert (n1, n2) == ("gluon_bwd_dq", "gluon_bwd_dkdv") and grid1 == grid2 == (5, B)
    q_table, k_table = (persistent_order(tile_table(low.plan, kind, gluon_hopper.BWD_BLOCK, gluon_hopper.BWD_STEP),
                                         5, gluon_hopper.BWD_STEP) for kind in ("q", "k"))
    assert a1["T"] == q_table.shape[0] and torch.equal(a1["TABLE"].cpu(), q_table)
    assert a2["T"] == k_table.shape[0] and torch.equal(a2["TABLE"].cpu(), k_table)
    assert a1["Q"] is q and a1["K"] is k and a1["V"] is v and a1["DO"] is dout and a1["OUT"] is out
    assert a1["DQ"] is dq and a1["DLSE"] is dlse and a1["HAS_DLSE"] is True
    assert a2["Q"] is q and a2["K"] is k and a2["V"] is v and a2["DO"] is dout and a2["DK"] is dk and a2["DV"] is dv
    # dk/dv reads lse and delta from one buffer: lse (a copy), then the delta that dq writes
    ld = a2["LD"]
    assert ld.shape == (2, B, H, N) and a2["stride_ld"] == B * H * N and torch.equal(ld[0], lse)
    assert a1["LSE"].data_ptr() == ld[0].data_ptr() and a1["DELTA"].data_ptr() == ld[1].data_ptr()
    for a, regs, stages in ((a1, gluon_hopper.DQ_CONSUMER_REGS, gluon_hopper.DQ_STAGES[D]),
                            (a2, gluon_hopper.DKDV_CONSUMER_REGS, gluon_hopper.DKDV_STAGES[D])):
        assert a["RB"].tolist() == [1, 2, 4, 1] and (a["B"], a["N"], a["H"]) == (B, N, H)
        assert a["stride_b"] == N * H * D and (a["stride_lb"], a["stride_lh"]) == (H * N, N)
        assert math.isclose(a["qk_scale"], D ** -0.5 * math.log2(math.e), rel_tol=1e-6)
        assert math.isclose(a["sm_scale"], D ** -0.5, rel_tol=1e-6)
        assert a["HEAD_DIM"] == D and a["ZFILL"] is True and a["CONSUMER_REGS"] == regs and a["STAGES"] == stages
        assert a["CAUSAL"] is False and a["ACC"] == 0 and a["PHASED"] is False and a["NPH"] == 1
        assert a["OVERLAP"] is True
    assert (a1["BLOCK_M"], a1["BLOCK_N"]) == (a2["BLOCK_N"], a2["BLOCK_M"]) == (128, 64)
    # [Note: overlap]: dk/dv is launched to overlap dq's last wave, waiting on a zeroed counter for the arrivals of
    # dq's 2 consumers per program (5 programs per batch index here)
    assert a1["launch options"] == {} and a2["launch options"] == {"launch_pdl": True}
    assert a1["BAR"] is a2["BAR"] and a1["BAR"].dtype == torch.int32 and a1["BAR"].tolist() == [0]
    assert a2["DQ_ARRIVALS"] == 2 * 5 * B
    # with the overlap off, the two launches run one after the other
    monkeypatch.setattr(gluon_hopper, "BWD_OVERLAP", False)
    launches.clear()
    low.backward(dout, dlse, q, k, v, out, lse, aux)
    (_, _, b1), (_, _, b2) = launches
    assert "OVERLAP" not in b1.arguments and "OVERLAP" not in b2.arguments
    assert b2.arguments["launch options"] == {}
    monkeypatch.setattr(gluon_hopper, "BWD_OVERLAP", True)
    launches.clear()
    low.backward(dout, None, q, k, v, out, lse, aux)
    assert launches[0][2].arguments["HAS_DLSE"] is False
    # a causal spec runs the same kernels in their CAUSAL form
    low = triton_lowering.TritonLowering(build_plan(AttentionSpec(spec.branches, causal=True), N, H, D),
                                         torch.device("cpu"), torch.bfloat16)
    for name in ("gluon_fwd", "gluon_bwd_dq", "gluon_bwd_dkdv"):
        monkeypatch.setattr(low.gluon_kernels, name, Recorder(name))
    launches.clear()
    out, lse, aux = low.forward(q, k, v)
    low.backward(dout, None, q, k, v, out, lse, aux)
    assert [n for n, _, _ in launches] == ["gluon_fwd", "gluon_bwd_dq", "gluon_bwd_dkdv"]
    assert all(b.arguments["CAUSAL"] is True for _, _, b in launches)
    # "all" mode: the forward writes each branch's out and lse (MERGE), which dilated_merge combines
    G = len(spec.branches)
    low = triton_lowering.TritonLowering(build_plan(AttentionSpec(spec.branches, head_assignment="all"), N, H, D),
                                         torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(low.gluon_kernels, "gluon_fwd", Recorder("gluon_fwd"))
    merged = []
    monkeypatch.setattr(low, "_merge", lambda dest, aux: merged.append((dest, aux)) or (q.clone(), lse.clone()))
    launches.clear()
    out, lse_all, aux = low.forward(q, k, v)
    (name, grid, bound), = launches
    (dest, aux_m), = merged
    a = bound.arguments
    assert name == "gluon_fwd" and a["MERGE"] is True and a["ZFILL"] is False and a["CAUSAL"] is False
    table = persistent_order(tile_table(low.plan, "q", gluon_hopper.BLOCK_M, gluon_hopper.BLOCK_N), 5,
                             gluon_hopper.BLOCK_N)
    # every head in every branch: its N / r selected rows in 128-row tiles
    assert table.shape[0] == H * sum(N // b.dilation // gluon_hopper.BLOCK_M for b in spec.branches)
    assert grid == (5, B) and a["T"] == table.shape[0] and torch.equal(a["TABLE"].cpu(), table)
    assert a["OUT"] is dest and dest.shape == (G, B, N, H, D) and a["stride_og"] == B * N * H * D
    assert a["LSE"] is aux_m is aux and aux.shape == (G, B, H, N) and a["stride_lg"] == B * H * N
    assert (a["stride_b"], a["stride_lb"], a["stride_lh"]) == (N * H * D, H * N, N)
    assert torch.isinf(aux).all()  # nothing ran: the kernel fills each branch's selected rows
    # "all" mode's backward (ALL_MODE_BACKWARD, the default): one dq and one dk/dv launch, each over every branch's
    # tiles in phases (PHASED), into float32 buffers; cooperative (the phases' waits need every program resident),
    # the batch folded into the walk. ALL_MODE_FINAL_PHASE (the default): branch 1 (r = 2, whose rows include
    # branch 2's) first, storing; branch 2 adding; the dilation-1 branch 0 last, writing the bf16 gradients (ACC 3)
    # and reading the float32 buffers only at the rows SEL marks: those of branches 1 and 2 (n % 2 == h % 2)
    assert gluon_hopper.ALL_MODE_BACKWARD is True and gluon_hopper.ALL_MODE_FINAL_PHASE is True
    for name in ("gluon_bwd_dq", "gluon_bwd_dkdv"):
        monkeypatch.setattr(low.gluon_kernels, name, Recorder(name))
    launches.clear()
    dq, dk, dv = low.backward(dout, dlse, q, k, v, out, lse_all, aux)
    assert [n for n, _, _ in launches] == ["gluon_bwd_dq", "gluon_bwd_dkdv"]
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
    full = {kind: tile_table(low.plan, kind, gluon_hopper.BWD_BLOCK, gluon_hopper.BWD_STEP) for kind in "qk"}
    order = [1, 2, 0]
    sel = (torch.arange(N)[None, :] % 2 == torch.arange(H)[:, None] % 2).to(torch.uint8)
    for name, grid, bound in launches:
        a = bound.arguments
        kind_table = full["q" if name == "gluon_bwd_dq" else "k"]
        parts = [kind_table[kind_table[:, 1] == branch] for branch in order]
        assert grid == (5, 1) and a["launch options"] == {"launch_cooperative_grid": True}
        table = torch.cat([persistent_order(part, 5, gluon_hopper.BWD_STEP) for part in parts])
        assert torch.equal(a["TABLE"].cpu(), table) and a["T"] == table.shape[0] and a["B"] == B
        assert a["PHASES"].tolist() == [0, *torch.tensor([p.shape[0] for p in parts]).cumsum(0).tolist()]
        assert a["NPH"] == G and a["BAR"].tolist() == [0] * G and a["PHASED"] is True
        assert a["ACC"] == 3 and a["ZFILL"] is False and a["CAUSAL"] is False
        assert a["SEL"].dtype == torch.uint8 and torch.equal(a["SEL"].cpu(), sel)
        buffers = (a["DQ"],) if name == "gluon_bwd_dq" else (a["DK"], a["DV"])
        finals = (a["DQF"],) if name == "gluon_bwd_dq" else (a["DKF"], a["DVF"])
        assert finals == ((dq,) if name == "gluon_bwd_dq" else (dk, dv))  # returned as they are: no casts
        for t in buffers:
            assert t.dtype == torch.float32 and t.shape == (B, N, H, D)
    # without the final phase: the dilation-1 branch first, storing (ACC 2), the float32 buffers cast afterwards
    monkeypatch.setattr(gluon_hopper, "ALL_MODE_FINAL_PHASE", False)
    low._tables.clear()
    launches.clear()
    low.backward(dout, dlse, q, k, v, out, lse_all, aux)
    for name, grid, bound in launches:
        assert bound.arguments["ACC"] == 2 and "DQF" not in bound.arguments and "SEL" not in bound.arguments
    monkeypatch.setattr(gluon_hopper, "ALL_MODE_FINAL_PHASE", True)


@pytest.mark.parametrize("dils,n,phases", [
    # a dilation-1 branch last (ACC 3: a branch whose rows include the other earlier branches' stores first)
    ((2, 1, 4), 4096, ([(0, True), (2, False), (1, False)], 3)),
    ((1, 1, 2), 4096, ([(1, True), (2, False), (0, False)], 3)),
    ((4, 8, 1, 2), 4096, ([(3, True), (0, False), (1, False), (2, False)], 3)),
    # r = 2 and r = 3 select rows neither of which includes the other's: all add into zeros (ACC 4)
    ((2, 3, 1), 4608, ([(0, False), (1, False), (2, False)], 4)),
    # no dilation-1 branch: all add into zeros, casts afterwards (ACC 1); one branch of dilation 1 stores (ACC 2)
    ((2, 4), 4096, ([(0, False), (1, False)], 1)),
    ((1,), 4096, ([(0, True)], 2)),
])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_all_mode_backward_phases(dils, n, phases, kv_heads):
    """"all" mode's backward phases (order, ACC) and SEL, the rows the final phase reads, from the tables: per query
    head for dq, per kv head for dk and dv (those of any of its query heads, 4 // kv_heads of them)."""
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    branches = tuple(Branch(256 * r if r != 3 else 1152, r) for r in dils)
    plan = build_plan(AttentionSpec(branches, head_assignment="all"), n, 4, 64, kv_heads=kv_heads)
    low = triton_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16)
    order, acc, sel, sel_kv = low._all_mode_phases(torch.device("cpu"))
    assert (order, acc) == phases
    if acc < 3:
        assert sel is None and sel_kv is None
        return
    # SEL: the rows any phase before the last selects, per head (head h has offset h % r in "all" mode)
    rows = torch.zeros(4, n, dtype=torch.bool)
    rows_kv = torch.zeros(kv_heads, n, dtype=torch.bool)
    pos = torch.arange(n)
    for branch, _ in order[:-1]:
        r = dils[branch]
        for h in range(4):
            rows[h] |= pos % r == h % r
            rows_kv[h // (4 // kv_heads)] |= pos % r == h % r
    assert sel.dtype == torch.uint8 and torch.equal(sel.bool(), rows)
    assert sel_kv.dtype == torch.uint8 and torch.equal(sel_kv.bool(), rows_kv)


def test_unsupported_dtype_and_head_dim():
    attn = compile_attention(AttentionSpec((Branch(8, 1),)), backend="triton")
    with pytest.raises(BackendError, match=r"dtypes .*got torch.float64 \(float64 runs on CPU, with backend 'torch'\)"):
        attn.kernel_source(16, 2, 16, dtype=torch.float64)
    with pytest.raises(BackendError, match="head_dim"):
        attn.kernel_source(16, 2, 512)
    # the grids are (tiles, batch): CUDA takes at most 65535 in the second dimension
    with pytest.raises(BackendError, match="one grid row per batch element .*65535.*got batch 65536"):
        attn.kernel_source(16, 2, 16, batch=65536)
    assert "@triton.jit" in attn.kernel_source(16, 2, 16, batch=65535)


@st.composite
def grouped_tables(draw):
    branches = []
    for _ in range(draw(st.integers(1, 3))):
        w = draw(st.integers(1, 40))
        r = draw(st.integers(1, min(w, 6)))
        branches.append(Branch(w, r, draw(st.one_of(st.none(), st.integers(0, r - 1)))))
    spec = AttentionSpec(tuple(branches), causal=draw(st.booleans()))
    heads = draw(st.integers(len(branches), 5))
    seq = draw(st.integers(1, 90))
    kind = draw(st.sampled_from(["q", "k"]))
    return spec, heads, seq, kind, draw(st.sampled_from([1, 2, 4, 16])), draw(st.sampled_from([1, 4, 16]))


@given(grouped_tables())
@settings(max_examples=300, deadline=None)
def test_zero_fill_spans(case):
    """The tiles' spans [zlo, zhi) never overlap within a head, and spans_cover says True exactly when every head's
    branch selects at least one row in every one of its segments (then the spans are all of 0..N-1)."""
    from dilated_compiler.lowering.triton.tables import spans_cover, tile_table
    from dilated_compiler.planner import build_plan
    spec, heads, seq, kind, block, partner = case
    plan = build_plan(spec, seq, heads, 8)
    table = tile_table(plan, kind, block, partner)
    covered = {h: torch.zeros(seq, dtype=torch.int64) for h in range(heads)}
    for row in table.tolist():
        h, zlo, zhi = row[0], row[9], row[10]
        assert 0 <= zlo <= zhi <= seq
        covered[h][zlo:zhi] += 1
        # a span holds this tile's selected rows and no other tile's
        pos0, L, r, row0 = row[2], row[3], spec.branches[row[1]].dilation, row[4]
        own = [pos0 + j * r for j in range(row0, min(row0 + block, L))]
        assert all(zlo <= p < zhi for p in own)
    assert all(int(c.max()) <= 1 for c in covered.values() if seq)
    # the definition: head h's branch (grouped split, default offset i % r) selects a row in every segment
    G = spec.num_branches
    expected = True
    for h in range(heads):
        base, rem = divmod(heads, G)
        i = next(i for i in range(G) if i * base + min(i, rem) <= h < (i + 1) * base + min(i + 1, rem))
        b = spec.branches[i]
        offset = b.offset if b.offset is not None else i % b.dilation
        expected &= all(offset < min(b.segment_length, seq - s) for s in range(0, seq, b.segment_length))
    assert spans_cover(plan, table) == expected
    if expected:
        assert all(bool((c == 1).all()) for c in covered.values())


@given(grouped_tables())
@settings(max_examples=300, deadline=None)
def test_tile_table_phases(case):
    """The phases a program walks: every partner row a tile's rows may attend lies in [lo, hi), and the unmasked
    phase [mid, full_end) holds only rows below L whose every pair with the tile's rows is allowed (the kernels
    apply no mask there). The interpreter tests reach these bounds only where a segment has several tiles."""
    from dilated_compiler.lowering.triton.tables import tile_table
    from dilated_compiler.planner import build_plan
    spec, heads, seq, kind, block, partner = case
    for head, _, _, L, row0, lo, mid, full_end, hi, *_ in tile_table(build_plan(spec, seq, heads, 8), kind, block,
                                                                      partner).tolist():
        own = range(row0, min(row0 + block, L))
        assert 0 <= lo <= mid <= full_end <= hi <= L
        for p in range(mid, full_end):
            for o in own:
                q_row, k_row = (o, p) if kind == "q" else (p, o)
                assert not spec.causal or k_row <= q_row, (kind, row0, p)
        for o in own:
            allowed = [p for p in range(L) if not spec.causal or (p <= o if kind == "q" else p >= o)]
            assert all(lo <= p < hi for p in allowed), (kind, row0, o)


@given(grouped_tables())
@settings(max_examples=200, deadline=None)
def test_tile_table_order(case):
    """tile_table: the tiles of one (segment, head) are adjacent and heaviest first; the groups come heaviest first
    (their partners stay in L2 while a group runs; light tiles last)."""
    from dilated_compiler.lowering.triton.tables import tile_table
    from dilated_compiler.planner import build_plan
    spec, heads, seq, kind, block, partner = case
    rows = tile_table(build_plan(spec, seq, heads, 8), kind, block, partner).tolist()
    groups = []  # (group key, [tile works]) in table order
    for r in rows:
        key = (r[1], r[2], r[0])
        if not groups or groups[-1][0] != key:
            assert all(g[0] != key for g in groups), f"the tiles of {key} are not adjacent"
            groups.append((key, []))
        groups[-1][1].append(r[8] - r[5])
    for _, works in groups:
        assert works == sorted(works, reverse=True)
    totals = [sum(w) for _, w in groups]
    assert totals == sorted(totals, reverse=True)


@given(grouped_tables(), st.sampled_from(["grouped", "all"]), st.integers(1, 12), st.booleans(), st.integers(0, 99))
@settings(max_examples=200, deadline=None)
def test_persistent_order(case, assignment, programs, weighted, seed):
    """persistent_order: the same rows; each band of G rows is the next G tiles in the plan's order (branch,
    segment, head, tile); and the programs' work stays level (at most one tile's work apart before the last band,
    two after it). A last band of k < G tiles has rows for programs 0..k-1 only: they are the least loaded.
    ``weighted``: rows walking 1 to 3 query heads each (a kv_tile_table's), their walks counted that often."""
    import dataclasses
    from dilated_compiler.lowering.triton.tables import persistent_order, tile_table
    from dilated_compiler.planner import build_plan
    spec, heads, seq, kind, block, partner = case
    if assignment == "all":  # offsets are per head there
        spec = dataclasses.replace(spec, head_assignment="all",
                                   branches=tuple(dataclasses.replace(b, offset=None) for b in spec.branches))
    table = tile_table(build_plan(spec, seq, heads, 8), kind, block, partner)
    walks = None
    if weighted:
        walks = torch.randint(1, 4, (table.shape[0],), generator=torch.Generator().manual_seed(seed))
    ordered = persistent_order(table, programs, partner, walks)
    rows = ordered.tolist()
    assert sorted(rows) == sorted(table.tolist())
    plan_order = sorted(table.tolist(), key=lambda r: (r[1], r[2], r[0], r[4]))
    for start in range(0, len(rows), programs):
        assert sorted(rows[start:start + programs]) == sorted(plan_order[start:start + programs])
    walked = dict(zip(map(tuple, table.tolist()), walks.tolist() if weighted else [1] * table.shape[0]))
    work = [(r[8] - r[5]) * walked[tuple(r)] + partner for r in rows]
    heaviest = max(work, default=0)
    load = [0] * programs
    for start in range(0, len(rows), programs):
        band = work[start:start + programs]
        if len(band) < programs:
            assert max(load[:len(band)]) <= min(load[len(band):])
        for p, w in enumerate(band):
            load[p] += w
        if len(band) == programs:
            assert max(load) - min(load) <= heaviest
    assert max(load) - min(load) <= 2 * heaviest
    with pytest.raises(ValueError, match="programs"):
        persistent_order(table, 0, partner)


def test_zero_fill_spans_not_in_all_mode():
    from dilated_compiler.lowering.triton.tables import spans_cover, tile_table
    from dilated_compiler.planner import build_plan
    plan = build_plan(AttentionSpec((Branch(8, 1), Branch(16, 2)), head_assignment="all"), 64, 4, 16)
    assert not spans_cover(plan, tile_table(plan, "q", 16, 16))


@given(grouped_tables(), st.sampled_from(["grouped", "all"]), st.integers(1, 4), st.integers(1, 3))
@settings(max_examples=300, deadline=None)
# found by CI: at N = 1 neither branch selects a row, so the kv head's two query heads in two branches split nothing
@example((AttentionSpec((Branch(2, 2, 1), Branch(2, 2))), 2, 1, "q", 1, 1), "grouped", 1, 2)
def test_kv_tile_table(case, assignment, kv_heads, gqa):
    """kv_tile_table (the Gluon dk/dv kernel's table under grouped-query attention): each row, with the query heads
    the kernel walks for it (gluon_hopper._query_heads: h0, h0 + s, ... below the end of h0's group of gqa, s = 1
    in grouped mode, r in "all" mode; in grouped mode also below the end of the branch's heads where a group spans
    branches, SPLIT), stands for exactly the key tiles of the kind "k" table that write its kv head's rows: every
    (query head, tile) once. All those heads map to the row's kv head and share its rows. whole_groups_reason says
    whether a group spans branches; where none does, the zero-fill spans cover each kv head's rows as the query
    heads' do."""
    import dataclasses
    from dilated_compiler.lowering.triton.tables import (branch_heads, kv_tile_heads, kv_tile_table, spans_cover,
                                                         tile_table, whole_groups_reason)
    from dilated_compiler.planner import build_plan
    from dilated_compiler.reference import allowed_pairs, head_branches
    spec, _, seq, _, block, partner = case
    if assignment == "all":
        spec = dataclasses.replace(spec, head_assignment="all",
                                   branches=tuple(dataclasses.replace(b, offset=None) for b in spec.branches))
    heads = kv_heads * gqa
    if assignment == "grouped" and heads < spec.num_branches:
        return
    plan = build_plan(spec, seq, heads, 8, kv_heads=kv_heads)
    G = spec.num_branches
    counts = [heads // G + (i < heads % G) for i in range(G)]
    starts = [sum(counts[:i]) for i in range(G)]
    # a branch that selects no row at this length (the reference's pairs) has no op, so its heads split no group
    whole = assignment == "all" or all(c % gqa == 0 and s % gqa == 0 for s, c in zip(starts, counts)
                                       if allowed_pairs(seq, *head_branches(spec, heads)[s][0], False).any())
    reason = whole_groups_reason(plan, gqa)
    assert (reason is None) == (whole or gqa == 1)
    if reason is not None:
        assert "not whole groups" in reason
    if assignment == "grouped":   # a branch selecting no row at this length has no op, and (0, 0)
        planned = {int(a.branch) for a in plan.attend_ops if int(a.head_count) > 0}
        assert branch_heads(plan) == [(s, s + c) if i in planned else (0, 0)
                                      for i, (s, c) in enumerate(zip(starts, counts))]
    k_table = tile_table(plan, "k", block, partner)
    kv = kv_tile_table(plan, block, partner, gqa)
    expanded, counts_walked = [], []
    for row in kv.tolist():
        h0, branch = row[0], row[1]
        r = spec.branches[branch].dilation
        if assignment == "all":
            hs = list(range(h0, (h0 // gqa + 1) * gqa, r))
            assert len(hs) == -(-(gqa - h0 % gqa) // r) >= 1   # the kernel's count
            assert len({h % r for h in hs}) == 1   # one offset: the same selected rows
        else:
            hs = list(range(h0, min((h0 // gqa + 1) * gqa, starts[branch] + counts[branch])))
            assert hs and (h0 % gqa == 0 or h0 == starts[branch])
        expanded += [[h] + row[1:] for h in hs]
        counts_walked.append(len(hs))
    assert sorted(expanded) == sorted(k_table.tolist())
    assert kv_tile_heads(plan, kv, gqa).tolist() == counts_walked   # persistent_order's weights
    if assignment == "grouped" and whole:
        assert spans_cover(plan, kv, gqa) == spans_cover(plan, k_table)


def _lowering(spec, dtype=torch.float16, n=64, h=4, d=32):
    from dilated_compiler.lowering.triton.lowering import TritonLowering
    from dilated_compiler.planner import build_plan
    return TritonLowering(build_plan(spec, n, h, d), torch.device("cpu"), dtype)


def _load_in_child(cache_dir, queue):
    # a failure goes back as its traceback, so the parent's assertion shows it (not a bare queue timeout)
    try:
        os.environ["DILATED_COMPILER_CACHE_DIR"] = cache_dir
        low = _lowering(AttentionSpec((Branch(16, 1), Branch(32, 2))))
        queue.put(hasattr(low.kernels, "dilated_fwd"))
    except BaseException:
        queue.put(traceback.format_exc())
        raise


def test_disk_cache_atomic_checked_and_keyed(tmp_path, monkeypatch):
    from dilated_compiler.lowering.triton import diskcache
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    spec = AttentionSpec((Branch(16, 1), Branch(32, 2)))
    low = _lowering(spec)
    # the key covers the specialisation (dtype here) and the spec
    assert low.cache_key != _lowering(spec, dtype=torch.bfloat16).cache_key
    assert low.cache_key != _lowering(AttentionSpec((Branch(16, 1), Branch(32, 4)))).cache_key
    assert low.cache_key == _lowering(spec).cache_key
    # ... and the generator's own source and the torch and triton versions: each changes the key
    import triton

    from dilated_compiler.lowering.triton import lowering as tl_lowering
    for what, value in ((tl_lowering, "generator_fingerprint"), (torch, "__version__"), (triton, "__version__")):
        with monkeypatch.context() as m:
            m.setattr(what, value, (lambda: "another") if callable(getattr(what, value)) else "0.0.0-another")
            assert _lowering(spec).cache_key != low.cache_key, value
    # several processes compiling the same plan at once
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = []
    try:
        for p in procs:
            p.join(timeout=300)
        while len(results) < len(procs):
            results.append(queue.get(timeout=10))
    except queue_module.Empty:
        pass   # a child that died or hung put nothing: its exit code (None: still running) tells
    finally:
        codes = [p.exitcode for p in procs]
        for p in procs:
            p.kill()
    assert results == [True] * 3 and codes == [0] * 3, f"exit codes {codes}; results:\n" + "\n".join(map(str, results))
    path = diskcache.module_path(low.cache_key)
    assert diskcache.read_verified(path) is not None
    assert not list(path.parent.glob("*.tmp"))
    # a truncated file fails its checksum and is regenerated, not imported
    path.write_text(path.read_text()[:500])
    assert diskcache.read_verified(path) is None
    diskcache._modules.pop(low.cache_key, None)
    assert hasattr(low.kernels, "dilated_bwd_dkdv")
    assert diskcache.read_verified(path) is not None
    # a corrupted (edited) body too
    text = path.read_text()
    path.write_text(text.replace("def dilated_fwd(", "def broken_fwd(", 1))
    assert diskcache.read_verified(path) is None
    diskcache._modules.pop(low.cache_key, None)
    low._module = None
    assert hasattr(low.kernels, "dilated_fwd")
    # the module runs from the checked text: no bytecode (which no checksum covers) is written beside it
    assert not (path.parent / "__pycache__").exists()


def test_disk_cache_that_cannot_be_written_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(blocker))
    with pytest.raises(OSError, match=r"cannot be written.*Set DILATED_COMPILER_CACHE_DIR to a writable folder"):
        _lowering(AttentionSpec((Branch(16, 1), Branch(32, 8)), name="unwritable-cache")).kernels


def test_autotune_choose_caches_per_device_and_key(tmp_path, monkeypatch):
    """The fastest candidate that fits; remembered per device and key, in memory and in a checksummed file; a
    candidate out of resources is skipped, any other error propagates; none fitting is an error naming why."""
    import json
    from triton.runtime.errors import OutOfResources
    from dilated_compiler.lowering.triton import autotune, diskcache
    from dilated_compiler.lowering.triton.autotune import TileConfig
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DILATED_COMPILER_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_memory", {})
    a, b, c = TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3), TileConfig(64, 32, 4, 2, False)
    times, timed = {a: 2.0, c: 1.5}, []

    def time_one(cfg):
        timed.append(cfg)
        if cfg not in times:
            raise OutOfResources(300000, 232448, "shared memory")
        return times[cfg]

    def untimed(cfg):
        raise AssertionError(f"{cfg} timed again")

    assert autotune.choose("GPU X", "fwd|k1", [a, b, c], time_one) == c and timed == [a, b, c]
    assert autotune.choose("GPU X", "fwd|k1", [a, b, c], untimed) == c
    path = tmp_path / "triton" / "autotune-GPU_X.json"
    assert json.loads(diskcache.read_verified(path)) == {"fwd|k1": list(c)}
    monkeypatch.setattr(autotune, "_memory", {})  # a new process: read from the file
    assert autotune.choose("GPU X", "fwd|k1", [a, b, c], untimed) == c
    # another device, another key: timed afresh
    timed.clear()
    assert autotune.choose("GPU Y", "fwd|k1", [a, c], time_one) == c and timed == [a, c]
    timed.clear()
    assert autotune.choose("GPU X", "dq|k1", [c, a], time_one) == c and timed == [c, a]
    assert set(json.loads(diskcache.read_verified(path))) == {"fwd|k1", "dq|k1"}
    # a choice another process wrote since this one read the file is kept when this one writes
    other = {**json.loads(diskcache.read_verified(path)), "fwd|other-process": list(b)}
    diskcache.write_atomic(path, diskcache.with_checksum(json.dumps(other)))
    timed.clear()
    assert autotune.choose("GPU X", "dq|k2", [c, a], time_one) == c and timed == [c, a]
    assert set(json.loads(diskcache.read_verified(path))) == {"fwd|k1", "dq|k1", "fwd|other-process", "dq|k2"}
    # a remembered choice that is no longer a candidate: timed again
    timed.clear()
    assert autotune.choose("GPU X", "fwd|k1", [a, b], time_one) == a and timed == [a, b]
    # a file without its checksum line (truncated) is not trusted: its choice, a, is a candidate but not taken
    assert json.loads(diskcache.read_verified(path))["fwd|k1"] == list(a)
    path.write_text(path.read_text().rstrip("\n").rpartition("\n")[0] + "\n")
    monkeypatch.setattr(autotune, "_memory", {})
    timed.clear()
    assert autotune.choose("GPU X", "fwd|k1", [a, b, c], time_one) == c and timed == [a, b, c]
    # errors other than running out of resources are not swallowed
    with pytest.raises(ZeroDivisionError):
        autotune.choose("GPU X", "dkdv|k2", [a, c], lambda cfg: 1 / 0)
    with pytest.raises(RuntimeError, match=r"no tile configuration fits GPU X for dkdv\|k3: .*shared memory"):
        autotune.choose("GPU X", "dkdv|k3", [b, TileConfig(256, 64, 8, 3)], time_one)
    # DILATED_COMPILER_AUTOTUNE=0, or a single candidate: the first, untimed
    assert autotune.choose("GPU X", "fwd|k9", [b], untimed) == b
    monkeypatch.setenv("DILATED_COMPILER_AUTOTUNE", "0")
    assert autotune.choose("GPU X", "fwd|k1", [a, b, c], untimed) == a


def test_autotune_key_has_every_fact_that_picks_a_config():
    """A config tuned for one kind of call is not reused for another: the key differs in the pass, a key padding
    mask, the spec, head_dim, dtype, grouped-query attention and the shape bucket."""
    from dilated_compiler.lowering.triton.lowering import TritonLowering
    from dilated_compiler.planner import build_plan

    def key(spec=AttentionSpec((Branch(16, 1),)), N=64, H=2, D=16, kv=None, dtype=torch.float16, pass_name="fwd",
            batch=1, kpm=False):
        low = TritonLowering(build_plan(spec, N, H, D, kv_heads=kv), torch.device("cpu"), dtype)
        return low._tune_key(pass_name, batch, kpm)

    base = key()
    others = [key(pass_name="dq"), key(kpm=True), key(spec=AttentionSpec((Branch(16, 2),))), key(D=32),
              key(dtype=torch.bfloat16), key(kv=1), key(N=1 << 20)]
    assert base == key() and len({base, *others}) == 1 + len(others)


def test_autotune_shape_buckets():
    from dilated_compiler.lowering.triton.autotune import shape_bucket
    assert shape_bucket(65536, 16) == "N65536_BH16"
    assert shape_bucket(40000, 12) == shape_bucket(65536, 16) == "N65536_BH16"
    assert shape_bucket(65537, 16) == "N131072_BH16"
    assert shape_bucket(1, 1) == "N1_BH1"


@pytest.mark.skipif(INTERPRETING, reason="the interpreter has one tile config")
def test_autotune_candidates_by_dtype_and_head_dim():
    # 16-bit dtypes share the lists by head_dim bucket; float32 (exact products on the FMA units, operands in
    # registers) has its own: small tiles over 8 warps, pointer loads first. Every candidate's shared memory is
    # checked for sm_90 by tests/test_gluon_compile.py::test_tl_tile_candidates_fit_in_shared_memory.
    from dilated_compiler.lowering.triton.autotune import candidates
    for p in ("fwd", "dq", "dkdv"):
        for low, high in ((16, 64), (65, 128), (129, 256)):
            assert candidates(p, low, 2) == candidates(p, high, 2)
            assert candidates(p, low, 4) == candidates(p, high, 4)
        assert candidates(p, 64, 2) != candidates(p, 128, 2) != candidates(p, 256, 2)
        for d in (64, 128, 256):
            fp32 = candidates(p, d, 4)
            assert fp32 and fp32 != candidates(p, d, 2)
            assert all(c.num_warps == 8 and c.block * c.partner <= 64 * 32 for c in fp32)
            assert not fp32[0].tma
            # float32 on the TF32 tensor cores: a list of its own (products on the tensor cores, wider tiles)
            tf32 = candidates(p, d, 4, "tf32")
            assert tf32 and tf32 != fp32 and tf32 != candidates(p, d, 2)
            assert candidates(p, d, 4, "ieee") == fp32


@pytest.fixture
def matmul_precision():
    """Sets torch's precision for float32 matmuls on CUDA (``torch.backends.cuda.matmul.fp32_precision``) for a
    test, then restores it."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision

    def set_to(value):
        matmul.fp32_precision = value
    yield set_to
    matmul.fp32_precision = before


def test_float32_products_follow_torch_setting(matmul_precision):
    """float32's products are exact unless torch's setting for float32 matmuls allows TF32 (the rule torch.compile's
    kernels follow): then the generated kernels' products are TF32 (input_precision="tf32"), 16-bit inputs keep their
    native products, and the runtime caches one plan per setting, so a change of the setting is never served a plan
    compiled under the other."""
    from dilated_compiler.lowering.base import float32_products
    from dilated_compiler.lowering.triton.lowering import TritonLowering
    from dilated_compiler.planner import build_plan
    from dilated_compiler.runtime.cache import lowered, register_spec
    spec = AttentionSpec((Branch(16, 1), Branch(32, 2)))
    plan = build_plan(spec, 64, 2, 16)
    cpu = torch.device("cpu")
    matmul_precision("ieee")
    assert float32_products() == "ieee"
    exact = TritonLowering(plan, cpu, torch.float32)
    assert exact.dot_precision == "ieee" and 'input_precision="ieee"' in exact.source()
    key = register_spec(spec)
    first = lowered(key, "triton", (1, 64, 2, 16), 2, torch.float32, cpu)
    assert first.dot_precision == "ieee"
    matmul_precision("tf32")
    assert float32_products() == "tf32"
    fast = TritonLowering(plan, cpu, torch.float32)
    assert fast.dot_precision == "tf32" and 'input_precision="tf32"' in fast.source()
    assert "ieee" not in fast.source() and fast.cache_key != exact.cache_key
    half = TritonLowering(plan, cpu, torch.float16)
    assert half.dot_precision is None and "input_precision" not in half.source()
    second = lowered(key, "triton", (1, 64, 2, 16), 2, torch.float32, cpu)
    assert second is not first and second.dot_precision == "tf32"
    matmul_precision("ieee")
    assert lowered(key, "triton", (1, 64, 2, 16), 2, torch.float32, cpu) is first
    # torch's global setting reaches the matmuls' where they inherit it ("none")
    matmul_precision("none")
    before = torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        assert float32_products() == "tf32"
        torch.backends.fp32_precision = "ieee"
        assert float32_products() == "ieee"
    finally:
        torch.backends.fp32_precision = before
    with pytest.raises(BackendError, match="float32_dot must be one of"):
        TritonLowering(plan, cpu, torch.float32, float32_dot="tf32x3")


def test_plan_cache_files_a_plan_under_the_precision_it_compiled_with(matmul_precision, monkeypatch):
    """The cache reads torch's float32 setting for its lookup and the Triton lowering reads it again when it compiles.
    Should the setting change between the two reads (another thread), the plan is filed under the precision it was
    compiled with, so no later call under the other setting is served it."""
    import dilated_compiler.runtime.cache as cache
    spec = AttentionSpec((Branch(16, 1), Branch(32, 2)))
    key = cache.register_spec(spec)
    cpu, shape = torch.device("cpu"), (1, 64, 2, 16)
    cache.clear_cache()
    matmul_precision("tf32")
    monkeypatch.setattr(cache, "float32_products", lambda: "ieee")  # the lookup's read, before the change
    compiled = cache.lowered(key, "triton", shape, 2, torch.float32, cpu)
    assert compiled.dot_precision == "tf32"
    monkeypatch.undo()
    assert cache.lowered(key, "triton", shape, 2, torch.float32, cpu) is compiled   # filed under "tf32"
    matmul_precision("ieee")
    exact = cache.lowered(key, "triton", shape, 2, torch.float32, cpu)
    assert exact is not compiled and exact.dot_precision == "ieee"
    assert cache.cache_info().misses == 2


def test_zero_fill_spans_not_in_all_mode_even_where_they_sum_to_n():
    """spans_cover is False in "all" mode even where each head's spans add up to N (a single branch of dilation 1
    covers every row of every head): there each branch writes its own output, which the merge reads, so the test
    is by mode, not by the sums."""
    from dilated_compiler.lowering.triton.tables import spans_cover, tile_table
    from dilated_compiler.planner import build_plan
    plan = build_plan(AttentionSpec((Branch(16, 1),), head_assignment="all"), 64, 2, 16)
    table = tile_table(plan, "q", 16, 16)
    per_head = [sum(r[10] - r[9] for r in table.tolist() if r[0] == h) for h in range(2)]
    assert per_head == [64, 64]
    assert not spans_cover(plan, table)
    # the same spans in grouped mode cover
    grouped = build_plan(AttentionSpec((Branch(16, 1),)), 64, 2, 16)
    assert spans_cover(grouped, tile_table(grouped, "q", 16, 16))


def test_tile_table_refuses_positions_past_int32():
    """The table is int32: a sequence of 2^31 - 1 positions fits (its largest entry, the last span's end, is
    2^31 - 1); one of 2^31 does not (that end would wrap to -2^31) and is an error, not a wrapped table."""
    from dilated_compiler.lowering.triton.tables import tile_table
    from dilated_compiler.planner import build_plan
    spec = AttentionSpec((Branch(2 ** 30, 2 ** 30),))  # one selected row per segment: two tiles
    table = tile_table(build_plan(spec, 2 ** 31 - 1, 1, 16), "q", 16, 16)
    assert table.dtype == torch.int32 and int(table.max()) == 2 ** 31 - 1
    with pytest.raises(ValueError, match="past 2\\^31 do not fit the int32 tile table"):
        tile_table(build_plan(spec, 2 ** 31, 1, 16), "q", 16, 16)


def test_disk_cache_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails part way (here the flush to disk) leaves the file as it was, whole, and no temporary file
    behind: the new text goes to a temporary file that replaces the old one only once it is complete."""
    from dilated_compiler.lowering.triton import diskcache
    path = tmp_path / "triton" / "dc_x.py"
    old = diskcache.with_checksum("OLD = 1\n")
    diskcache.write_atomic(path, old)

    def fail(fd):
        raise OSError("disk full")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fail)
        with pytest.raises(OSError, match="disk full"):
            diskcache.write_atomic(path, diskcache.with_checksum("NEW = 2\n" * 1000))
    assert path.read_text() == old and diskcache.read_verified(path) == "OLD = 1\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["dc_x.py"]


def test_disk_cache_file_that_is_not_utf8_is_not_trusted(tmp_path, monkeypatch):
    """A cache file that is not UTF-8 (binary garbage) fails verification like any corrupt file: read_verified
    gives None, and an autotune file of such bytes means re-tuning, not an error."""
    import json
    from dilated_compiler.lowering.triton import autotune, diskcache
    from dilated_compiler.lowering.triton.autotune import TileConfig
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DILATED_COMPILER_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_memory", {})
    path = tmp_path / "triton" / "autotune-GPU_Z.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe\x00garbage\x80\n")
    assert diskcache.read_verified(path) is None
    a, b = TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)
    assert autotune.choose("GPU Z", "fwd|k", [a, b], {a: 2.0, b: 1.0}.__getitem__) == b
    assert json.loads(diskcache.read_verified(path)) == {"fwd|k": list(b)}  # rewritten, verified


def test_disk_cache_one_module_and_one_file_per_key(tmp_path, monkeypatch):
    """Each key has its own file, holding that plan's kernels, which is what the kernels' source is read from
    (@triton.jit reads it); a key's module is built once per process and shared by every lowering with that key
    (so its kernels compile once)."""
    import inspect
    from dilated_compiler.lowering.triton import diskcache
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(tmp_path))
    spec_a = AttentionSpec((Branch(24, 1), Branch(48, 2)), causal=True)  # keys no other test loads
    spec_b = AttentionSpec((Branch(24, 1), Branch(48, 4)), causal=True)
    low_a, low_b = _lowering(spec_a), _lowering(spec_b)
    mod_a, mod_b = low_a.kernels, low_b.kernels
    path_a, path_b = diskcache.module_path(low_a.cache_key), diskcache.module_path(low_b.cache_key)
    assert path_a != path_b and mod_a is not mod_b
    for low, mod, path in ((low_a, mod_a, path_a), (low_b, mod_b, path_b)):
        assert mod.__file__ == str(path)
        assert diskcache.read_verified(path) == diskcache.with_checksum(low._text).rpartition(
            diskcache.CHECKSUM_PREFIX)[0]
        assert inspect.getsource(mod.dilation_of.fn) in low._text
    assert "r = tl.where(branch == 1, 2, r)" in inspect.getsource(mod_a.dilation_of.fn)
    assert "r = tl.where(branch == 1, 4, r)" in inspect.getsource(mod_b.dilation_of.fn)
    # another lowering with the same key (another sequence length: the kernels take N at run time) shares the module
    again = _lowering(spec_a, n=48)
    assert again.cache_key == low_a.cache_key and again.kernels is mod_a
    assert sys.modules[f"dilated_compiler_generated.dc_{low_a.cache_key}"] is mod_a


def test_autotune_ties_and_an_unwritable_cache_folder(tmp_path, monkeypatch):
    """Candidates that time the same: the first listed (the best first guess) is kept. A cache folder that cannot
    be written costs only re-tuning in the next process: the choice is made, and remembered in this one."""
    from dilated_compiler.lowering.triton import autotune
    from dilated_compiler.lowering.triton.autotune import TileConfig
    monkeypatch.delenv("DILATED_COMPILER_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_memory", {})
    a, b, c = TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3), TileConfig(64, 32, 4, 2, False)
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(tmp_path))
    assert autotune.choose("GPU T", "fwd|tie", [a, b, c], {a: 1.0, b: 1.0, c: 1.0}.__getitem__) == a
    assert autotune.choose("GPU T", "dq|tie", [c, b, a], {a: 2.0, b: 1.0, c: 2.0}.__getitem__) == b
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(blocker))
    monkeypatch.setattr(autotune, "_memory", {})
    assert autotune.choose("GPU T", "fwd|ro", [a, b, c], {a: 3.0, b: 2.0, c: 1.0}.__getitem__) == c

    def untimed(cfg):
        raise AssertionError(f"{cfg} timed again")
    assert autotune.choose("GPU T", "fwd|ro", [a, b, c], untimed) == c
    assert not (blocker.is_dir())


@pytest.mark.parametrize("body", ["[1, 2, 3]", "not json {", '"a string"'])
def test_autotune_file_that_is_not_a_json_object_is_ignored(tmp_path, monkeypatch, body):
    """An autotune file whose checksum holds but whose text is not a JSON object (another version's format, a
    hand edit) is read as empty: the call re-tunes and rewrites the file, rather than failing."""
    import json
    from dilated_compiler.lowering.triton import autotune, diskcache
    from dilated_compiler.lowering.triton.autotune import TileConfig
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DILATED_COMPILER_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_memory", {})
    path = tmp_path / "triton" / "autotune-GPU_J.json"
    diskcache.write_atomic(path, diskcache.with_checksum(body))
    assert diskcache.read_verified(path) is not None
    a, b = TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3)
    assert autotune.choose("GPU J", "fwd|k", [a, b], {a: 2.0, b: 1.0}.__getitem__) == b
    assert json.loads(diskcache.read_verified(path)) == {"fwd|k": list(b)}


@pytest.mark.parametrize("value,interpreting", [("1", True), ("true", True), ("TRUE", True), ("on", True),
                                                ("yes", True), ("0", False), ("false", False), ("", False)])
def test_autotune_interpreter_takes_its_one_tile_config(monkeypatch, value, interpreting):
    """TRITON_INTERPRET is read as Triton reads it (1, true, on, yes in any case); under the interpreter every pass
    gets the one small config (16x16 tiles: several tiles per segment at test sizes), untimed; else the lists."""
    from dilated_compiler.lowering.triton import autotune
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert autotune.interpreting() is interpreting
    for p in ("fwd", "dq", "dkdv"):
        for d, size in ((16, 4), (128, 2), (256, 2)):
            got = autotune.candidates(p, d, size)
            assert (got == [autotune.INTERPRETER_CONFIG]) is interpreting
    assert autotune.INTERPRETER_CONFIG[:2] == (16, 16)


def test_tile_config_text_and_launch_options():
    """A config's text (in autotune errors and benchmark tables) names its tiles, warps, stages, load path and
    register cap; its launch options carry maxnreg only when a cap is set (0: the compiler's choice)."""
    from dilated_compiler.lowering.triton.autotune import TileConfig
    assert str(TileConfig(128, 64, 8, 3)) == "128x64/w8/s3/tma"
    assert str(TileConfig(64, 32, 4, 2, False, 128)) == "64x32/w4/s2/ptr/r128"
    assert TileConfig(128, 64, 8, 3).launch_options() == {"num_warps": 8, "num_stages": 3}
    assert TileConfig(64, 32, 4, 2, False, 128).launch_options() == {"num_warps": 4, "num_stages": 2, "maxnreg": 128}


def test_triton_lowering_limits_at_their_bounds():
    """head_dim 256, the largest the kernels take, is accepted and 257 refused; a device that is neither CUDA nor
    CPU is refused when the plan is lowered (kernel_source too), naming the device type."""
    attn = compile_attention(AttentionSpec((Branch(8, 1),)), backend="triton")
    assert "@triton.jit" in attn.kernel_source(16, 2, 256)
    with pytest.raises(BackendError, match="head_dim up to 256; got 257"):
        attn.kernel_source(16, 2, 257)
    with pytest.raises(BackendError, match="runs on CUDA devices .*got 'meta'"):
        attn.kernel_source(16, 2, 16, device="meta")


@pytest.mark.parametrize("head_dim,block_d", [(1, 16), (3, 16), (8, 16), (16, 16), (17, 32), (24, 32), (96, 128),
                                              (256, 256)])
def test_block_d_is_a_power_of_two_of_at_least_16(head_dim, block_d):
    """The tl kernels' feature tile BLOCK_D: head_dim rounded up to a power of two, and at least 16, the smallest
    K tl.dot takes for 16-bit inputs on a GPU. head_dim below 16 runs only in the interpreter tests here (the
    interpreter takes any size, and no GPU test has one), so only the lowering's choice shows it."""
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton.lowering import TritonLowering
    low = TritonLowering(build_plan(AttentionSpec((Branch(8, 1),)), 16, 2, head_dim), torch.device("cpu"),
                         torch.float16)
    assert low.block_d == block_d and low.specialisation["BLOCK_D"] == block_d
    assert f", BLOCK_D={block_d}," in low._text


def test_gluon_reasons_are_judged_per_kind_of_call(monkeypatch):
    """gluon_unsupported remembers its answer per (device, shape, dtype, key padding mask): a call with a mask after
    one without, or with another shape, is judged again, not given the earlier answer. Forward and backward share
    the answer (their reasons are the same), except that the backward's out and gradient must also start on 16
    bytes."""
    from dilated_compiler.lowering.triton import gluon_hopper, lowering as triton_lowering
    monkeypatch.setattr(triton_lowering, "USE_GLUON", True)
    low = _lowering(AttentionSpec((Branch(16, 1),)), dtype=torch.bfloat16, n=64, h=2, d=64)
    calls = []

    def reason(**kw):
        calls.append((kw["seq_len"], kw["has_kpm"]))
        return "a key padding mask" if kw["has_kpm"] else None
    monkeypatch.setattr(gluon_hopper, "unsupported_reason", reason)
    x = torch.zeros(1, 64, 2, 64, dtype=torch.bfloat16)
    assert low.gluon_unsupported(x, x, x, False) is None
    assert low.gluon_unsupported(x, x, x, True) == "a key padding mask"
    assert low.gluon_unsupported(x, x, x, False) is None and low.gluon_unsupported(x, x, x, True) is not None
    assert low.gluon_unsupported(x, x, x, False, x, x) is None
    unaligned = torch.zeros(x.numel() + 8, dtype=torch.bfloat16)[1:1 + x.numel()].view(x.shape)
    assert "out and its gradient must start on 16 bytes" in low.gluon_unsupported(x, x, x, False, x, unaligned)
    y = torch.zeros(1, 48, 2, 64, dtype=torch.bfloat16)
    assert low.gluon_unsupported(y, y, y, False) is None
    assert calls == [(64, False), (64, True), (48, False)]


@pytest.mark.parametrize("seq,covers", [(64, True), (65, False)])
def test_gluon_grouped_outputs_zero_filled_or_zeroed(seq, covers, monkeypatch):
    """Grouped calls on the Gluon kernels: where the tiles' spans cover every row (zero fill), out, dq, dk and dv
    are left for the kernels to fill (no memset; ZFILL on); where they do not (here N = 65 leaves position 64, a
    segment without a selected row, to no tile), they start as zeros and ZFILL is off. The kernels are replaced by
    recorders (they run on a Hopper GPU only) and the uninitialized outputs poisoned with NaN."""
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    poison_uninitialized(monkeypatch)
    spec = AttentionSpec((Branch(8, 1), Branch(8, 4, offset=3)))
    low = _lowering(spec, dtype=torch.bfloat16, n=seq, h=2, d=64)
    assert triton_lowering.spans_cover(low.plan, low._table("q", triton_lowering._GLUON_TILES, torch.device("cpu"))
                                       ) is covers
    zfill = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: zfill.append(kwargs["ZFILL"])
    for name in ("gluon_fwd", "gluon_bwd_dq", "gluon_bwd_dkdv"):
        monkeypatch.setattr(low.gluon_kernels, name, Recorder())
    monkeypatch.setattr(triton_lowering.TritonLowering, "gluon_unsupported", lambda self, q, k, v, has_kpm, *m: None)
    monkeypatch.setattr(triton_lowering, "_sm_count", lambda device: 4)
    monkeypatch.setattr(triton_lowering, "_ensure_allocator", lambda: None)
    monkeypatch.setattr(triton_lowering.TritonLowering, "_check_device", lambda self, t: None)
    q, k, v = (torch.randn(1, seq, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    out, lse, aux = low.forward(q, k, v)
    dq, dk, dv = low.backward(torch.randn_like(q), None, q, k, v, out, torch.zeros_like(lse), aux)
    assert zfill == [covers] * 3
    for t in (out, dq, dk, dv):
        assert bool(torch.isnan(t).all()) if covers else bool((t == 0).all())


def test_float32_kernels_use_exact_products():
    """float32 inputs get tl.dot(..., input_precision="ieee") in every product of the generated kernels (exact
    float32, not TF32, which would miss the float32 tolerances on a GPU); 16-bit inputs the native tensor-core
    dot. The interpreter computes either exactly, so only the source shows it."""
    attn = compile_attention(AttentionSpec((Branch(8, 1), Branch(16, 2))), backend="triton")
    fp32 = attn.kernel_source(32, 2, 16, dtype=torch.float32)
    dots = re.findall(r"tl\.dot\([^\n]*", fp32)
    assert dots and all('input_precision="ieee"' in d for d in dots)
    for dtype in (torch.float16, torch.bfloat16):
        assert 'input_precision="ieee"' not in attn.kernel_source(32, 2, 16, dtype=dtype)


def test_generated_tl_module_header_and_glossaries():
    """The generated tl module's header says what it was generated for: the spec, its key, every fact of the
    specialisation (key=value) and each branch with its offset. Each of its sections (between the ``# ----``
    rules) that defines a kernel opens with that kernel's glossary, ``# <kernel>...``: the header's overview and
    kernel_source's launch lines also name the kernels, after more than one space, and are no glossary."""
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton.generator import KERNEL_NAMES
    from dilated_compiler.lowering.triton.lowering import TritonLowering
    spec = AttentionSpec((Branch(8, 1), Branch(12, 3, offset=2)), causal=True)
    low = TritonLowering(build_plan(spec, 48, 4, 24, kv_heads=2), torch.device("cpu"), torch.float16)
    text = low._text
    header = text[:text.index("\nimport triton\n")]
    assert f"\n# spec:            {spec}\n" in header
    assert f"\n# spec key:        {spec.key}\n" in header
    facts = re.search(r"^# specialisation:  (.*)$", header, re.M).group(1)
    assert dict(f.split("=", 1) for f in facts.split(", ")) == {k: str(v) for k, v in low.specialisation.items()}
    assert {"GQA": "2", "HEAD_DIM": "24", "BLOCK_D": "32", "CAUSAL": "True", "dtype": "float16"}.items() <= dict(
        f.split("=", 1) for f in facts.split(", ")).items()
    assert "\n# branches:        b0: w=8 r=1, b1: w=12 r=3 offset=2\n" in header
    sections = re.split(r"^# -{20,}\n", text, flags=re.M)
    for kernel in KERNEL_NAMES:
        [section] = [s for s in sections if f"\ndef {kernel}(" in s]
        glossary = section[:section.index("\n\n")].splitlines()
        assert glossary[0].startswith(f"# {kernel}") and len(glossary) >= 3, (kernel, glossary)
        assert all(line.startswith("#") for line in glossary), kernel


@pytest.mark.parametrize("mode,kv_heads,seq", [("grouped", 2, 64), ("grouped", 2, 65), ("grouped", 1, 64),
                                               ("all", 2, 64)])
def test_tl_outputs_zero_filled_zeroed_or_accumulated(mode, kv_heads, seq, monkeypatch):
    """The buffers the tl kernels get (kernels replaced by recorders; the uninitialized ones poisoned with NaN):
    grouped, where the tiles' spans cover every row, out, dq, dk and dv in the inputs' dtype, left to the kernels
    (ZFILL, no memset), written in place (ATOMIC off); where they do not (N = 65: position 64 is in no tile),
    zeros without ZFILL; grouped-query attention: dk, dv add over the query heads sharing a kv head (ATOMIC) into
    float32 zeros; "all" mode: each branch's out left to the kernel, dq, dk, dv added over the branches (ATOMIC)
    into float32 zeros. The gradients come back in the inputs' dtype."""
    import inspect
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    from dilated_compiler.planner import build_plan
    poison_uninitialized(monkeypatch)
    monkeypatch.setenv("DILATED_COMPILER_AUTOTUNE", "0")
    monkeypatch.setattr(triton_lowering, "USE_GLUON", False)
    monkeypatch.setattr(triton_lowering.TritonLowering, "_check_device", lambda self, t: None)
    spec = AttentionSpec((Branch(16, 1), Branch(32, 2)), head_assignment=mode)
    low = triton_lowering.TritonLowering(build_plan(spec, seq, 2, 16, kv_heads=kv_heads), torch.device("cpu"),
                                         torch.float16)
    seen = {}

    def state(t):
        return t.dtype, "nan" if bool(torch.isnan(t).all()) else "zeros" if bool((t == 0).all()) else "mixed"

    class Recorder:
        def __init__(self, name, outputs):
            self.fn, self.name, self.outputs = getattr(low.kernels, name).fn, name, outputs

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                params = inspect.signature(self.fn).parameters
                a = inspect.signature(self.fn).bind(*args, **{k: kw for k, kw in kwargs.items() if k in params}
                                                    ).arguments  # less num_warps, num_stages: launch options
                seen[self.name] = ([state(a[o]) for o in self.outputs], a.get("ZFILL"), a.get("ATOMIC"))
            return launch
    for name, outputs in (("dilated_fwd", ("OUT",)), ("dilated_bwd_dq", ("DQ",)), ("dilated_bwd_dkdv", ("DK", "DV")),
                          ("dilated_merge", ())):
        monkeypatch.setattr(low.kernels, name, Recorder(name, outputs))
    q = torch.randn(1, seq, 2, 16, dtype=torch.float16)
    k, v = (torch.randn(1, seq, kv_heads, 16, dtype=torch.float16) for _ in range(2))
    out, lse, aux = low.forward(q, k, v)
    grads = low.backward(torch.randn_like(q), None, q, k, v, torch.randn_like(q), torch.zeros_like(lse), aux)
    assert [g.dtype for g in grads] == [torch.float16] * 3
    f16, f32 = torch.float16, torch.float32
    if mode == "all":
        expected = {"fwd": ([(f16, "nan")], False, None), "dq": ([(f32, "zeros")], False, True),
                    "dkdv": ([(f32, "zeros")] * 2, False, True)}
    elif kv_heads == 1:
        expected = {"fwd": ([(f16, "nan")], True, None), "dq": ([(f16, "nan")], True, False),
                    "dkdv": ([(f32, "zeros")] * 2, False, True)}
    else:
        fill = (f16, "nan") if seq == 64 else (f16, "zeros")
        expected = {"fwd": ([fill], seq == 64, None), "dq": ([fill], seq == 64, False),
                    "dkdv": ([fill] * 2, seq == 64, False)}
    assert {name.replace("dilated_", "").replace("bwd_", ""): seen[name]
            for name in ("dilated_fwd", "dilated_bwd_dq", "dilated_bwd_dkdv")} == expected
    assert ("dilated_merge" in seen) == (mode == "all")


def test_kernel_source_lists_each_launch_with_its_pass_config():
    """kernel_source's launch lines: each kernel with its own pass's first tile config (fwd, dq and dk/dv have
    different lists) and the tile count of that pass's table, times the batch."""
    from dilated_compiler.lowering.triton.autotune import candidates
    from dilated_compiler.lowering.triton.tables import tile_table
    from dilated_compiler.planner import build_plan
    spec = AttentionSpec((Branch(64, 1), Branch(128, 2)), causal=True)
    text = compile_attention(spec, backend="triton").kernel_source(256, 2, 64, batch=3, dtype=torch.float16)
    plan = build_plan(spec, 256, 2, 64, batch=3)
    for name, pass_name, kind in (("dilated_fwd", "fwd", "q"), ("dilated_bwd_dq", "dq", "q"),
                                  ("dilated_bwd_dkdv", "dkdv", "k")):
        cfg = candidates(pass_name, 64, 2)[0]
        tiles = tile_table(plan, kind, cfg.block, cfg.partner).shape[0]
        assert f"#   {name:<18} grid=({tiles} tiles, B=3)  tiles {cfg}\n" in text


@pytest.mark.parametrize("dils,acc,fresh", [((2, 1, 4), 3, "nan"), ((2, 3, 1), 4, "zeros"), ((2, 4), 1, "zeros"),
                                            ((1,), 2, "nan")])
def test_gluon_all_mode_backward_buffers(dils, acc, fresh, monkeypatch):
    """"all" mode's Gluon backward: the float32 buffers the phases add into are left uninitialized only where the
    first phase stores (ACC 2, 3); where every phase adds (ACC 1, 4) they start as zeros. ACC 3 and 4 write the
    gradients in the inputs' dtype into separate outputs, returned as they are. (Kernels replaced by recorders,
    the uninitialized buffers poisoned with NaN; the kernels run on a Hopper GPU only.)"""
    import inspect
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    from dilated_compiler.planner import build_plan
    poison_uninitialized(monkeypatch)
    branches = tuple(Branch(256 * r if r != 3 else 1152, r) for r in dils)
    plan = build_plan(AttentionSpec(branches, head_assignment="all"), 4608 if 3 in dils else 4096, 4, 64)
    low = triton_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16)
    seen = {}

    class Recorder:
        def __init__(self, name):
            self.fn, self.name = getattr(low.gluon_kernels, name).fn, name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kwargs.pop("launch_cooperative_grid", None)
                a = inspect.signature(self.fn).bind(*args, **kwargs).arguments
                bufs = [a[n] for n in (("DQ",) if self.name == "gluon_bwd_dq" else ("DK", "DV"))]
                seen[self.name] = (a["ACC"], [(t.dtype, "nan" if bool(torch.isnan(t).all()) else
                                               "zeros" if bool((t == 0).all()) else "mixed") for t in bufs])
            return launch
    for name in ("gluon_bwd_dq", "gluon_bwd_dkdv"):
        monkeypatch.setattr(low.gluon_kernels, name, Recorder(name))
    monkeypatch.setattr(triton_lowering.TritonLowering, "gluon_unsupported", lambda self, q, k, v, has_kpm, *m: None)
    monkeypatch.setattr(triton_lowering, "_sm_count", lambda device: 4)
    monkeypatch.setattr(triton_lowering, "_ensure_allocator", lambda: None)
    monkeypatch.setattr(triton_lowering.TritonLowering, "_check_device", lambda self, t: None)
    N = int(plan.seq_len)
    q, k, v, out, dout = (torch.randn(1, N, 4, 64, dtype=torch.bfloat16) for _ in range(5))
    lse = torch.zeros(1, 4, N)
    grads = low.backward(dout, None, q, k, v, out, lse, torch.zeros(len(dils), 1, 4, N))
    assert seen == {"gluon_bwd_dq": (acc, [(torch.float32, fresh)]),
                    "gluon_bwd_dkdv": (acc, [(torch.float32, fresh)] * 2)}
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    if acc >= 3:  # the final phase's outputs, which the kernels fill: returned without a cast
        assert all(bool(torch.isnan(g).all()) for g in grads)


def test_tensor_descriptors_need_16_byte_rows(monkeypatch):
    """The tl kernels take tiles through tensor descriptors only where each row of head_dim elements is a multiple
    of 16 bytes, the tensors start on 16 bytes and their last dimension is dense (else pointer loads)."""
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    monkeypatch.setattr(triton_lowering, "_tma_supported", lambda device: True)
    monkeypatch.setattr(triton_lowering, "_ensure_allocator", lambda: None)
    monkeypatch.setattr(triton_lowering, "USE_TMA", True)
    for d, dtype, ok in ((8, torch.float16, True), (4, torch.float16, False), (4, torch.float32, True),
                         (12, torch.float16, False), (24, torch.float16, True)):
        low = _lowering(AttentionSpec((Branch(8, 1),)), dtype=dtype, n=16, h=1, d=d)
        x = torch.zeros(1, 16, 1, d, dtype=dtype)
        assert low._tma(x, x, x) is ok, (d, dtype)
    low = _lowering(AttentionSpec((Branch(8, 1),)), dtype=torch.float16, n=16, h=1, d=8)
    x = torch.zeros(1, 16, 1, 8, dtype=torch.float16)
    shifted = torch.zeros(16 * 8 + 1, dtype=torch.float16)[1:].view(1, 16, 1, 8)  # starts 2 bytes in
    strided = torch.zeros(1, 16, 1, 16, dtype=torch.float16)[..., ::2]
    assert low._tma(x, x) and not low._tma(x, shifted) and not low._tma(strided)
    monkeypatch.setattr(triton_lowering, "USE_TMA", False)
    assert not low._tma(x)


def test_scratch_kept_until_the_block_ends():
    """[Note: overlap]: Triton's scratch allocations (the Gluon kernels' tensor descriptors) made while dk/dv may
    overlap dq stay referenced until both are launched, through whatever allocator was set; the allocator is
    restored after the block, also when the block raises."""
    import gc
    import weakref
    allocation = pytest.importorskip("triton.runtime._allocation")
    from dilated_compiler.lowering.triton import lowering as triton_lowering
    made = []

    def users(size, alignment, stream):
        made.append((size, alignment))
        return torch.empty(size, dtype=torch.int8)
    token = allocation._allocator.set(users)
    try:
        with triton_lowering._scratch_kept() as kept:
            assert kept
            ref = weakref.ref(allocation._allocator.get()(256, 128, None))
            gc.collect()
            assert ref() is not None, "a scratch buffer was freed inside the block"
        gc.collect()
        assert ref() is None, "a scratch buffer outlived the block"
        assert made == [(256, 128)] and allocation._allocator.get() is users
        with pytest.raises(RuntimeError, match="inside"):
            with triton_lowering._scratch_kept():
                raise RuntimeError("inside")
        assert allocation._allocator.get() is users
    finally:
        allocation._allocator.reset(token)


# ---- GPU ------------------------------------------------------------------------------------------------------

GPU_PATTERNS = {
    "four-branch": (Branch(64, 1), Branch(128, 2), Branch(256, 4), Branch(512, 8)),
    "offsets": (Branch(96, 3, offset=2), Branch(200, 5, offset=0), Branch(300, 1)),
}


def _gpu_spec(pattern, mode, causal):
    """GPU_PATTERNS[pattern] as a spec; in "all" mode without explicit offsets (there head h uses h % dilation)."""
    branches = GPU_PATTERNS[pattern]
    if mode == "all":
        branches = tuple(Branch(b.segment_length, b.dilation) for b in branches)
    return AttentionSpec(branches, head_assignment=mode, causal=causal)


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs the kernels fill by themselves start as NaN (a missed gap fails the comparison)."""
    return poison_uninitialized(monkeypatch)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("pattern,dtype,head_dim,mode,causal", [
    ("four-branch", torch.bfloat16, 128, "grouped", False),
    ("four-branch", torch.bfloat16, 128, "grouped", True),
    ("four-branch", torch.bfloat16, 128, "all", False),
    ("four-branch", torch.bfloat16, 128, "all", True),
    ("four-branch", torch.float16, 64, "grouped", True),
    ("offsets", torch.float16, 64, "all", False),
    ("offsets", torch.bfloat16, 128, "grouped", False),
])
def test_gpu_against_reference(pattern, dtype, head_dim, mode, causal, poisoned):
    spec = _gpu_spec(pattern, mode, causal)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(2, 1000, 4, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    check_against_reference(attn, spec, q, k, v)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype,N,batch,causal,head_dim", [
    (torch.bfloat16, 4096, 2, False, 128), (torch.float16, 4096, 1, False, 128), (torch.bfloat16, 3840, 1, False, 128),
    (torch.bfloat16, 4096, 2, True, 128), (torch.float16, 4096, 1, True, 128), (torch.bfloat16, 3840, 1, True, 128),
    (torch.bfloat16, 4096, 2, False, 64), (torch.float16, 4096, 1, True, 64), (torch.bfloat16, 3840, 1, True, 64)])
def test_gpu_gluon_kernels(dtype, N, batch, causal, head_dim, poisoned, monkeypatch):
    """On Hopper with the checked triton, grouped calls whose segments are whole 128-row tiles run the Gluon
    forward and backward (N = 4096 here), causal or not, head_dim 64 or 128; others (N = 3840: a ragged last
    segment) the tl ones. Same results (out, lse, and the gradients of a loss on both)."""
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    if torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        pytest.skip("the Gluon forward runs on compute capability 9.0 with the checked triton only")
    calls = record_gluon_calls(poisoned, monkeypatch)
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2, offset=1), Branch(1024, 4), Branch(2048, 8)), causal=causal)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(batch, N, 8, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    check_against_reference(attn, spec, q, k, v)
    expected = [(batch, N, 8, head_dim)] if N % 2048 == 0 else []
    assert calls == {"fwd": expected, "dq": expected, "dkdv": expected}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("causal,dtype,head_dim,batch,kv_heads,dlse", [
    (False, torch.bfloat16, 128, 1, None, False), (True, torch.bfloat16, 128, 2, None, True),
    (False, torch.float16, 64, 2, 8, True), (True, torch.float16, 64, 1, 4, False)])
def test_gpu_overlapped_backward(causal, dtype, head_dim, batch, kv_heads, dlse, poisoned, monkeypatch):
    """[Note: overlap]: in grouped mode gluon_bwd_dkdv is launched to overlap gluon_bwd_dq's last wave (480 tiles a
    pass here: 3.6 waves on 132 SMs), waiting on a counter for every delta. Its gradients are bitwise those of the
    two launches one after the other (gluon_hopper.BWD_OVERLAP off); the grouped-query case (a kv head's query heads
    in one branch) overlaps too. Outputs start as NaN. Against the reference: the Gluon tests above and below run
    the overlapped backward (on by default) at N = 4096, where dq's grid is below the SM count and the dk/dv
    programs start at once and wait on the counter; a float64 reference at this size takes about 40 s a case on a
    GPU machine's host (stop 49)."""
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    from dilated_compiler.lowering.triton.lowering import TritonLowering
    from dilated_compiler.planner import build_plan
    if torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        pytest.skip("the Gluon kernels run on compute capability 9.0 with the checked triton only")
    overlaps = []
    launch = poisoned.TritonLowering._launch_gluon_dkdv
    monkeypatch.setattr(poisoned.TritonLowering, "_launch_gluon_dkdv",
                        lambda self, *a, **kw: overlaps.append(kw.get("overlap") is not None) or launch(self, *a, **kw))
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2, offset=1), Branch(1024, 4), Branch(2048, 8)), causal=causal)
    N, H = 8192, 16
    low = TritonLowering(build_plan(spec, N, H, head_dim, kv_heads=kv_heads), torch.device("cuda"), dtype)
    q, k, v = make_qkv(batch, N, H, head_dim, dtype=dtype, device="cuda", kv_heads=kv_heads)
    g = torch.Generator(device="cuda").manual_seed(1)
    dout = torch.randn(q.shape, dtype=dtype, device="cuda", generator=g)
    out, lse, aux = low.forward(q, k, v)
    dl = torch.randn(lse.shape, device="cuda", generator=g) if dlse else None
    grads = {}
    for on in (False, True):
        monkeypatch.setattr(gluon_hopper, "BWD_OVERLAP", on)
        grads[on] = low.backward(dout, dl, q, k, v, out, lse, aux)
        torch.cuda.synchronize()
    assert overlaps == [False, True]
    for name, a, b in zip(("dq", "dk", "dv"), grads[True], grads[False]):
        assert not a.isnan().any(), f"{name}: rows left unwritten"
        assert torch.equal(a, b), f"{name} differs between the overlapped and the serial launches"


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_gpu_eager_path_matches_the_custom_op(mode, poisoned, monkeypatch):
    """On CUDA the module's plain eager call (runtime.op.EagerAttention) and the custom op launch the same kernels
    (the Hopper ones where they run): bitwise equal out, lse and gradients."""
    calls = record_gluon_calls(poisoned, monkeypatch)
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2), Branch(1024, 4), Branch(2048, 8)), head_assignment=mode)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, 4096, 8, 128, dtype=torch.bfloat16, device="cuda")
    assert_eager_path_matches_op(attn, q, k, v)
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    if torch.cuda.get_device_capability() == (9, 0) and triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        assert len(calls["fwd"]) == 2 and len(calls["dq"]) == 2 and len(calls["dkdv"]) == 2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype,batch,causal,head_dim", [
    (torch.bfloat16, 2, False, 128), (torch.float16, 1, True, 128), (torch.bfloat16, 1, True, 64)])
def test_gpu_gluon_all_mode_forward(dtype, batch, causal, head_dim, poisoned, monkeypatch):
    """"all" mode on Hopper: gluon_fwd writes each branch's out and lse and dilated_merge combines them; with
    ALL_MODE_BACKWARD off the backward runs the tl kernels. Same results as the reference (out, lse, gradients)."""
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    if torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        pytest.skip("the Gluon forward runs on compute capability 9.0 with the checked triton only")
    monkeypatch.setattr(gluon_hopper, "ALL_MODE_BACKWARD", False)
    calls = record_gluon_calls(poisoned, monkeypatch)
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2), Branch(1024, 4), Branch(2048, 8)), head_assignment="all",
                         causal=causal)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(batch, 4096, 6, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    check_against_reference(attn, spec, q, k, v)
    assert calls == {"fwd": [(batch, 4096, 6, head_dim)], "dq": [], "dkdv": []}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype,batch,causal,head_dim,dilations", [
    (torch.bfloat16, 2, False, 128, (1, 2, 4, 8)), (torch.float16, 1, True, 128, (1, 2, 4, 8)),
    (torch.bfloat16, 1, True, 64, (1, 2, 4, 8)), (torch.bfloat16, 1, False, 128, (2, 1, 8, 4)),
    (torch.float16, 2, True, 64, (2, 4, 8)), (torch.bfloat16, 1, False, 64, (1,)), (torch.float16, 2, True, 128, (1,)),
    (torch.bfloat16, 1, False, 128, (4,)), (torch.bfloat16, 2, False, 128, (2, 3, 1)),
    (torch.float16, 1, True, 64, (3, 1, 2))])
def test_gpu_gluon_all_mode_backward(dtype, batch, causal, head_dim, dilations, poisoned, monkeypatch):
    """gluon_hopper.ALL_MODE_BACKWARD (the default): "all" mode's backward as one dq and one dk/dv launch, each
    walking the branches in phases into float32 buffers (uninitialised ones start as NaN here). With a dilation-1
    branch among others (ALL_MODE_FINAL_PHASE) that branch goes last and writes the gradients in the inputs' dtype,
    reading the buffers only where an earlier phase wrote; before it, a branch whose rows include the others'
    stores first (r = 2 before 4 and 8: ACC 3), or, where none does (r = 2 and 3), all add into zeros (ACC 4).
    Without a dilation-1 branch all add into zeros. Batch 2 folds the batch into the walk. One branch: a single
    phase (whose count triton must not make a constant: it failed to compile the storing phase). Same results as
    the reference."""
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    if torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        pytest.skip("the Gluon kernels run on compute capability 9.0 with the checked triton only")
    monkeypatch.setattr(gluon_hopper, "ALL_MODE_BACKWARD", True)
    calls = record_gluon_calls(poisoned, monkeypatch)
    # r = 3: 1152 positions, 384 selected rows (whole 128-row tiles), over N = 4608
    spec = AttentionSpec(tuple(Branch(1152 if r == 3 else 256 * r, r) for r in dilations), head_assignment="all",
                         causal=causal)
    n = 4608 if 3 in dilations else 4096
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(batch, n, 6, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    check_against_reference(attn, spec, q, k, v)
    shape = (batch, n, 6, head_dim)
    assert calls == {"fwd": [shape], "dq": [shape], "dkdv": [shape]}  # one launch per pass


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode,causal,dtype,head_dim,kv_heads,batch", [
    ("grouped", False, torch.bfloat16, 128, 6, 2), ("grouped", True, torch.float16, 64, 3, 1),
    ("grouped", False, torch.bfloat16, 128, 4, 1), ("grouped", True, torch.bfloat16, 128, 1, 2),
    ("all", False, torch.bfloat16, 128, 3, 1), ("all", True, torch.float16, 64, 4, 2),
    ("all", False, torch.bfloat16, 64, 1, 1)])
def test_gpu_gluon_gqa(mode, causal, dtype, head_dim, kv_heads, batch, poisoned, monkeypatch):
    """Grouped-query attention on Hopper (12 query heads): gluon_fwd and gluon_bwd_dq read kv head h // (H // Hkv),
    gluon_bwd_dkdv walks each kv head's key tiles over the query heads that read them ("all" mode: those of one
    offset, in phases). In grouped mode (4 heads per branch) 4 and 1 kv heads put a kv head's query heads in two
    branches or more, and dk/dv runs a phase per branch (SPLIT). Same results as the reference (out, lse,
    gradients), outputs starting as NaN."""
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    if torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        pytest.skip("the Gluon kernels run on compute capability 9.0 with the checked triton only")
    calls = record_gluon_calls(poisoned, monkeypatch)
    # an explicit offset in grouped mode only ("all" mode gives head h the offset h % r)
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2, offset=1 if mode == "grouped" else None), Branch(1024, 4)),
                         head_assignment=mode, causal=causal)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(batch, 4096, 12, head_dim, dtype=dtype, device="cuda", kv_heads=kv_heads, requires_grad=True)
    check_against_reference(attn, spec, q, k, v)
    shape = (batch, 4096, 12, head_dim)
    assert calls == {"fwd": [shape], "dq": [shape], "dkdv": [shape]}


@pytest.mark.gpu
@cuda
def test_gpu_gluon_forward_unaligned_inputs(poisoned, monkeypatch):
    """Inputs that do not start on 16 bytes cannot feed tensor descriptors: the tl forward runs them, correctly."""
    calls = record_gluon_calls(poisoned, monkeypatch)
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)))
    attn = compile_attention(spec, backend="triton")
    n = 1024 * 4 * 128
    store = torch.randn(3, n + 8, dtype=torch.bfloat16, device="cuda")
    q, k, v = (store[i, 1:1 + n].view(1, 1024, 4, 128).requires_grad_() for i in range(3))
    assert q.data_ptr() % 16 != 0
    check_against_reference(attn, spec, q, k, v)
    assert calls == {"fwd": [], "dq": [], "dkdv": []}


@pytest.mark.gpu
@cuda
def test_gpu_gluon_backward_unaligned_gradient(poisoned, monkeypatch):
    """An output gradient that does not start on 16 bytes: the Gluon forward runs, the tl backward, correctly."""
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    if torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        pytest.skip("the Gluon kernels run on compute capability 9.0 with the checked triton only")
    from dilated_compiler import build_plan
    calls = record_gluon_calls(poisoned, monkeypatch)
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)))
    low = poisoned.TritonLowering(build_plan(spec, 1024, 4, 128), torch.device("cuda"), torch.bfloat16)
    q, k, v = make_qkv(1, 1024, 4, 128, dtype=torch.bfloat16, device="cuda")
    out, lse, aux = low.forward(q, k, v)
    n = out.numel()
    dout = torch.randn(n + 8, dtype=torch.bfloat16, device="cuda")[1:1 + n].view(out.shape)
    assert dout.data_ptr() % 16 != 0
    grads = low.backward(dout, None, q, k, v, out, lse, aux)
    qr, kr, vr = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(qr, kr, vr, spec, return_lse=True)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double().cpu())
    assert_close(out, ref, torch.bfloat16, "out")
    terms = rounding_terms(spec, qr, kr, vr, ref, ref_lse, dout.double().cpu(),
                           score_roundoff=score_roundoff(torch.bfloat16))
    for name, a, e, t in zip("qkv", grads, ref_grads, terms):
        assert_close(a, e, torch.bfloat16, f"grad {name}", grad=True, terms=t)
    assert calls == {"fwd": [(1, 1024, 4, 128)], "dq": [], "dkdv": []}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("head_dim,dtype,mode,causal", [
    (16, torch.bfloat16, "grouped", False), (32, torch.float16, "all", True), (80, torch.bfloat16, "grouped", True),
    (96, torch.float16, "grouped", False), (256, torch.bfloat16, "grouped", True), (256, torch.float16, "all", False),
])
def test_gpu_head_dims(head_dim, dtype, mode, causal, poisoned):
    """head_dim 16 to 256 beyond the tuned 64 and 128: padded (80, 96) and the 256 bucket, against the reference;
    3 heads (odd), batch 2, ragged N."""
    spec = _gpu_spec("offsets", mode, causal)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(2, 1000, 3, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    check_against_reference(attn, spec, q, k, v)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("tma", [True, False])
def test_gpu_float32_first_tile_candidates(head_dim, tma, poisoned, monkeypatch):
    """float32 has tile lists of its own (autotune.candidates); with autotuning off the first candidate of each
    pass runs, with tensor descriptors allowed and not, against the reference (the 16-bit lists spilled at float32,
    and at D = 256 took ptxas minutes per kernel)."""
    monkeypatch.setenv("DILATED_COMPILER_AUTOTUNE", "0")
    monkeypatch.setattr(poisoned, "USE_TMA", tma)
    spec = _gpu_spec("offsets", "grouped", True)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, 700, 3, head_dim, dtype=torch.float32, device="cuda", requires_grad=True)
    check_against_reference(attn, spec, q, k, v)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("mode,causal", [("grouped", True), ("all", False)])
@pytest.mark.parametrize("tma", [True, False])
def test_gpu_float32_tf32_products(head_dim, mode, causal, tma, matmul_precision, poisoned, monkeypatch):
    """Where torch's setting allows TF32 for float32 matmuls, float32 runs its products on the TF32 tensor cores with
    its own tile lists (the first of each with autotuning off), with tensor descriptors allowed and not (pointer
    loads): against the reference at TF32's tolerance (conftest), and not the exact products' result (which would
    mean the setting was not followed)."""
    from dilated_compiler.runtime.cache import lowered
    monkeypatch.setenv("DILATED_COMPILER_AUTOTUNE", "0")
    monkeypatch.setattr(poisoned, "USE_TMA", tma)
    spec = _gpu_spec("offsets", mode, causal)
    q, k, v = make_qkv(1, 700, 3, head_dim, dtype=torch.float32, device="cuda", requires_grad=True)
    matmul_precision("tf32")
    attn = compile_attention(spec, backend="triton")
    check_against_reference(attn, spec, q, k, v, precision="tf32")
    assert lowered(spec.key, "triton", tuple(q.shape), 3, torch.float32, q.device).dot_precision == "tf32"
    with torch.no_grad():
        fast = attn(q, k, v)
        matmul_precision("ieee")
        exact = attn(q, k, v)
    assert (fast - exact).abs().max() > 0


def _lowering_against_reference(low, spec, B, N, H, D, dtype):
    """A TritonLowering's forward and backward (with an lse gradient) against the reference."""
    q, k, v = make_qkv(B, N, H, D, dtype=dtype, device="cuda")
    out, lse, aux = low.forward(q, k, v)
    g = torch.Generator(device="cuda").manual_seed(3)
    dout = torch.randn(out.shape, generator=g, device="cuda", dtype=dtype)
    dlse = torch.randn(lse.shape, generator=g, device="cuda", dtype=torch.float32)
    dlse = torch.where(torch.isinf(lse), 0.0, dlse)  # rows no key reaches: lse is -inf, its gradient 0
    grads = low.backward(dout, dlse, q, k, v, out, lse, aux)
    qr, kr, vr = (t.double().cpu().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference.attention(qr, kr, vr, spec, return_lse=True)
    finite_lse = torch.where(torch.isinf(ref_lse), 0.0, ref_lse)
    ref_grads = torch.autograd.grad((ref * dout.double().cpu()).sum() + (finite_lse * dlse.double().cpu()).sum(),
                                    (qr, kr, vr))
    assert_close(out, ref, dtype, "out")
    assert_lse_close(lse, ref_lse, dtype)
    terms = rounding_terms(spec, qr, kr, vr, ref, ref_lse, dout.double().cpu(), dlse.double().cpu(),
                           score_roundoff=score_roundoff(dtype))
    for name, a, e, t in zip("qkv", grads, ref_grads, terms):
        assert_close(a, e, dtype, f"grad {name}", grad=True, terms=t)


def _tile_candidates():
    from dilated_compiler.lowering.triton import autotune
    cases = []
    for head_dim in (64, 128, 256):
        for pass_name in ("fwd", "dq", "dkdv"):
            for i, cfg in enumerate(autotune.candidates(pass_name, head_dim)):
                cases.append(pytest.param(head_dim, pass_name, i, id=f"D{head_dim}-{pass_name}-{cfg}"))
    return cases


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("head_dim,pass_name,index", _tile_candidates())
def test_gpu_every_tile_candidate(head_dim, pass_name, index, poisoned, monkeypatch):
    """Autotuning skips a candidate that does not fit the device, so each candidate of each head_dim bucket is run
    here on its own: it must fit this GPU and give the reference's out, lse and gradients (the tl kernels: the
    segments are not whole 128-row tiles, so no Gluon kernel runs)."""
    from dilated_compiler import build_plan
    calls = record_gluon_calls(poisoned, monkeypatch)
    first = poisoned.candidates
    monkeypatch.setattr(poisoned, "candidates",
                        lambda name, d, size=2: [first(name, d, size)[index if name == pass_name else 0]])
    spec = AttentionSpec(GPU_PATTERNS["offsets"], causal=True)
    low = poisoned.TritonLowering(build_plan(spec, 1000, 4, head_dim), torch.device("cuda"), torch.bfloat16)
    _lowering_against_reference(low, spec, 2, 1000, 4, head_dim, torch.bfloat16)
    assert calls == {"fwd": [], "dq": [], "dkdv": []}
    chosen = {key.split("|")[0]: cfg for key, cfg in low._configs.items()}
    assert chosen[pass_name] == first(pass_name, head_dim)[index]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["grouped", "all"])
def test_gpu_autotune_on(mode, tmp_path, poisoned, monkeypatch):
    """Autotuning as users get it (on by default): each pass times its candidates, the result is right, and the
    choices are kept per device in the cache folder, where a new process finds them and times nothing."""
    import json
    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton import autotune, diskcache
    monkeypatch.setenv("DILATED_COMPILER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("DILATED_COMPILER_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_memory", {})
    calls = record_gluon_calls(poisoned, monkeypatch)
    spec = _gpu_spec("offsets", mode, True)
    plan = build_plan(spec, 1000, 4, 128)
    timed = []
    bench = poisoned.TritonLowering._bench
    monkeypatch.setattr(poisoned.TritonLowering, "_bench", staticmethod(lambda fn: timed.append(1) or bench(fn)))
    low = poisoned.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    _lowering_against_reference(low, spec, 2, 1000, 4, 128, torch.bfloat16)
    assert calls == {"fwd": [], "dq": [], "dkdv": []}
    n_candidates = sum(len(autotune.candidates(p, 128)) for p in ("fwd", "dq", "dkdv"))
    assert len(timed) == n_candidates
    path = autotune._file(torch.cuda.get_device_name())
    assert path.parent == tmp_path / "triton"
    saved = json.loads(diskcache.read_verified(path))
    assert sorted(key.split("|")[0] for key in saved) == ["dkdv", "dq", "fwd"]
    for key, cfg in saved.items():
        assert autotune.TileConfig(*cfg) in autotune.candidates(key.split("|")[0], 128)
        assert low._configs[key] == autotune.TileConfig(*cfg)
    # a new process: the choices come from the file, nothing is timed
    monkeypatch.setattr(autotune, "_memory", {})
    timed.clear()
    again = poisoned.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    _lowering_against_reference(again, spec, 2, 1000, 4, 128, torch.bfloat16)
    assert timed == [] and again._configs == low._configs


_LARGE_GRADIENTS = dict(
    spec=AttentionSpec((Branch(315, 8), Branch(538, 3), Branch(18, 4)), head_assignment="grouped", causal=True,
                       scale=0.9315238901281939),
    batch=2, seq=736, heads=4, kv_heads=2, head_dim=128, mask=False, lse_grad=True, seed=1946)
_SHARP_SOFTMAX = dict(
    spec=AttentionSpec((Branch(892, 8, 4),), head_assignment="grouped", scale=0.718369477450337),
    batch=2, seq=1940, heads=6, kv_heads=3, head_dim=128, mask=False, lse_grad=False, seed=23296)


@pytest.mark.gpu
@cuda
@given(case=attention_cases(max_dilation=9, max_kv_heads=3, max_seq=2000, head_dims=(16, 64, 96, 128),
                            max_segment=1024),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
@example(case=_LARGE_GRADIENTS, dtype=torch.float16)
@example(case=_LARGE_GRADIENTS, dtype=torch.bfloat16)
@example(case=_SHARP_SOFTMAX, dtype=torch.bfloat16)
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_gpu_random_specs_and_shapes(case, dtype):
    """Random specs and shapes on the GPU (segments up to 1024, N up to 2000, ragged N, offsets, odd head counts,
    GQA, key padding, padded head_dim): out, lse and gradients against the reference. derandomize: the examples
    depend on the test and on hypothesis, not on a fresh seed (a different caller drew different late examples on
    one machine). The explicit examples: large scales, which make gradients tens of units large and the softmax
    sharp (the cases that showed rounding failing a tolerance without conftest.rounding_terms)."""
    run_case(case, "triton", dtype=dtype, device="cuda")


@pytest.mark.gpu
@cuda
@given(case=attention_cases(max_dilation=9, max_kv_heads=3, max_seq=2000, head_dims=(16, 64, 96, 128, 256),
                            max_segment=1024))
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_gpu_random_specs_and_shapes_float32(case):
    """As test_gpu_random_specs_and_shapes, in float32: its own tile lists (small tiles over 8 warps, exact
    products; autotune.candidates) on random specs and shapes, head_dim up to 256."""
    run_case(case, "triton", dtype=torch.float32, device="cuda")


@pytest.mark.gpu
@cuda
@given(case=attention_cases(max_dilation=9, max_kv_heads=3, max_seq=2000, head_dims=(16, 64, 96, 128, 256),
                            max_segment=1024))
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])   # no shrinking: minutes of GPU time per failure
def test_gpu_random_specs_and_shapes_tf32(case, matmul_precision):
    """As test_gpu_random_specs_and_shapes_float32, with torch's setting allowing TF32 for float32 matmuls: the
    TF32 products and their tile lists (autotuning on: every candidate of a pass is timed, the fastest runs), at
    TF32's tolerance."""
    matmul_precision("tf32")
    run_case(case, "triton", dtype=torch.float32, device="cuda", precision="tf32")


@pytest.fixture
def gluon_calls(poisoned, monkeypatch):
    return record_gluon_calls(poisoned, monkeypatch)


@pytest.mark.gpu
@cuda
@given(case=gluon_cases(modes=("grouped", "all")), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_gpu_random_gluon_specs(case, dtype, gluon_calls):
    """Random specs of whole 128-row tiles, both modes, kv heads dividing the heads: the Hopper (Gluon) kernels run
    them, forward and backward (the forward alone under grouped-query attention), and agree with the reference;
    outputs the kernels fill by themselves start as NaN."""
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    if torch.cuda.get_device_capability() != (9, 0) or not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        pytest.skip("the Gluon kernels run on compute capability 9.0 with the checked triton only")
    before = {name: len(c) for name, c in gluon_calls.items()}
    run_case(case, "triton", dtype=dtype, device="cuda")
    ran = tuple(name for name, c in gluon_calls.items() if len(c) > before[name])
    assert ran == gluon_kernels_for(case), (case, gluon_calls)


@pytest.mark.gpu
@cuda
def test_gpu_pointer_path(poisoned, monkeypatch):
    """The pointer-load path (GPUs without TMA, unaligned tensors) on this GPU too."""
    monkeypatch.setattr(poisoned, "USE_TMA", False)
    spec = AttentionSpec(GPU_PATTERNS["offsets"], causal=True)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(2, 1000, 4, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    check_against_reference(attn, spec, q, k, v)


@pytest.mark.gpu
@cuda
def test_gpu_unaligned_inputs_take_pointer_path(poisoned, monkeypatch):
    """Views whose data does not start on 16 bytes cannot feed tensor descriptors: still correct."""
    chosen = []
    tma = poisoned.TritonLowering._tma
    monkeypatch.setattr(poisoned.TritonLowering, "_tma", lambda self, *t: chosen.append(tma(self, *t)) or chosen[-1])
    spec = AttentionSpec(GPU_PATTERNS["four-branch"])
    attn = compile_attention(spec, backend="triton")
    n = 1000 * 4 * 64
    store = torch.randn(3, n + 8, dtype=torch.float16, device="cuda")
    q, k, v = (store[i, 1:1 + n].view(1, 1000, 4, 64).requires_grad_() for i in range(3))
    assert q.data_ptr() % 16 != 0
    check_against_reference(attn, spec, q, k, v)
    assert chosen and not any(chosen)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype,mode", [(torch.float32, "grouped"), (torch.bfloat16, "all")])
def test_gpu_gqa_key_padding(dtype, mode):
    spec = AttentionSpec((Branch(128, 1), Branch(256, 4)), head_assignment=mode, causal=True)
    attn = compile_attention(spec, backend="triton")
    q, _, _ = make_qkv(2, 700, 8, 64, dtype=dtype, device="cuda", requires_grad=True)
    _, k, v = make_qkv(2, 700, 8, 64, dtype=dtype, device="cuda", kv_heads=2, seed=2, requires_grad=True)
    mask = torch.zeros(2, 700, dtype=torch.bool, device="cuda")
    mask[0, :256] = True
    mask[1, 7::5] = True
    check_against_reference(attn, spec, q, k, v, key_padding_mask=mask)


@pytest.mark.gpu
@cuda
def test_gpu_torch_compile_fullgraph():
    spec = AttentionSpec((Branch(128, 1), Branch(256, 2)), head_assignment="all", causal=True)
    attn = compile_attention(spec, backend="auto")
    q, k, v = make_qkv(1, 512, 4, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, return_lse=True), fullgraph=True)
    check_against_reference(lambda q, k, v, key_padding_mask=None, return_lse=True: compiled(q, k, v),
                            spec, q, k, v)


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("N", [4096, 1000])  # whole tiles (on Hopper the Gluon kernels) and a ragged N (tl)
def test_gpu_inputs_on_a_device_that_is_not_current(N, poisoned):
    """q, k, v on cuda:1 while cuda:0 is current: the kernels launch on the inputs' device (Triton launches on the
    current one), forward and backward against the reference."""
    spec = _graph_spec(causal=True)
    attn = compile_attention(spec, backend="triton")
    q, k, v = make_qkv(1, N, 4, 128, dtype=torch.bfloat16, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0):
        check_against_reference(attn, spec, q, k, v)


def _graph_spec(causal, mode="grouped"):
    return AttentionSpec((Branch(256, 1), Branch(512, 2), Branch(1024, 4), Branch(2048, 8)), causal=causal,
                         head_assignment=mode)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("N,causal,mode", [(4096, False, "grouped"), (4096, True, "grouped"), (3840, False, "grouped"),
                                           (4096, False, "all")])
def test_gpu_cuda_graph_capture(N, causal, mode):
    """A fwd+bwd step captured in a CUDA graph after a warm-up (what torch.compile's "reduce-overhead" mode does)
    replays to the eager results for new inputs copied in place: no host synchronisation, no first-call work and
    no allocation outside the graph's pool inside the step. N = 4096: the Gluon kernels on Hopper; 3840 (a ragged
    last segment): the tl ones; "all" mode: the Gluon backward's cooperative launches."""
    attn = compile_attention(_graph_spec(causal, mode), backend="triton")
    q, k, v = make_qkv(1, N, 8, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn_like(q)

    def step():
        # out detached: a result kept alive must not keep its autograd graph (and the leaves' AccumulateGrad nodes,
        # made on the capture stream) for the next step on another stream
        out = attn(q, k, v)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (q, k, v, dout):
        t.detach().copy_(torch.randn_like(t))
    graph.replay()
    eager = step()
    for name, a, e in zip(("out", "grad q", "grad k", "grad v"), captured, eager):
        assert torch.equal(a, e), name


@pytest.mark.gpu
@cuda
def test_gpu_torch_compile_reduce_overhead():
    """torch.compile(mode="reduce-overhead", fullgraph=True) over the module (CUDA graphs for the forward and the
    backward): the same results as the reference, step after step."""
    spec = _graph_spec(False)
    attn = compile_attention(spec, backend="triton")
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, return_lse=True), mode="reduce-overhead",
                             fullgraph=True)
    for seed in range(3):
        q, k, v = make_qkv(1, 4096, 8, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True, seed=seed)
        check_against_reference(lambda q, k, v, key_padding_mask=None, return_lse=True: compiled(q, k, v),
                                spec, q, k, v)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("causal,tail", [(True, 2000), (False, 2048), (True, 2048)])
def test_gpu_past_int32_offsets(causal, tail, poisoned, monkeypatch):
    """q, k, v with more than 2^31 elements each; compare the last segments (positions whose element offsets
    pass 2^31) against the reference on just those segments, forward and backward. (With N a multiple of 2048,
    on Hopper the Gluon kernels run it; with a ragged last segment the tl ones.)"""
    H, D = 16, 128
    N = 2 ** 31 // (H * D) + tail
    torch.cuda.empty_cache()  # earlier tests' cached blocks count as used
    free = torch.cuda.mem_get_info()[0]
    if free < 12 * N * H * D * 2:
        pytest.skip("not enough GPU memory")
    calls = record_gluon_calls(poisoned, monkeypatch)
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)), causal=causal)
    attn = compile_attention(spec, backend="triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    s0 = (N // 512) * 512 - 512                    # a multiple of every segment length: segments line up
    assert s0 * H * D > 2 ** 31
    out, lse = attn(q, k, v, return_lse=True)
    dout = torch.zeros_like(out)
    dout[:, s0:] = torch.randn(1, N - s0, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    qs, ks, vs = (t.detach()[:, s0:].double().cpu().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.attention(qs, ks, vs, spec, return_lse=True)
    assert_close(out[:, s0:], ref_out, torch.bfloat16, "out")
    assert_lse_close(lse[:, :, s0:], ref_lse, torch.bfloat16)
    ref_grads = torch.autograd.grad(ref_out, (qs, ks, vs), dout[:, s0:].double().cpu())
    terms = rounding_terms(spec, qs, ks, vs, ref_out, ref_lse, dout[:, s0:].double().cpu(),
                           score_roundoff=score_roundoff(torch.bfloat16))
    for name, a, e, t in zip("qkv", (dq, dk, dv), ref_grads, terms):
        assert_close(a[:, s0:], e, torch.bfloat16, f"grad {name}", grad=True, terms=t)
    import triton
    from dilated_compiler.lowering.triton import gluon_hopper
    hopper = torch.cuda.get_device_capability() == (9, 0) and triton.__version__.startswith(gluon_hopper.CHECKED_TRITON)
    expected = [(1, N, H, D)] if hopper and tail == 2048 else []
    assert calls == {"fwd": expected, "dq": expected, "dkdv": expected}
