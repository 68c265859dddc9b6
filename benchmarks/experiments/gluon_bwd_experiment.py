"""Experiment: warp-specialised Gluon backward kernels for Hopper (dk/dv, and dq with delta), built like the
lowering's Gluon forward (dilated_compiler/lowering/triton/gluon_hopper.py), against the generated tl
dilated_bwd_dkdv and dilated_bwd_dq.

Result (H100, four-branch grouped 64K, bf16; benchmarks/results/H100-triton.md): all correct on the first run;
dq 1.142 ms at 232 registers (tl 1.263), dk/dv 1.947 ms with S^T and dP^T together at 240 (tl 2.193). Both went
into the lowering as gluon_bwd_dq and gluon_bwd_dkdv; the lowering's dk/dv has changed since
(benchmarks/experiments/gluon_dkdv_experiment.py).

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

dq (gluon_dq): persistent over 128-row query tiles, two consumer warpgroups of 64 rows each; the producer copies
each tile's Q, dO and O, then K/V tiles of 64 rows into a ring; each consumer computes delta = rowsum(dO * O)
of its rows from shared memory (and stores it for dk/dv), then per key step S = Q K^T and dP = dO V^T together,
P = exp2(S * qk_scale - lse), dS = P (dP - delta), dQ += dS K. It runs before dk/dv, as in the lowering.

    PYTHONPATH=. python benchmarks/experiments/gluon_bwd_experiment.py [--check-compile]

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

from dilated_compiler import AttentionSpec, Branch
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton.diskcache import load_module

FOUR = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))))

# The forward's helpers, from the lowering's Gluon source (the same text the lowering writes to its disk cache):
# _branch_desc (a branch's (B, r*H, N/r, D) view), _copy_in / _copy_out (a TMA copy through the tile's branch's
# descriptor), _tile_coords (a tile's branch, combo and view row), NCOLS.
_fwd = load_module(f"gluon_fwd_helpers_{gluon_hopper.source_fingerprint()}", gluon_hopper.gluon_source(FOUR, {}))
_branch_desc, _copy_in, _copy_out, _tile_coords = _fwd._branch_desc, _fwd._copy_in, _fwd._copy_out, _fwd._tile_coords
NCOLS = _fwd.NCOLS


@gluon.jit
def _dkdv_producer(q0, q1, q2, q3, o0, o1, o2, o3, k0, k1, k2, k3, v0, v1, v2, v3, dk0, dk1, dk2, dk3, dv0, dv1, dv2,
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
def _dkdv_consumer(dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale, stride_lb,
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
        (_dkdv_consumer, (dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale,
                     stride_lb, stride_lh, k_smem, v_smem, q_smem, do_smem, dk_smem, dv_smem, kv_ready, kv_empty,
                     qd_ready, qd_empty, 0, HEAD_DIM, HALF, BLOCK_M, STAGES, TOGETHER)),
        (_dkdv_consumer, (dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale,
                     stride_lb, stride_lh, k_smem, v_smem, q_smem, do_smem, dk_smem, dv_smem, kv_ready, kv_empty,
                     qd_ready, qd_empty, 1, HEAD_DIM, HALF, BLOCK_M, STAGES, TOGETHER)),
        (_dkdv_producer, (q0, q1, q2, q3, o0, o1, o2, o3, k0, k1, k2, k3, v0, v1, v2, v3, dk0, dk1, dk2, dk3, dv0, dv1,
                     dv2, dv3, TABLE, RB, T, H, k_smem, v_smem, q_smem, do_smem, z_smem, kv_ready, kv_empty,
                     qd_ready, qd_empty, BLOCK_M, HALF, STAGES, ZFILL)),
    ], [4, 4], [CONSUMER_REGS, 512 - 2 * CONSUMER_REGS])


SIGNATURE = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "DK": "*bf16", "DV": "*bf16", "LSE": "*fp32",
             "DELTA": "*fp32", "TABLE": "*i32", "RB": "*i32", "T": "i32", "B": "i32", "N": "i32", "H": "i32",
             "qk_scale": "fp32", "sm_scale": "fp32", "stride_b": "i64", "stride_lb": "i32", "stride_lh": "i32",
             "HEAD_DIM": "constexpr", "BLOCK_N": "constexpr", "BLOCK_M": "constexpr", "STAGES": "constexpr",
             "ZFILL": "constexpr", "TOGETHER": "constexpr", "CONSUMER_REGS": "constexpr", "num_warps": "constexpr"}


# ---------------------------------------------------------------------------------------------------------------
# dq (and delta), the same way: persistent over 128-row query tiles, two consumer warpgroups of 64 rows each, a
# producer warpgroup copying each tile's Q, dO and O, then K/V tiles of 64 rows into a ring.

@gluon.jit
def _dq_producer(q0, q1, q2, q3, do0, do1, do2, do3, out0, out1, out2, out3, k0, k1, k2, k3, v0, v1, v2, v3, dq0,
                 dq1, dq2, dq3, TABLE, RB, T, H, q_smem, do_smem, o_smem, k_smem, v_smem, z_smem, t_ready, t_empty,
                 kv_ready, kv_empty, BLOCK_N: gl.constexpr, HALF: gl.constexpr, STAGES: gl.constexpr,
                 ZFILL: gl.constexpr):
    b = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    n_mine = (T - pid + G - 1) // G
    c = 0
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        br, combo, rbase = _tile_coords(row, RB, H)
        row0 = gl.load(row + 4)
        n_k = gl.cdiv(gl.load(row + 3), BLOCK_N)
        mbarrier.wait(t_empty, (i & 1) ^ 1)
        _copy_in(q0, q1, q2, q3, br, b, combo, rbase + row0, t_ready, q_smem, True)
        _copy_in(do0, do1, do2, do3, br, b, combo, rbase + row0, t_ready, do_smem, True)
        _copy_in(out0, out1, out2, out3, br, b, combo, rbase + row0, t_ready, o_smem, True)
        for j in range(n_k):
            g = c + j
            st = g % STAGES
            mbarrier.wait(kv_empty.index(st), ((g // STAGES) & 1) ^ 1)
            _copy_in(k0, k1, k2, k3, br, b, combo, rbase + j * BLOCK_N, kv_ready.index(st), k_smem.index(st), True)
            _copy_in(v0, v1, v2, v3, br, b, combo, rbase + j * BLOCK_N, kv_ready.index(st), v_smem.index(st), True)
        c += n_k
        if ZFILL:
            r = gl.load(RB + br)
            own = gl.load(row + 2) % r
            for o in range(0, r):
                if o != own:
                    zc = o * H + gl.load(row + 0)
                    for half in gl.static_range(2):
                        _copy_out(dq0, dq1, dq2, dq3, br, b, zc, rbase + row0 + half * HALF, z_smem)
    tma.store_wait(0)


@gluon.jit
def _dq_consumer(dq0, dq1, dq2, dq3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale, stride_lb, stride_lh, q_smem,
                 do_smem, o_smem, k_smem, v_smem, dq_smem, t_ready, t_empty, kv_ready, kv_empty, WG: gl.constexpr,
                 HEAD_DIM: gl.constexpr, HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
    # S, dP: (HALF queries, BLOCK_N keys); dQ: (HALF queries, HEAD_DIM)
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, HEAD_DIM, 16])
    op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, s_l)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    b = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    n_mine = (T - pid + G - 1) // G
    q_half = q_smem.slice(WG * HALF, HALF)
    do_half = do_smem.slice(WG * HALF, HALF)
    o_half = o_smem.slice(WG * HALF, HALF)
    dq_out = dq_smem.index(WG)
    c = 0
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        br, combo, rbase = _tile_coords(row, RB, H)
        head = gl.load(row + 0)
        pos0 = gl.load(row + 2)
        L = gl.load(row + 3)
        row0 = gl.load(row + 4) + WG * HALF
        r = gl.load(RB + br)
        n_k = gl.cdiv(L, BLOCK_N)
        offs = b.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh + pos0 + (row0 + gl.arange(0, HALF,
                                                                                                     layout=rows_l)) * r
        lse = gl.load(LSE + offs)
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        mbarrier.wait(t_ready, i & 1)
        # delta = rowsum(dO * O) of these rows, for this kernel and for dk/dv
        prod = do_half.load(blk).to(gl.float32) * o_half.load(blk).to(gl.float32)
        delta = gl.convert_layout(gl.sum(prod, axis=1), rows_l)
        gl.store(DELTA + offs, delta)
        dq = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
        for j in range(n_k):
            g = c + j
            st = g % STAGES
            mbarrier.wait(kv_ready.index(st), (g // STAGES) & 1)
            k_t = k_smem.index(st)
            s_tok = warpgroup_mma(q_half, k_t.permute((1, 0)), gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l),
                                  use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(do_half, v_smem.index(st).permute((1, 0)),
                                   gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
            dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
            ds = p * (dp - gl.expand_dims(delta, 1))
            dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_l), k_t, dq, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq, ))
            mbarrier.arrive(kv_empty.index(st), count=1)
        mbarrier.arrive(t_empty, count=1)
        c += n_k
        tma.store_wait(0)
        dq_out.store((dq * sm_scale).to(dtype))
        fence_async_shared()
        _copy_out(dq0, dq1, dq2, dq3, br, b, combo, rbase + row0, dq_out)
    tma.store_wait(0)


@gluon.jit
def gluon_dq(Q, K, V, DO, OUT, DQ, LSE, DELTA, TABLE, RB, T, B, N, H, qk_scale, sm_scale, stride_b, stride_lb,
             stride_lh, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
             ZFILL: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    dtype: gl.constexpr = Q.dtype.element_ty
    HALF: gl.constexpr = BLOCK_M // 2
    q0 = _branch_desc(Q, RB, 0, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    q1 = _branch_desc(Q, RB, 1, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    q2 = _branch_desc(Q, RB, 2, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    q3 = _branch_desc(Q, RB, 3, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    do0 = _branch_desc(DO, RB, 0, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    do1 = _branch_desc(DO, RB, 1, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    do2 = _branch_desc(DO, RB, 2, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    do3 = _branch_desc(DO, RB, 3, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    out0 = _branch_desc(OUT, RB, 0, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    out1 = _branch_desc(OUT, RB, 1, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    out2 = _branch_desc(OUT, RB, 2, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    out3 = _branch_desc(OUT, RB, 3, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    k0 = _branch_desc(K, RB, 0, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    k1 = _branch_desc(K, RB, 1, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    k2 = _branch_desc(K, RB, 2, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    k3 = _branch_desc(K, RB, 3, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    v0 = _branch_desc(V, RB, 0, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    v1 = _branch_desc(V, RB, 1, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    v2 = _branch_desc(V, RB, 2, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    v3 = _branch_desc(V, RB, 3, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    dq0 = _branch_desc(DQ, RB, 0, B, N, H, stride_b, HALF, HEAD_DIM)
    dq1 = _branch_desc(DQ, RB, 1, B, N, H, stride_b, HALF, HEAD_DIM)
    dq2 = _branch_desc(DQ, RB, 2, B, N, H, stride_b, HALF, HEAD_DIM)
    dq3 = _branch_desc(DQ, RB, 3, B, N, H, stride_b, HALF, HEAD_DIM)
    m_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    n_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    h_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    o_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], n_sl)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], n_sl)
    dq_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], h_sl)
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    z_smem = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], h_sl, value=gl.zeros([HALF, HEAD_DIM], dtype, zl))
    fence_async_shared()
    t_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    t_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # "ready" phases take all their copies (Q, dO, O; K, V), each arriving once with its byte count
    mbarrier.init(t_ready, count=3)
    mbarrier.init(t_empty, count=2)
    for st in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(st), count=2)
        mbarrier.init(kv_empty.index(st), count=2)
    gl.warp_specialize([
        (_dq_consumer, (dq0, dq1, dq2, dq3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale, stride_lb, stride_lh,
                        q_smem, do_smem, o_smem, k_smem, v_smem, dq_smem, t_ready, t_empty, kv_ready, kv_empty, 0,
                        HEAD_DIM, HALF, BLOCK_N, STAGES)),
        (_dq_consumer, (dq0, dq1, dq2, dq3, LSE, DELTA, TABLE, RB, T, H, qk_scale, sm_scale, stride_lb, stride_lh,
                        q_smem, do_smem, o_smem, k_smem, v_smem, dq_smem, t_ready, t_empty, kv_ready, kv_empty, 1,
                        HEAD_DIM, HALF, BLOCK_N, STAGES)),
        (_dq_producer, (q0, q1, q2, q3, do0, do1, do2, do3, out0, out1, out2, out3, k0, k1, k2, k3, v0, v1, v2, v3,
                        dq0, dq1, dq2, dq3, TABLE, RB, T, H, q_smem, do_smem, o_smem, k_smem, v_smem, z_smem,
                        t_ready, t_empty, kv_ready, kv_empty, BLOCK_N, HALF, STAGES, ZFILL)),
    ], [4, 4], [CONSUMER_REGS, 512 - 2 * CONSUMER_REGS])


DQ_SIGNATURE = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "OUT": "*bf16", "DQ": "*bf16",
                "LSE": "*fp32", "DELTA": "*fp32", "TABLE": "*i32", "RB": "*i32", "T": "i32", "B": "i32", "N": "i32",
                "H": "i32", "qk_scale": "fp32", "sm_scale": "fp32", "stride_b": "i64", "stride_lb": "i32",
                "stride_lh": "i32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                "STAGES": "constexpr", "ZFILL": "constexpr", "CONSUMER_REGS": "constexpr", "num_warps": "constexpr"}


def check_compile():
    """Compile each variant for sm_90a and count spill instructions (STL/LDL) in the SASS: between the matrix
    instructions of a step (HGMMA runs with no branch between them) and elsewhere."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    tools = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/"

    def report(label, fn, sig, consts):
        src = GluonASTSource(fn, sig, constexprs={(list(sig).index(k), ): v for k, v in consts.items()})
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except Exception as e:  # e.g. out of shared memory
            print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            return
        with tempfile.TemporaryDirectory() as d:
            with open(f"{d}/k.cubin", "wb") as f:
                f.write(k.asm["cubin"])
            sass = subprocess.run([tools + "nvdisasm", "-c", f"{d}/k.cubin"], capture_output=True,
                                  text=True).stdout.splitlines()
        marks = "".join("M" if "HGMMA" in ln else "S" if ("STL" in ln or "LDL" in ln) else "B"
                        for ln in sass if "HGMMA" in ln or "STL" in ln or "LDL" in ln or "BRA" in ln)
        between = sum(run.count("S") for run in re.findall(r"M[MS]*M", marks))
        print(f"{label}: shared {k.metadata.shared} B, HGMMA {marks.count('M')}, spill instructions among a "
              f"step's HGMMAs {between}, elsewhere {marks.count('S') - between}")

    for together, regs in ((True, 240), (True, 232), (False, 240), (False, 232)):
        report(f"dk/dv, S^T and dP^T together={together}, consumer regs {regs}", gluon_dkdv, SIGNATURE,
               {"HEAD_DIM": 128, "BLOCK_N": 128, "BLOCK_M": 64, "STAGES": 2, "ZFILL": True, "TOGETHER": together,
                "CONSUMER_REGS": regs, "num_warps": 4})
    for stages, regs in ((2, 240), (2, 232)):  # 3 stages need 246 KB of shared memory, over the 227 KB limit
        report(f"dq, K/V stages {stages}, consumer regs {regs}", gluon_dq, DQ_SIGNATURE,
               {"HEAD_DIM": 128, "BLOCK_M": 128, "BLOCK_N": 64, "STAGES": stages, "ZFILL": True,
                "CONSUMER_REGS": regs, "num_warps": 4})


def run_gpu():
    import torch
    from triton.testing import do_bench

    from dilated_compiler import build_plan
    from dilated_compiler.lowering.triton import lowering as tl_lowering
    from dilated_compiler.lowering.triton.autotune import TileConfig
    from dilated_compiler.lowering.triton.tables import tile_table

    H, D, N = 16, 128, 65536
    spec = FOUR
    plan = build_plan(spec, N, H, D)
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    kpm = torch.zeros(1, dtype=torch.uint8, device="cuda")
    out, lse, _ = low.forward(q, k, v)
    qk_scale = low.scale * 1.4426950408889634
    rb = torch.tensor(gluon_hopper.padded_dilations(spec), dtype=torch.int32, device="cuda")
    tl_lowering._ensure_allocator()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []

    def bench(name, fn, flops, check):
        try:
            fn()
            torch.cuda.synchronize()
            err = check()
            rows.append((name, do_bench(fn, warmup=10, rep=50, return_mode="median"), flops, err))
        except Exception as e:
            rows.append((name, math.nan, flops, f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"))
        print(rows[-1], flush=True)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    # the generated kernels (references): dq with delta, then dk/dv
    ref_dq, ref_delta = torch.zeros_like(q), torch.zeros_like(lse)
    ref_dk, ref_dv = torch.zeros_like(k), torch.zeros_like(v)
    bench("generated dilated_bwd_dq 128x64/w8/s3/ptr (with delta)",
          lambda: low._launch_dq(TileConfig(128, 64, 8, 3, False), q, k, v, kpm, False, dout, out, None, lse,
                                 ref_delta, ref_dq, False), plan.flops_backward * 3 / 5, lambda: 0.0)
    bench("generated dilated_bwd_dkdv 64x32/w4/s3",
          lambda: low._launch_dkdv(TileConfig(64, 32, 4, 3), q, k, v, kpm, False, dout, lse, ref_delta, ref_dk,
                                   ref_dv, False), plan.flops_backward * 4 / 5, lambda: 0.0)
    # Gluon dq (and delta): outputs poisoned with NaN (delta keeps its values on rows no tile selects: none here)
    q_table = tile_table(plan, "q", 128, 64).cuda()
    dq, delta = torch.full_like(q, float("nan")), torch.full_like(lse, float("nan"))
    for regs in (240, 232):
        bench(f"gluon dq (with delta), consumer regs {regs}",
              lambda: gluon_dq[(min(sms, q_table.shape[0]), 1)](
                  q, k, v, dout, out, dq, lse, delta, q_table, rb, q_table.shape[0], 1, N, H, qk_scale, low.scale,
                  q.stride(0), lse.stride(0), lse.stride(1), HEAD_DIM=D, BLOCK_M=128, BLOCK_N=64, STAGES=2,
                  ZFILL=True, CONSUMER_REGS=regs, num_warps=4),
              plan.flops_backward * 3 / 5, lambda: max(rel(dq, ref_dq), rel(delta, ref_delta)))
    # Gluon dk/dv, reading the Gluon delta
    k_table = tile_table(plan, "k", 128, 64).cuda()
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    for together, regs in ((True, 240), (False, 240), (True, 232)):
        bench(f"gluon dk/dv, S^T and dP^T together={together}, consumer regs {regs}",
              lambda: gluon_dkdv[(min(sms, k_table.shape[0]), 1)](
                  q, k, v, dout, dk, dv, lse, delta, k_table, rb, k_table.shape[0], 1, N, H, qk_scale, low.scale,
                  q.stride(0), lse.stride(0), lse.stride(1), HEAD_DIM=D, BLOCK_N=128, BLOCK_M=64, STAGES=2,
                  ZFILL=True, TOGETHER=together, CONSUMER_REGS=regs, num_warps=4),
              plan.flops_backward * 4 / 5, lambda: max(rel(dk, ref_dk), rel(dv, ref_dv)))
    print(f"\n{torch.cuda.get_device_name()}: backward kernels, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| variant | ms | TFLOP/s of its matmuls | err against the generated kernels (NaN: unwritten) |")
    print("|---|---|---|---|")
    for name, ms, flops, err in rows:
        print(f"| {name} | {ms:.3f} | {float(flops) / ms / 1e9:.0f} | "
              f"{err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-compile", action="store_true")
    if ap.parse_args().check_compile:
        check_compile()
    else:
        run_gpu()
