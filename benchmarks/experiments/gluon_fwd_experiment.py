"""Experiment: a persistent Hopper forward kernel written in Gluon (triton.experimental.gluon), with explicit TMA
loads, mbarriers and asynchronous warpgroup MMAs, against the generated Triton dilated_fwd.

Why: a profile (benchmarks/profile_kernels.py under ncu, H100) showed the generated forward keeping the tensor
pipe busy 50% of the time on the four-branch 64K pattern (2048 keys per segment, so 16 key tiles per program),
against 73% for cuDNN's persistent, warp-specialised kernel on the same segments. Two things this kernel does
that Triton's `tl` does not let us write:

* persistence with loads that cross tile boundaries: the next tile's Q and first K/V tiles are in flight while
  the current tile finishes (its last P V product and its epilogue);
* FA3's in-warpgroup overlap: S_j = Q K_j^T is issued before P_{j-1} V_{j-1}; the softmax of S_j then runs while
  the tensor cores work on P_{j-1} V_{j-1}.

Scope of the prototype: grouped mode, non-causal, no key padding, head_dim = BLOCK_N = 128, bf16/fp16, every
segment's selected rows a multiple of BLOCK_N (the four-branch pattern at 64K has 2048 everywhere). Each
program walks tiles pid, pid + G, ... of the same tile table as dilated_fwd; per tile it makes tensor descriptors
over the segment's selected rows (row stride r * H * D), as dilated_fwd does.

    PYTHONPATH=. python benchmarks/experiments/gluon_fwd_experiment.py [--check-compile]

--check-compile compiles the kernels for sm_90a without a GPU (needs triton 3.6 with Gluon) and prints their
resource use.

Results (H100, benchmarks/results/H100-triton.md): 1.13-1.16 ms with descriptors made per tile, 1.03-1.06 ms
with per-branch host descriptors, against 1.06 ms for the generated kernel. The next step, warp specialisation
(a producer warpgroup for the copies, two consumer warpgroups of 64 rows), reached 0.775 ms in this file's run
at commit 3da13c1 and became the lowering's Gluon forward (dilated_compiler/lowering/triton/gluon_hopper.py;
benchmarks/experiments/gluon_zero_fill_experiment.py times it).
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
def _segment_desc(X, row, b, RB, stride_qb, stride_qn, stride_qh, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    # a tensor descriptor over one segment's selected rows (row j at position pos0 + j * r), ROWS-row blocks
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], X.dtype.element_ty)
    head = gl.load(row + 0)
    pos0 = gl.load(row + 2)
    L = gl.load(row + 3)
    r = gl.load(RB + gl.load(row + 1))
    base = b * stride_qb + head.to(gl.int64) * stride_qh + pos0.to(gl.int64) * stride_qn
    return tma.make_tensor_descriptor(X + base, [L, HEAD_DIM], [r.to(gl.int64) * stride_qn, 1], [ROWS, HEAD_DIM],
                                      layout)


@gluon.jit
def _prefetch(Q, K, V, row, b, RB, stride_qb, stride_qn, stride_qh, c, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar,
              pred, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    # a tile's Q and its first two K and V tiles (load indices c, c + 1), issued ahead of the tile
    q_d = _segment_desc(Q, row, b, RB, stride_qb, stride_qn, stride_qh, BLOCK_M, HEAD_DIM)
    k_d = _segment_desc(K, row, b, RB, stride_qb, stride_qn, stride_qh, BLOCK_N, HEAD_DIM)
    v_d = _segment_desc(V, row, b, RB, stride_qb, stride_qn, stride_qh, BLOCK_N, HEAD_DIM)
    mbarrier.expect(q_bar, q_d.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(q_d, [gl.load(row + 4), 0], q_bar, q_smem, pred=pred)
    for jj in gl.static_range(2):
        buf = (c + jj) % 2
        mbarrier.expect(k_bar.index(buf), k_d.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_d, [jj * BLOCK_N, 0], k_bar.index(buf), k_smem.index(buf), pred=pred)
        mbarrier.expect(v_bar.index(buf), v_d.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(v_d, [jj * BLOCK_N, 0], v_bar.index(buf), v_smem.index(buf), pred=pred)


@gluon.jit
def gluon_fwd(Q, K, V, OUT, LSE, TABLE, RB, T, qk_scale, stride_qb, stride_qn, stride_qh, stride_lb, stride_lh,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    # Loads: K tile g (g counts this program's key tiles over all its tiles) lives in k_smem[g % 2] and arrives
    # on k_bar[g % 2] with phase (g // 2) & 1; likewise V. K tile g + 2 is issued once S_g is done, V tile g + 1
    # once P_{g-1} V_{g-1} is done; a tile's Q and first two K/V tiles are issued by the tile before it, after
    # its last product, so they arrive during that tile's epilogue. (Needs >= 2 key tiles per tile.)
    # Descriptors are made at separate sites (prologue, current tile, next tile, output), and a site is made
    # again only after every copy through its previous descriptor has completed.
    dtype: gl.constexpr = Q.dtype.element_ty
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    m_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    n_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    o_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], n_sl)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], n_sl)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(2):
        mbarrier.init(k_bar.index(st), count=1)
        mbarrier.init(v_bar.index(st), count=1)

    b = gl.program_id(1).to(gl.int64)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    n_mine = (T - pid + G - 1) // G
    _prefetch(Q, K, V, TABLE + pid * NCOLS, b, RB, stride_qb, stride_qn, stride_qh, 0, q_smem, k_smem, v_smem,
              q_bar, k_bar, v_bar, n_mine > 0, HEAD_DIM, BLOCK_M, BLOCK_N)

    c = 0
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        head = gl.load(row + 0)
        pos0 = gl.load(row + 2)
        L = gl.load(row + 3)
        row0 = gl.load(row + 4)
        r = gl.load(RB + gl.load(row + 1))
        n_k = gl.cdiv(L, BLOCK_N)
        k_d = _segment_desc(K, row, b, RB, stride_qb, stride_qn, stride_qh, BLOCK_N, HEAD_DIM)
        v_d = _segment_desc(V, row, b, RB, stride_qb, stride_qn, stride_qh, BLOCK_N, HEAD_DIM)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_l)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=mma)
        mbarrier.wait(q_bar, i & 1)
        # key tile 0
        kb = c % 2
        mbarrier.wait(k_bar.index(kb), (c // 2) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(kb).permute((1, 0)), acc, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.expect(k_bar.index(kb), k_d.block_type.nbytes, pred=n_k > 2)
        tma.async_copy_global_to_shared(k_d, [2 * BLOCK_N, 0], k_bar.index(kb), k_smem.index(kb), pred=n_k > 2)
        m_i = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, axis=1)
        p_prev = gl.convert_layout(p.to(dtype), p_op)
        for j in range(1, n_k):
            g = c + j
            kb = g % 2
            vb = (g - 1) % 2
            mbarrier.wait(k_bar.index(kb), (g // 2) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(kb).permute((1, 0)), acc, use_acc=False, is_async=True)
            mbarrier.wait(v_bar.index(vb), ((g - 1) // 2) & 1)
            acc_tok = warpgroup_mma(p_prev, v_smem.index(vb), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            # S_j done: its K buffer takes key tile j + 2
            mbarrier.expect(k_bar.index(kb), k_d.block_type.nbytes, pred=j + 2 < n_k)
            tma.async_copy_global_to_shared(k_d, [(j + 2) * BLOCK_N, 0], k_bar.index(kb), k_smem.index(kb),
                                            pred=j + 2 < n_k)
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
            # P_{j-1} V_{j-1} done: its V buffer takes value tile j + 1
            mbarrier.expect(v_bar.index(vb), v_d.block_type.nbytes, pred=j + 1 < n_k)
            tma.async_copy_global_to_shared(v_d, [(j + 1) * BLOCK_N, 0], v_bar.index(vb), v_smem.index(vb),
                                            pred=j + 1 < n_k)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, rows_l), 1)
            p_prev = gl.convert_layout(p.to(dtype), p_op)
        # the last P V
        g = c + n_k - 1
        mbarrier.wait(v_bar.index(g % 2), (g // 2) & 1)
        acc_tok = warpgroup_mma(p_prev, v_smem.index(g % 2), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        c += n_k
        # every copy of this tile is done: the next tile's Q and first K/V go now, during the epilogue
        has_next = i + 1 < n_mine
        _prefetch(Q, K, V, TABLE + (pid + gl.where(has_next, i + 1, i) * G) * NCOLS, b, RB, stride_qb, stride_qn,
                  stride_qh, c, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, has_next, HEAD_DIM, BLOCK_M, BLOCK_N)
        # epilogue: out through shared memory and a TMA store (rows >= L are clipped), lse by pointers
        out = acc / gl.expand_dims(l_i, 1)
        tma.store_wait(0)
        o_d = _segment_desc(OUT, row, b, RB, stride_qb, stride_qn, stride_qh, BLOCK_M, HEAD_DIM)
        o_smem.store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_d, [row0, 0], o_smem)
        rows = row0 + gl.arange(0, BLOCK_M, layout=rows_l)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + b * stride_lb + head.to(gl.int64) * stride_lh + pos0 + rows * r, lse, mask=rows < L)
    tma.store_wait(0)
    mbarrier.invalidate(q_bar)
    for st in gl.static_range(2):
        mbarrier.invalidate(k_bar.index(st))
        mbarrier.invalidate(v_bar.index(st))


@gluon.jit
def _copy_in(d0, d1, d2, d3, branch, b, combo, row, bar, smem, pred):
    # one TMA copy of a tile of selected rows into smem (a 2-D buffer seen as the descriptor's 4-D block),
    # through the descriptor of the tile's branch
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
    # a tile's branch, its rows' index in the branch view (o * H + head) and the view row of its segment's row 0
    head = gl.load(row + 0)
    branch = gl.load(row + 1)
    pos0 = gl.load(row + 2)
    r = gl.load(RB + branch)
    return branch, (pos0 % r) * H + head, pos0 // r


@gluon.jit
def gluon_fwd_host(q0, q1, q2, q3, k0, k1, k2, k3, v0, v1, v2, v3, o0, o1, o2, o3, LSE, TABLE, RB, T, H,
                   qk_scale, stride_lb, stride_lh, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, num_warps: gl.constexpr):
    # gluon_fwd with one host-made descriptor per branch and tensor (x viewed as (B, r*H, N/r, D)): no
    # descriptor is made in the kernel. Same load schedule as gluon_fwd.
    dtype: gl.constexpr = q0.dtype
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    m_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    n_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    o_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], n_sl)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], n_sl)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for st in gl.static_range(2):
        mbarrier.init(k_bar.index(st), count=1)
        mbarrier.init(v_bar.index(st), count=1)

    b = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    n_mine = (T - pid + G - 1) // G
    # prologue: the first tile's Q and K/V tiles 0 and 1
    row = TABLE + pid * NCOLS
    br, combo, rbase = _tile_coords(row, RB, H)
    ok = n_mine > 0
    _copy_in(q0, q1, q2, q3, br, b, combo, rbase + gl.load(row + 4), q_bar, q_smem, ok)
    for jj in gl.static_range(2):
        _copy_in(k0, k1, k2, k3, br, b, combo, rbase + jj * BLOCK_N, k_bar.index(jj), k_smem.index(jj), ok)
        _copy_in(v0, v1, v2, v3, br, b, combo, rbase + jj * BLOCK_N, v_bar.index(jj), v_smem.index(jj), ok)

    c = 0
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        br, combo, rbase = _tile_coords(row, RB, H)
        head = gl.load(row + 0)
        pos0 = gl.load(row + 2)
        L = gl.load(row + 3)
        row0 = gl.load(row + 4)
        r = gl.load(RB + br)
        n_k = gl.cdiv(L, BLOCK_N)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_l)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=mma)
        mbarrier.wait(q_bar, i & 1)
        kb = c % 2
        mbarrier.wait(k_bar.index(kb), (c // 2) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(kb).permute((1, 0)), acc, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        _copy_in(k0, k1, k2, k3, br, b, combo, rbase + 2 * BLOCK_N, k_bar.index(kb), k_smem.index(kb), n_k > 2)
        m_i = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, axis=1)
        p_prev = gl.convert_layout(p.to(dtype), p_op)
        for j in range(1, n_k):
            g = c + j
            kb = g % 2
            vb = (g - 1) % 2
            mbarrier.wait(k_bar.index(kb), (g // 2) & 1)
            s_tok = warpgroup_mma(q_smem, k_smem.index(kb).permute((1, 0)), acc, use_acc=False, is_async=True)
            mbarrier.wait(v_bar.index(vb), ((g - 1) // 2) & 1)
            acc_tok = warpgroup_mma(p_prev, v_smem.index(vb), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            _copy_in(k0, k1, k2, k3, br, b, combo, rbase + (j + 2) * BLOCK_N, k_bar.index(kb), k_smem.index(kb),
                     j + 2 < n_k)
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
            _copy_in(v0, v1, v2, v3, br, b, combo, rbase + (j + 1) * BLOCK_N, v_bar.index(vb), v_smem.index(vb),
                     j + 1 < n_k)
            acc = acc * gl.expand_dims(alpha, 1)
            p_prev = gl.convert_layout(p.to(dtype), p_op)
        g = c + n_k - 1
        mbarrier.wait(v_bar.index(g % 2), (g // 2) & 1)
        acc_tok = warpgroup_mma(p_prev, v_smem.index(g % 2), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        c += n_k
        # the next tile's Q and K/V tiles 0 and 1, during this tile's epilogue
        has_next = i + 1 < n_mine
        nrow = TABLE + (pid + gl.where(has_next, i + 1, i) * G) * NCOLS
        nbr, ncombo, nrbase = _tile_coords(nrow, RB, H)
        _copy_in(q0, q1, q2, q3, nbr, b, ncombo, nrbase + gl.load(nrow + 4), q_bar, q_smem, has_next)
        for jj in gl.static_range(2):
            _copy_in(k0, k1, k2, k3, nbr, b, ncombo, nrbase + jj * BLOCK_N, k_bar.index((c + jj) % 2),
                     k_smem.index((c + jj) % 2), has_next)
            _copy_in(v0, v1, v2, v3, nbr, b, ncombo, nrbase + jj * BLOCK_N, v_bar.index((c + jj) % 2),
                     v_smem.index((c + jj) % 2), has_next)
        out = acc / gl.expand_dims(l_i, 1)
        tma.store_wait(0)
        o_smem.store(out.to(dtype))
        fence_async_shared()
        _copy_out(o0, o1, o2, o3, br, b, combo, rbase + row0, o_smem)
        rows = row0 + gl.arange(0, BLOCK_M, layout=rows_l)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        gl.store(LSE + b.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh + pos0 + rows * r, lse,
                 mask=rows < L)
    tma.store_wait(0)
    mbarrier.invalidate(q_bar)
    for st in gl.static_range(2):
        mbarrier.invalidate(k_bar.index(st))
        mbarrier.invalidate(v_bar.index(st))


def host_descriptors(x, dilations, rows):
    """One Gluon host descriptor per branch over x (B, N, H, D) viewed as (B, r*H, N/r, D)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    B, N, H, D = x.shape
    dt = gl.bfloat16 if str(x.dtype) == "torch.bfloat16" else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, D], dt)
    out = []
    for r in dilations:
        view = x.as_strided((B, r * H, N // r, D), (N * H * D, D, r * H * D, 1))
        out.append(TensorDescriptor(view, list(view.shape), list(view.stride()), [1, 1, rows, D], layout))
    return out


def check_compile():
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OUT": "*bf16", "LSE": "*fp32", "TABLE": "*i32", "RB": "*i32",
           "T": "i32", "qk_scale": "fp32", "stride_qb": "i64", "stride_qn": "i32", "stride_qh": "i32",
           "stride_lb": "i32", "stride_lh": "i32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "num_warps": "constexpr"}
    consts = {"HEAD_DIM": 128, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8}
    src = GluonASTSource(gluon_fwd, sig, constexprs={(list(sig).index(k), ): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    print("compiled:", {key: getattr(k.metadata, key) for key in ("shared", "num_warps")})
    ptx = k.asm["ptx"]
    print("wgmma:", ptx.count("wgmma.mma_async"), "tma loads:", ptx.count("cp.async.bulk.tensor"),
          "local memory:", ptx.count(".local"))
    sass = k.asm.get("cubin")
    print("cubin bytes:", len(sass) if sass else None)
    # the host-descriptor kernel
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: F401
    lay = gl.NVMMASharedLayout.get_default_for([1, 1, 128, 128], gl.bfloat16)
    dsig = "tensordesc<bf16[1, 1, 128, 128]," + repr(lay) + ">"
    sig2 = {f"{t}{i}": dsig for t in "qkvo" for i in range(4)}
    sig2.update({"LSE": "*fp32", "TABLE": "*i32", "RB": "*i32", "T": "i32", "H": "i32", "qk_scale": "fp32",
                 "stride_lb": "i32", "stride_lh": "i32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr",
                 "BLOCK_N": "constexpr", "num_warps": "constexpr"})
    src2 = GluonASTSource(gluon_fwd_host, sig2, constexprs={(list(sig2).index(k), ): v for k, v in consts.items()})
    k2 = triton.compile(src2, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    print("host kernel compiled:", k2.metadata.shared)


def run_gpu():
    import torch
    from triton.testing import do_bench

    from dilated_compiler import AttentionSpec, Branch, build_plan
    from dilated_compiler.lowering.triton import lowering as tl_lowering
    from dilated_compiler.lowering.triton.autotune import TileConfig
    from dilated_compiler.lowering.triton.tables import tile_table

    H, D, N = 16, 128, 65536
    spec = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))))
    plan = build_plan(spec, N, H, D)
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    kpm = torch.zeros(1, dtype=torch.uint8, device="cuda")
    rb = torch.tensor([b.dilation for b in spec.branches], dtype=torch.int32, device="cuda")
    flops = float(plan.flops)
    cfg = TileConfig(128, 128, 8, 3)
    ref_o, ref_l = torch.zeros_like(q), torch.full((1, H, N), float("-inf"), device="cuda")
    low._launch_fwd(cfg, q, k, v, kpm, False, ref_o, ref_l)
    rows = [("generated 128x128/w8/s3", do_bench(lambda: low._launch_fwd(cfg, q, k, v, kpm, False, ref_o, ref_l),
                                                 warmup=10, rep=50, return_mode="median"), 0.0, "-")]
    tl_lowering._ensure_allocator()
    table = tile_table(plan, "q", 128, 128).cuda()
    T = table.shape[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for grid in (sms, 2 * sms, T):
        name = f"gluon persistent grid={grid}"
        try:
            o = torch.zeros_like(q)
            lse = torch.full_like(ref_l, float("-inf"))

            def run():
                return gluon_fwd[(min(grid, T), 1)](
                    q, k, v, o, lse, table, rb, T, low.scale * 1.4426950408889634, q.stride(0), q.stride(1),
                    q.stride(2), lse.stride(0), lse.stride(1), HEAD_DIM=D, BLOCK_M=128, BLOCK_N=128, num_warps=8)
            kern = run()
            torch.cuda.synchronize()
            err = float((o.float() - ref_o.float()).norm() / ref_o.float().norm())
            fin = torch.isfinite(ref_l)
            err = max(err, float((lse - ref_l)[fin].abs().max()))
            res = f"{kern.n_regs} regs, {kern.n_spills} spills, {kern.metadata.shared // 1024} KB"
            rows.append((name, do_bench(run, warmup=10, rep=50, return_mode="median"), err, res))
        except Exception as e:
            rows.append((name, math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:90]}", "-"))
        print(rows[-1], flush=True)
    dil = [b.dilation for b in spec.branches]
    for grid in (sms, 2 * sms):
        name = f"gluon host descriptors, persistent grid={grid}"
        try:
            o = torch.zeros_like(q)
            lse = torch.full_like(ref_l, float("-inf"))

            def run():
                descs = (host_descriptors(q, dil, 128) + host_descriptors(k, dil, 128)
                         + host_descriptors(v, dil, 128) + host_descriptors(o, dil, 128))
                return gluon_fwd_host[(min(grid, T), 1)](
                    *descs, lse, table, rb, T, H, low.scale * 1.4426950408889634, lse.stride(0), lse.stride(1),
                    HEAD_DIM=D, BLOCK_M=128, BLOCK_N=128, num_warps=8)
            kern = run()
            torch.cuda.synchronize()
            err = float((o.float() - ref_o.float()).norm() / ref_o.float().norm())
            fin = torch.isfinite(ref_l)
            err = max(err, float((lse - ref_l)[fin].abs().max()))
            res = f"{kern.n_regs} regs, {kern.n_spills} spills, {kern.metadata.shared // 1024} KB"
            rows.append((name, do_bench(run, warmup=10, rep=50, return_mode="median"), err, res))
        except Exception as e:
            rows.append((name, math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:90]}", "-"))
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: forward kernel, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| variant | ms | TFLOP/s | err | resources |\n|---|---|---|---|---|")
    for name, ms, err, res in sorted(rows, key=lambda r: (math.isnan(r[1]), r[1])):
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err if isinstance(err, str) else f'{err:.1e}'} "
              f"| {res} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-compile", action="store_true")
    if ap.parse_args().check_compile:
        check_compile()
    else:
        run_gpu()
