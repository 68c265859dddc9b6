"""Experiment (prepared, not yet run on a GPU): a warp-specialised Gluon dk/dv kernel for Hopper, built like the
lowering's Gluon forward (dilated_compiler/lowering/triton/gluon_hopper.py), against the generated tl
dilated_bwd_dkdv.

Why: under ncu (benchmarks/profile_kernels.py, H100) the generated dk/dv kernel keeps the tensor pipe busy 43%
of the time (2.15 ms of the four-branch 64K backward's 3.5 ms), cuDNN's backward 63%. The forward went from 50%
to about 80% of cuDNN-level busy with this structure.

Structure (grouped, non-causal, no key padding, D = 128, segments of whole 128-row tiles, as gluon_fwd):
* persistent over the key-tile table (128 keys per tile, query steps of 64 rows);
* a producer warpgroup issues TMA copies: each tile's K and V (128 rows, single buffer, refilled once both
  consumers are done with the tile), then its query steps' Q and dO into a 2-deep ring;
* two consumer warpgroups, 64 keys each, per query step: S^T = K Q^T, P^T = exp2(S^T * qk_scale - lse),
  dP^T = V dO^T, dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q. TOGETHER issues S^T and dP^T together
  so that the softmax runs while dP^T is computed (FA3's order); without it S^T runs alone and dP^T goes with
  dV (the other consumer's products can fill the gap). lse and delta of the step's 64 queries are read with
  pointer loads, issued before the products;
* epilogue per tile: dK * scale and dV through shared memory and TMA stores; the producer writes the zeros of the
  key positions the tile's branch does not select (TMA stores of a zero tile), so dK and dV need no memset;
* descriptors per branch made once per program over x viewed as (B, r*H, N/r, D).

delta = rowsum(dO * O) comes from the generated dilated_bwd_dq, which runs first as in the lowering.

    PYTHONPATH=. python benchmarks/gluon_bwd_experiment.py [--check-compile]

--check-compile compiles the variants for sm_90a without a GPU (triton 3.6 with Gluon) and counts spills in
their SASS. On the CPU machine (triton 3.6.0): 48 HGMMA; with 240 registers per consumer 0-1 spill instructions
among a step's matrix instructions (232: 34-35), and 173-176 elsewhere (per-tile setup, the producer, which
holds 24 descriptors in 32 registers, and epilogues). Whether it is correct and fast is for a GPU run to say.
"""

from __future__ import annotations

import argparse
import math

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

NCOLS = gl.constexpr(11)  # columns of the tile table (dilated_compiler.lowering.triton.tables.NCOLS)


@gluon.jit
def _branch_desc(X, RB, i: gl.constexpr, B, N, H, stride_b, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    # x (B, N, H, D) viewed as (B, r*H, N/r, D) for branch i (RB padded with the first branch's dilation)
    r = gl.load(RB + i)
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, ROWS, HEAD_DIM], X.dtype.element_ty)
    return tma.make_tensor_descriptor(X, [B, r * H, N // r, HEAD_DIM], [stride_b, HEAD_DIM, r * H * HEAD_DIM, 1],
                                      [1, 1, ROWS, HEAD_DIM], layout)


@gluon.jit
def _copy_in(d0, d1, d2, d3, branch, b, combo, row, bar, smem, pred):
    dst = smem._reinterpret(smem.dtype, d0.block_type.shape, d0.layout)
    mbarrier.expect(bar, d0.block_type.nbytes, pred=pred)
    if branch == 0:
        tma.async_copy_global_to_shared(d0, [b, combo, row, 0], bar, dst, pred=pred)
    elif branch == 1:
        tma.async_copy_global_to_shared(d1, [b, combo, row, 0], bar, dst, pred=pred)
    elif branch == 2:
        tma.async_copy_global_to_shared(d2, [b, combo, row, 0], bar, dst, pred=pred)
    else:
        tma.async_copy_global_to_shared(d3, [b, combo, row, 0], bar, dst, pred=pred)


@gluon.jit
def _copy_out(d0, d1, d2, d3, branch, b, combo, row, smem):
    src = smem._reinterpret(smem.dtype, d0.block_type.shape, d0.layout)
    if branch == 0:
        tma.async_copy_shared_to_global(d0, [b, combo, row, 0], src)
    elif branch == 1:
        tma.async_copy_shared_to_global(d1, [b, combo, row, 0], src)
    elif branch == 2:
        tma.async_copy_shared_to_global(d2, [b, combo, row, 0], src)
    else:
        tma.async_copy_shared_to_global(d3, [b, combo, row, 0], src)


@gluon.jit
def _tile_coords(row, RB, H):
    head = gl.load(row + 0)
    branch = gl.load(row + 1)
    pos0 = gl.load(row + 2)
    r = gl.load(RB + branch)
    return branch, (pos0 % r) * H + head, pos0 // r


@gluon.jit
def _producer(q0, q1, q2, q3, o0, o1, o2, o3, k0, k1, k2, k3, v0, v1, v2, v3, dk0, dk1, dk2, dk3, dv0, dv1, dv2,
              dv3, TABLE, RB, T, H, k_smem, v_smem, q_smem, do_smem, z_smem, kv_ready, kv_empty, qd_ready, qd_empty,
              BLOCK_M: gl.constexpr, HALF: gl.constexpr, STAGES: gl.constexpr, ZFILL: gl.constexpr):
    b = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    n_mine = (T - pid + G - 1) // G
    c = 0
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        br, combo, rbase = _tile_coords(row, RB, H)
        row0 = gl.load(row + 4)
        n_m = gl.cdiv(gl.load(row + 3), BLOCK_M)
        mbarrier.wait(kv_empty, (i & 1) ^ 1)
        _copy_in(k0, k1, k2, k3, br, b, combo, rbase + row0, kv_ready, k_smem, True)
        _copy_in(v0, v1, v2, v3, br, b, combo, rbase + row0, kv_ready, v_smem, True)
        for j in range(n_m):
            g = c + j
            st = g % STAGES
            mbarrier.wait(qd_empty.index(st), ((g // STAGES) & 1) ^ 1)
            _copy_in(q0, q1, q2, q3, br, b, combo, rbase + j * BLOCK_M, qd_ready.index(st), q_smem.index(st), True)
            _copy_in(o0, o1, o2, o3, br, b, combo, rbase + j * BLOCK_M, qd_ready.index(st), do_smem.index(st),
                     True)
        c += n_m
        if ZFILL:
            # the key positions of this tile's span that its branch does not select: combos o*H + h, o != own
            r = gl.load(RB + br)
            own = gl.load(row + 2) % r
            for o in range(0, r):
                if o != own:
                    zc = o * H + gl.load(row + 0)
                    for half in gl.static_range(2):
                        _copy_out(dk0, dk1, dk2, dk3, br, b, zc, rbase + row0 + half * HALF, z_smem)
                        _copy_out(dv0, dv1, dv2, dv3, br, b, zc, rbase + row0 + half * HALF, z_smem)
    tma.store_wait(0)


@gluon.jit
def _consumer(dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale, stride_lb,
              stride_lh, k_smem, v_smem, q_smem, do_smem, dk_smem, dv_smem, kv_ready, kv_empty, qd_ready, qd_empty,
              WG: gl.constexpr, HEAD_DIM: gl.constexpr, HALF: gl.constexpr, BLOCK_M: gl.constexpr,
              STAGES: gl.constexpr, TOGETHER: gl.constexpr):
    dtype: gl.constexpr = k_smem.dtype
    # S^T, dP^T: (HALF keys, BLOCK_M queries); dK, dV: (HALF keys, HEAD_DIM)
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, HEAD_DIM, 16])
    op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)
    b = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    n_mine = (T - pid + G - 1) // G
    k_half = k_smem.slice(WG * HALF, HALF)
    v_half = v_smem.slice(WG * HALF, HALF)
    dk_out = dk_smem.index(WG)
    dv_out = dv_smem.index(WG)
    c = 0
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        br, combo, rbase = _tile_coords(row, RB, H)
        head = gl.load(row + 0)
        pos0 = gl.load(row + 2)
        L = gl.load(row + 3)
        row0 = gl.load(row + 4) + WG * HALF
        r = gl.load(RB + br)
        n_m = gl.cdiv(L, BLOCK_M)
        l_base = LSE + b.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh + pos0
        d_base = DELTA + b.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh + pos0
        dk = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
        dv = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
        mbarrier.wait(kv_ready, i & 1)
        for j in range(n_m):
            g = c + j
            st = g % STAGES
            cols = j * BLOCK_M + gl.arange(0, BLOCK_M, layout=cols_l)
            lse = gl.load(l_base + cols * r)
            delta = gl.load(d_base + cols * r)
            mbarrier.wait(qd_ready.index(st), (g // STAGES) & 1)
            q_t = q_smem.index(st)
            do_t = do_smem.index(st)
            if TOGETHER:
                # S^T and dP^T issued together; the softmax of S^T runs while dP^T is computed (FA3's order)
                st_tok = warpgroup_mma(k_half, q_t.permute((1, 0)),
                                       gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_l), use_acc=False,
                                       is_async=True)
                dpt_tok = warpgroup_mma(v_half, do_t.permute((1, 0)),
                                        gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_l), use_acc=False,
                                        is_async=True)
                s_t = warpgroup_mma_wait(1, deps=(st_tok, ))
                lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse2, 0))
                dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_l), do_t, dv, is_async=True)
                dp_t = warpgroup_mma_wait(1, deps=(dpt_tok, ))
            else:
                # S^T alone, then its softmax (the other consumer's products can run meanwhile); then dP^T and
                # dV += P^T dO together
                st_tok = warpgroup_mma(k_half, q_t.permute((1, 0)),
                                       gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_l), use_acc=False,
                                       is_async=True)
                s_t = warpgroup_mma_wait(0, deps=(st_tok, ))
                lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse2, 0))
                dpt_tok = warpgroup_mma(v_half, do_t.permute((1, 0)),
                                        gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_l), use_acc=False,
                                        is_async=True)
                dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_l), do_t, dv, is_async=True)
                dp_t = warpgroup_mma_wait(1, deps=(dpt_tok, ))
            ds_t = p_t * (dp_t - gl.expand_dims(delta, 0))
            dk = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_l), q_t, dk, is_async=True)
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
            mbarrier.arrive(qd_empty.index(st), count=1)
        mbarrier.arrive(kv_empty, count=1)
        c += n_m
        tma.store_wait(0)
        dk_out.store((dk * sm_scale).to(dtype))
        dv_out.store(dv.to(dtype))
        fence_async_shared()
        _copy_out(dk0, dk1, dk2, dk3, br, b, combo, rbase + row0, dk_out)
        _copy_out(dv0, dv1, dv2, dv3, br, b, combo, rbase + row0, dv_out)
    tma.store_wait(0)


@gluon.jit
def gluon_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, TABLE, RB, T, B, N, H, qk_scale, sm_scale, stride_b, stride_lb,
               stride_lh, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
               STAGES: gl.constexpr, ZFILL: gl.constexpr, TOGETHER: gl.constexpr, CONSUMER_REGS: gl.constexpr,
               num_warps: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    HALF: gl.constexpr = BLOCK_N // 2
    q0 = _branch_desc(Q, RB, 0, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    q1 = _branch_desc(Q, RB, 1, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    q2 = _branch_desc(Q, RB, 2, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    q3 = _branch_desc(Q, RB, 3, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    o0 = _branch_desc(DO, RB, 0, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    o1 = _branch_desc(DO, RB, 1, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    o2 = _branch_desc(DO, RB, 2, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    o3 = _branch_desc(DO, RB, 3, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    k0 = _branch_desc(K, RB, 0, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    k1 = _branch_desc(K, RB, 1, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    k2 = _branch_desc(K, RB, 2, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    k3 = _branch_desc(K, RB, 3, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    v0 = _branch_desc(V, RB, 0, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    v1 = _branch_desc(V, RB, 1, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    v2 = _branch_desc(V, RB, 2, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    v3 = _branch_desc(V, RB, 3, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    dk0 = _branch_desc(DK, RB, 0, B, N, H, stride_b, HALF, HEAD_DIM)
    dk1 = _branch_desc(DK, RB, 1, B, N, H, stride_b, HALF, HEAD_DIM)
    dk2 = _branch_desc(DK, RB, 2, B, N, H, stride_b, HALF, HEAD_DIM)
    dk3 = _branch_desc(DK, RB, 3, B, N, H, stride_b, HALF, HEAD_DIM)
    dv0 = _branch_desc(DV, RB, 0, B, N, H, stride_b, HALF, HEAD_DIM)
    dv1 = _branch_desc(DV, RB, 1, B, N, H, stride_b, HALF, HEAD_DIM)
    dv2 = _branch_desc(DV, RB, 2, B, N, H, stride_b, HALF, HEAD_DIM)
    dv3 = _branch_desc(DV, RB, 3, B, N, H, stride_b, HALF, HEAD_DIM)
    n_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    m_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    h_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], n_sl)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], n_sl)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], m_sl)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], m_sl)
    dk_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], h_sl)
    dv_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], h_sl)
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    z_smem = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], h_sl, value=gl.zeros([HALF, HEAD_DIM], dtype, zl))
    fence_async_shared()
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qd_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qd_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # a "ready" phase takes two copies (K and V; Q and dO), each arriving once with its byte count
    mbarrier.init(kv_ready, count=2)
    mbarrier.init(kv_empty, count=2)
    for st in gl.static_range(STAGES):
        mbarrier.init(qd_ready.index(st), count=2)
        mbarrier.init(qd_empty.index(st), count=2)
    gl.warp_specialize([
        (_consumer, (dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale,
                     stride_lb, stride_lh, k_smem, v_smem, q_smem, do_smem, dk_smem, dv_smem, kv_ready, kv_empty,
                     qd_ready, qd_empty, 0, HEAD_DIM, HALF, BLOCK_M, STAGES, TOGETHER)),
        (_consumer, (dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale,
                     stride_lb, stride_lh, k_smem, v_smem, q_smem, do_smem, dk_smem, dv_smem, kv_ready, kv_empty,
                     qd_ready, qd_empty, 1, HEAD_DIM, HALF, BLOCK_M, STAGES, TOGETHER)),
        (_producer, (q0, q1, q2, q3, o0, o1, o2, o3, k0, k1, k2, k3, v0, v1, v2, v3, dk0, dk1, dk2, dk3, dv0, dv1,
                     dv2, dv3, TABLE, RB, T, H, k_smem, v_smem, q_smem, do_smem, z_smem, kv_ready, kv_empty,
                     qd_ready, qd_empty, BLOCK_M, HALF, STAGES, ZFILL)),
    ], [4, 4], [CONSUMER_REGS, 512 - 2 * CONSUMER_REGS])


SIGNATURE = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "DK": "*bf16", "DV": "*bf16", "LSE": "*fp32",
             "DELTA": "*fp32", "TABLE": "*i32", "RB": "*i32", "T": "i32", "B": "i32", "N": "i32", "H": "i32",
             "qk_scale": "fp32", "sm_scale": "fp32", "stride_b": "i64", "stride_lb": "i32", "stride_lh": "i32",
             "HEAD_DIM": "constexpr", "BLOCK_N": "constexpr", "BLOCK_M": "constexpr", "STAGES": "constexpr",
             "ZFILL": "constexpr", "TOGETHER": "constexpr", "CONSUMER_REGS": "constexpr", "num_warps": "constexpr"}


def check_compile():
    """Compile each variant for sm_90a and count spill instructions (STL/LDL) in the SASS: between the matrix
    instructions of a query step (HGMMA runs with no branch between them) and elsewhere."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    tools = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/"
    for together, regs in ((True, 240), (True, 232), (False, 240), (False, 232)):
        consts = {"HEAD_DIM": 128, "BLOCK_N": 128, "BLOCK_M": 64, "STAGES": 2, "ZFILL": True, "TOGETHER": together,
                  "CONSUMER_REGS": regs, "num_warps": 4}
        src = GluonASTSource(gluon_dkdv, SIGNATURE,
                             constexprs={(list(SIGNATURE).index(k), ): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        with tempfile.TemporaryDirectory() as d:
            with open(f"{d}/k.cubin", "wb") as f:
                f.write(k.asm["cubin"])
            sass = subprocess.run([tools + "nvdisasm", "-c", f"{d}/k.cubin"], capture_output=True,
                                  text=True).stdout.splitlines()
        marks = "".join("M" if "HGMMA" in ln else "S" if ("STL" in ln or "LDL" in ln) else "B"
                        for ln in sass if "HGMMA" in ln or "STL" in ln or "LDL" in ln or "BRA" in ln)
        between = sum(run.count("S") for run in re.findall(r"M[MS]*M", marks))
        print(f"S^T and dP^T together={together}, consumer regs {regs}: shared {k.metadata.shared} B, "
              f"HGMMA {marks.count('M')}, spill instructions among a step's HGMMAs {between}, "
              f"elsewhere {marks.count('S') - between}")


def run_gpu():
    import torch
    from triton.testing import do_bench

    from dilated_compiler import AttentionSpec, Branch, build_plan
    from dilated_compiler.lowering.triton import gluon_hopper
    from dilated_compiler.lowering.triton import lowering as tl_lowering
    from dilated_compiler.lowering.triton.autotune import TileConfig
    from dilated_compiler.lowering.triton.tables import tile_table

    H, D, N = 16, 128, 65536
    spec = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))))
    plan = build_plan(spec, N, H, D)
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    kpm = torch.zeros(1, dtype=torch.uint8, device="cuda")
    out, lse, aux = low.forward(q, k, v)
    delta = torch.empty_like(lse)
    dq = torch.zeros_like(q)
    low._launch_dq(TileConfig(128, 64, 8, 3, False), q, k, v, kpm, False, dout, out, None, lse, delta, dq, False)
    flops = float(plan.flops_backward) * 4 / 5  # of the five backward matmuls, dk/dv's pass does four
    ref_dk, ref_dv = torch.zeros_like(k), torch.zeros_like(v)
    cfg = TileConfig(64, 32, 4, 3)
    run_ref = lambda: low._launch_dkdv(cfg, q, k, v, kpm, False, dout, lse, delta, ref_dk, ref_dv,  # noqa: E731
                                       False)
    run_ref()
    rows = [("generated dilated_bwd_dkdv 64x32/w4/s3", do_bench(run_ref, warmup=10, rep=50, return_mode="median"),
             0.0)]
    table = tile_table(plan, "k", 128, 64).cuda()
    T = table.shape[0]
    rb = torch.tensor(gluon_hopper.padded_dilations(spec), dtype=torch.int32, device="cuda")
    tl_lowering._ensure_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for together, regs in ((True, 240), (False, 240), (True, 232)):
        name = f"gluon warp-specialised dk/dv, S^T and dP^T together={together}, consumer regs {regs}"
        try:
            dk = torch.full_like(k, float("nan"))
            dv = torch.full_like(v, float("nan"))

            def run():
                gluon_dkdv[(min(sms, T), 1)](
                    q, k, v, dout, dk, dv, lse, delta, table, rb, T, 1, N, H, low.scale * 1.4426950408889634,
                    low.scale, q.stride(0), lse.stride(0), lse.stride(1), HEAD_DIM=D, BLOCK_N=128, BLOCK_M=64,
                    STAGES=2, ZFILL=True, TOGETHER=together, CONSUMER_REGS=regs, num_warps=4)
            run()
            torch.cuda.synchronize()
            err = max(float((dk.float() - ref_dk.float()).norm() / ref_dk.float().norm()),
                      float((dv.float() - ref_dv.float()).norm() / ref_dv.float().norm()))
            rows.append((name, do_bench(run, warmup=10, rep=50, return_mode="median"), err))
        except Exception as e:
            rows.append((name, math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"))
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: dk/dv kernel, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| variant | ms | TFLOP/s | err (NaN: positions left unwritten) |\n|---|---|---|---|")
    for name, ms, err in rows:
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-compile", action="store_true")
    if ap.parse_args().check_compile:
        check_compile()
    else:
        run_gpu()
