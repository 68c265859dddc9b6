"""Warp-specialised forward and backward kernels for Hopper GPUs, written in Gluon (``triton.experimental.gluon``).

Triton's ``tl`` kernels leave the tensor cores idle half of the time on short segments (2048 keys: 16 key tiles
per program), because every program pays its prologue and epilogue, and its in-kernel tensor descriptors, in
full (benchmarks/results/H100-triton.md). This kernel is FA3's structure over the same tile table:

* persistent: one program per SM walks tiles pid, pid + G, ...;
* three warpgroups: a producer that only issues TMA copies (each tile's Q, then its K/V tiles into a 2-deep
  ring), and two consumers that each compute 64 rows of the 128-row query tile, so one consumer's softmax runs
  while the other's matrix products do;
* in each consumer, S_j = Q K_j^T is issued before P_{j-1} V_{j-1}, so the softmax of S_j overlaps that product;
* tensor descriptors made once per program (not per tile), one per branch and tensor, over x (B, N, H, D)
  viewed as (B, r*H, N/r, D) with strides (N*H*D, D, r*H*D, 1): selected row j of the segment whose row 0 sits
  at position pos0 is [b, (pos0 % r)*H + h, pos0 // r + j, :]. Each copy picks its tile's branch's descriptor.
  With grouped-query attention K's and V's views have Hkv heads, and query head h reads kv head h // (H // Hkv).

The backward has the same structure: ``gluon_bwd_dq`` (persistent over 128-row query tiles; it also writes delta)
and then ``gluon_bwd_dkdv`` (persistent over 128-row key tiles, each consumer owning 64 keys and stepping over 64
query rows at a time with transposed products, as FA3 does). With grouped-query attention a dk/dv tile belongs to
a kv head and walks, one after another, the query heads that read its rows (the lowering's table, from
``tables.kv_tile_table``), so dK and dV are each written once, as without it; where grouped mode splits a kv head's
query heads between branches, the dk/dv launch runs a phase per branch adding into float32 buffers (SPLIT). Otherwise
in grouped mode the dk/dv launch starts on the SMs that the dq launch's last wave leaves idle (programmatic dependent
launch, waiting on a counter for dq's delta: [Note: overlap]; :data:`BWD_OVERLAP`).

In "all" mode (every head in every branch) the forward writes each branch's out and lse (MERGE) for the
lowering's ``dilated_merge``. That mode's backward runs each backward kernel once, over every branch's tiles in
phases (ACC, PHASED: a phase per branch, adding into fp32 buffers once the phase before has; [Note: phases]);
:data:`ALL_MODE_BACKWARD` off, it runs on the tl kernels with atomics.

They compute exactly what ``dilated_fwd``, ``dilated_bwd_dq`` and ``dilated_bwd_dkdv`` compute (same tile tables,
same arithmetic per tile) for the cases in :func:`unsupported_reason`; the lowering runs them where that returns
None and says which kernels run in ``kernel_source()``. Gluon is experimental and changes between Triton
releases, so the kernels are used only with the Triton version they were checked on (:data:`CHECKED_TRITON`).

Nothing here imports triton: the source text and the checks work on any machine.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

__all__ = ["BLOCK_M", "BLOCK_N", "BWD_BLOCK", "BWD_STEP", "CHECKED_TRITON", "MAX_BRANCHES", "gluon_source",
           "spec_reason", "unsupported_reason", "padded_dilations"]

BLOCK_M, BLOCK_N = 128, 128
MAX_BRANCHES = 4
CHECKED_TRITON = ("3.6.",)  # Gluon's API as of these releases
HEAD_DIMS = (64, 128)
CONSUMER_REGS = 232   # setmaxnreg of the worker consumer; the other consumer gets 8 fewer, the producer 512 - 2 * this
# the backward: a program's own tile (query tile for dq, key tile for dk/dv) and the rows of its inner steps
BWD_BLOCK, BWD_STEP = 128, 64
DQ_CONSUMER_REGS = 232     # measured on an H100 (benchmarks/results/H100-triton.md): 1.142 ms against 1.166 at 240
# ring depths by head_dim, measured on an H100 (benchmarks/results/H100-triton.md; for 64,
# benchmarks/experiments/gluon_d64_experiment.py: deeper rings won on one case and lost on another)
FWD_STAGES = {128: 2, 64: 2}     # K/V ring (128: no room for a third)
DQ_STAGES = {128: 3, 64: 3}      # K/V ring; O read by pointers makes room: 1.122 ms against 1.158 with 2
DKDV_CONSUMER_REGS = 240   # 1.947 ms against 2.576 at 232 (which spills among the matrix instructions)
DKDV_STAGES = {128: 3, 64: 3}    # Q/dO/lse/delta ring: 1.659 ms against 1.735 with 2 (gluon_dkdv_experiment)
# "all" mode's backward on gluon_bwd_dq and gluon_bwd_dkdv: one launch per pass, a phase per branch adding its dq,
# dk and dv into fp32 buffers (ACC, PHASED), in place of the tl kernels' atomics. On an H100 (four-branch
# N = 64K, bf16, H = 16, D = 128; benchmarks/experiments/gluon_all_backward_experiment.py), as one launch per
# branch, the lowering's fwd+bwd 23.41 -> 18.31 ms, causal 16.98 -> 11.98
ALL_MODE_BACKWARD = True
# ... with a dilation-1 branch (it selects every row) as the last phase, writing the gradients in the inputs' dtype
# (ACC 3, 4): no float32 -> bf16 casts after the launches (benchmarks/results/H200-triton.md, stop 17). Off: that
# branch goes first and stores (ACC 2), and the lowering casts the float32 buffers
ALL_MODE_FINAL_PHASE = True
# grouped mode under grouped-query attention where a kv head's query heads span branches: gluon_bwd_dkdv runs a phase
# per branch adding into float32 dk and dv (SPLIT); off, such calls' backward runs the tl kernels. On an H100
# (four-branch N = 64K, bf16, 16 query heads, D = 128; benchmarks/experiments/gluon_gqa_bwd_experiment.py), fwd+bwd
# with 2 kv heads 5.114 -> 3.767 ms, 1 kv head 5.076 -> 3.692; causal 3.455 -> 2.509, 3.410 -> 2.344
SPLIT_BACKWARD = True
# grouped mode's backward: gluon_bwd_dkdv launched with programmatic dependent launch, its programs starting on the SMs
# that gluon_bwd_dq's last wave leaves idle ([Note: overlap] in the kernels; the lowering's _scratch_kept). Off: dk/dv
# starts once dq has ended. benchmarks/experiments/bwd_overlap_experiment.py times both
BWD_OVERLAP = True


def spec_reason(spec, *, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """None if the spec and the shape-independent facts of a call allow the Gluon kernels (forward and backward
    alike), else why not."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim {' or '.join(map(str, HEAD_DIMS))} only"
    if dtype not in (torch.float16, torch.bfloat16):
        return "fp16 / bf16 only"
    if spec.num_branches > MAX_BRANCHES:
        return f"at most {MAX_BRANCHES} branches"
    if any(b.segment_length % b.dilation for b in spec.branches):
        return "segment lengths must be multiples of their dilations"
    return None


def unsupported_reason(*, spec, seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device, table: torch.Tensor, has_kpm: bool, triton_version: str) -> str | None:
    """None if the Gluon kernels compute this call (forward and backward alike), else why not (the generated tl
    kernels then do)."""
    reason = spec_reason(spec, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    if reason is not None:
        return reason
    if has_kpm:
        return "no key padding mask"
    if any(seq_len % b.dilation for b in spec.branches):
        return "sequence length must be a multiple of every dilation"
    if table.shape[0] == 0 or bool((table[:, 3] % BLOCK_N != 0).any()):
        return f"every segment's selected rows must be a multiple of {BLOCK_N}"
    if device.type != "cuda":
        return "not a CUDA device"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "needs compute capability 9.0 (wgmma)"
    if not triton_version.startswith(CHECKED_TRITON):
        return f"checked only with triton {', '.join(v + 'x' for v in CHECKED_TRITON)} (Gluon is experimental)"
    return None


def padded_dilations(spec) -> list[int]:
    """The branches' dilations, padded to MAX_BRANCHES with the first (the kernel makes one view per slot)."""
    dil = [b.dilation for b in spec.branches]
    return dil + [dil[0]] * (MAX_BRANCHES - len(dil))


def source_fingerprint() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def gluon_source(spec, specialisation: dict) -> str:
    branches = ", ".join(f"b{i}: w={b.segment_length} r={b.dilation}" for i, b in enumerate(spec.branches))
    header = (f"# Generated by dilated-compiler's Triton lowering (Gluon forward for Hopper). Do not edit.\n"
              f"#\n# spec:            {spec}\n# spec key:        {spec.key}\n"
              f"# specialisation:  {', '.join(f'{k}={v}' for k, v in specialisation.items())}\n"
              f"# branches:        {branches}\n")
    return header + _KERNEL


_KERNEL = r'''#
# gluon_fwd: out and lse of the grouped forward, every branch in one persistent launch (grid: one program per
# SM, then batch). Computes what dilated_fwd computes, tile for tile, with explicit TMA copies, mbarriers and
# asynchronous warpgroup MMAs. Symbols:
#   q*, k*, v*, o*    tensor descriptors made once per program, one per branch (index = branch id): x (B, N, H, D)
#                     viewed as (B, r*H, N/r, D); selected row j of a segment with row 0 at position pos0 is
#                     [b, (pos0 % r)*H + h, pos0 // r + j, :]. Blocks: Q, K, V 128 rows; out 64 rows
#   GQA               H // Hkv (grouped-query attention): k, v are (B, N, Hkv, D), batch stride
#                     stride_kb, and query head h reads kv head h // GQA: kv_combo = (pos0 % r)*Hkv + h // GQA
#   TABLE             the forward's tile table (dilated_fwd's; 128-row tiles); a program walks rows pid, pid+G, ..
#   combo, rbase      the tile's [ , combo, rbase + j, ] coordinates in its branch's view
#   q_smem            the tile's 128 query rows; consumer WG uses rows [64*WG, 64*WG + 64)
#   k_smem, v_smem    rings of STAGES key / value tiles; K/V tile g (counting over the program's tiles) in slot
#                     g % STAGES, "ready" barrier phase (g // STAGES) & 1; a slot is refilled once both consumers
#                     arrived on its "empty" barrier
#   S, P, acc         scores (base 2 after qk_scale), probabilities, output numerator; m_i, l_i row max / sum
#   CAUSAL            walk only the key tiles up to the diagonal (the table's hi column) and mask the scores of the
#                     tiles from full_end on
#   ZFILL             the producer writes 0 to the positions in the tile's span that its branch does not select,
#                     as TMA stores of a zero tile: the span of a tile is rows [rbase + row0, rbase + row0 + 128)
#                     of every combo o'*H + h, and the gaps are the combos o' != o (needs w % r == 0)
#   MERGE             "all" mode: each branch writes its own result, out (G, B, N, H, D) and lse (G, B, H, N), branch
#                     i at OUT + i * stride_og and LSE + i * stride_lg (rows it does not select are left alone: the
#                     merge reads a branch's rows only where its lse is finite); dilated_merge then combines them

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

NCOLS = gl.constexpr(11)


@gluon.jit
def _copy_in(d0, d1, d2, d3, branch, b, combo, row, bar, smem, pred):
    # one TMA copy of selected rows into smem (a 2-D buffer seen as the descriptor's 4-D block) through the
    # descriptor of the tile's branch; completes on bar
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
def _store_out(d0, d1, d2, d3, branch, b, combo, row, smem, val):
    # val (registers) to selected rows: into smem once its previous TMA store has read it, then one TMA store
    tma.store_wait(0)
    smem.store(val)
    fence_async_shared()
    _copy_out(d0, d1, d2, d3, branch, b, combo, row, smem)


@gluon.jit
def _tile_coords(row, RB, H):
    head = gl.load(row + 0)
    branch = gl.load(row + 1)
    pos0 = gl.load(row + 2)
    r = gl.load(RB + branch)
    return branch, (pos0 % r) * H + head, pos0 // r


@gluon.jit
def _key_walk(row, BLOCK: gl.constexpr, CAUSAL: gl.constexpr):
    # a query tile's key blocks: the whole segment's, or (CAUSAL) those up to the diagonal (the table's hi column),
    # blocks from n_full on masked (its full_end column)
    if CAUSAL:
        n_k = gl.cdiv(gl.load(row + 8), BLOCK)
        n_full = gl.load(row + 7) // BLOCK
    else:
        n_k = gl.cdiv(gl.load(row + 3), BLOCK)
        n_full = n_k
    return n_k, n_full


@gluon.jit
def _causal_s(s, j, n_full, q_rows, BLOCK: gl.constexpr, cols_l: gl.constexpr):
    # CAUSAL: scores (queries x keys) of key block j; from block n_full on, -inf where the key comes after the query
    if j >= n_full:
        keys = j * BLOCK + gl.arange(0, BLOCK, layout=cols_l)
        s = gl.where(gl.expand_dims(keys, 0) <= gl.expand_dims(q_rows, 1), s, float("-inf"))
    return s


@gluon.jit
def _causal_st(s_t, j, n_masked, k_rows, BLOCK: gl.constexpr, cols_l: gl.constexpr):
    # CAUSAL: transposed scores (keys x queries) of query block j; before block n_masked, -inf where the query comes
    # before the key
    if j < n_masked:
        queries = j * BLOCK + gl.arange(0, BLOCK, layout=cols_l)
        s_t = gl.where(gl.expand_dims(queries, 0) >= gl.expand_dims(k_rows, 1), s_t, float("-inf"))
    return s_t


@gluon.jit
def _zero_gaps(d0, d1, d2, d3, row, RB, H, b, branch, span0, z_smem):
    # [Note: zero fill] zeros over the rows [span0, span0 + 128) of the combos o*H + h, o != the tile's own offset:
    # the positions of the tile's span that its branch does not select. Two stores of the zero tile per combo
    # (the output descriptors' blocks are half a tile); needs w % r == 0
    r = gl.load(RB + branch)
    own = gl.load(row + 2) % r
    for o in range(0, r):
        if o != own:
            zc = o * H + gl.load(row + 0)
            _copy_out(d0, d1, d2, d3, branch, b, zc, span0, z_smem)
            _copy_out(d0, d1, d2, d3, branch, b, zc, span0 + d0.block_type.shape[2], z_smem)


@gluon.jit
def _row_halves(val, row0, HEAD_DIM: gl.constexpr, HALF: gl.constexpr):
    # val (HALF rows x HEAD_DIM, fp32, a matrix-product layout) as two column halves lo, hi, with the tile's row
    # numbers row0 + i and the half's column numbers: each thread holds columns of both halves, so the split moves
    # no data, and only half of the addresses are live at a time
    lo, hi = gl.split(gl.permute(gl.reshape(val, [HALF, 2, HEAD_DIM // 2]), [0, 2, 1]))
    rows = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, lo.type.layout))
    cols = gl.arange(0, HEAD_DIM // 2, layout=gl.SliceLayout(0, lo.type.layout))
    return lo, hi, rows, cols


@gluon.jit
def _add_rows(X, val, b, head, pos0, row0, r, H, stride_b, HEAD_DIM: gl.constexpr, HALF: gl.constexpr,
              STORE: gl.constexpr):
    # ACC: X (B, N, H, D, float32) += val at the selected rows pos0 + (row0 + i) * r of head `head` (STORE: X = val
    # there, nothing read), by pointer loads and stores in two column halves (_row_halves)
    lo, hi, rows, cols = _row_halves(val, row0, HEAD_DIM, HALF)
    base = X + b.to(gl.int64) * stride_b + head * HEAD_DIM
    offs = gl.expand_dims((pos0 + rows * r).to(gl.int64) * (H * HEAD_DIM), 1) + gl.expand_dims(cols, 0)
    if STORE:
        gl.store(base + offs, lo)
        gl.store(base + HEAD_DIM // 2 + offs, hi)
    else:
        gl.store(base + offs, gl.load(base + offs) + lo)
        gl.store(base + HEAD_DIM // 2 + offs, gl.load(base + HEAD_DIM // 2 + offs) + hi)


@gluon.jit
def _final_rows(X, XF, SEL, N, val, b, head, pos0, row0, r, H, stride_b, HEAD_DIM: gl.constexpr,
                HALF: gl.constexpr):
    # ACC 3, 4, the last phase: XF (B, N, H, D, the inputs' dtype) = X (float32) + val at the tile's rows, as
    # _add_rows, with X read only at the rows an earlier phase wrote (SEL[head, pos] != 0; elsewhere XF = val)
    lo, hi, rows, cols = _row_halves(val, row0, HEAD_DIM, HALF)
    pos = pos0 + rows * r
    earlier = gl.expand_dims(gl.load(SEL + head * N + pos) != 0, 1) & gl.expand_dims(cols < HEAD_DIM // 2, 0)
    at = b.to(gl.int64) * stride_b + head * HEAD_DIM
    offs = gl.expand_dims(pos.to(gl.int64) * (H * HEAD_DIM), 1) + gl.expand_dims(cols, 0)
    dt: gl.constexpr = XF.dtype.element_ty
    gl.store(XF + at + offs, (gl.load(X + at + offs, mask=earlier, other=0.0) + lo).to(dt))
    gl.store(XF + at + HEAD_DIM // 2 + offs,
             (gl.load(X + at + HEAD_DIM // 2 + offs, mask=earlier, other=0.0) + hi).to(dt))


@gluon.jit
def _phase(PHASES, p, T, B, pid, G, PHASED: gl.constexpr):
    # [Note: phases] phase p's table rows [start, start + count) and how many of its tiles this program runs.
    # PHASED: the batch is folded into the walk (tile idx of the phase: batch idx // count, row idx % count);
    # else the whole table for the grid's batch index
    if PHASED:
        start = gl.load(PHASES + p)
        count = gl.load(PHASES + p + 1) - start
        n_mine = (count * B - pid + G - 1) // G
    else:
        start = 0
        count = T
        n_mine = (T - pid + G - 1) // G
    return start, count, n_mine


@gluon.jit
def _walk_tile(TABLE, start, count, pid, i, G, b0, PHASED: gl.constexpr):
    # the batch index and table row of this program's i-th tile of a phase
    if PHASED:
        idx = pid + i * G
        b = idx // count
        row = TABLE + (start + idx - b * count) * NCOLS
    else:
        b = b0
        row = TABLE + (pid + i * G) * NCOLS
    return b, row


@gluon.jit
def _grid_arrive(BAR):
    # this consumer's writes of a phase are done (all its threads, then a release at GPU scope)
    gl.thread_barrier()
    gl.atomic_add(BAR, 1, sem="release")


@gluon.jit
def _grid_wait(BAR, target):
    # until `target` consumers arrived (acquire): every write of the previous phase is visible
    n = gl.atomic_add(BAR, 0, sem="acquire")
    while n < target:
        n = gl.atomic_add(BAR, 0, sem="acquire")


@gluon.jit
def _launch_dependents(x):
    # [Note: overlap] programmatic dependent launch: the next launch in the stream, if launched with launch_pdl,
    # may take the SMs this grid frees from now on. It orders no memory: dk/dv waits for delta on BAR
    return gl.inline_asm_elementwise("griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;", "=r,r", [x],
                                     dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _wait_prerequisite(x):
    # [Note: overlap] until the grid this one overlaps (dq) has completed and its writes are visible
    return gl.inline_asm_elementwise("griddepcontrol.wait;\n\tmov.b32 $0, $1;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _phase_wait(BAR, ph, i, G, PHASED: gl.constexpr):
    # [Note: phases] before a consumer's first write of phase ph > 0: all 2G consumers done with phase ph - 1
    if PHASED:
        if i == 0:
            if ph > 0:
                _grid_wait(BAR + ph - 1, 2 * G)


@gluon.jit
def _acc_rows(X, XF, SEL, N, val, b, head, pos0, row0, r, H, stride_b, HEAD_DIM: gl.constexpr, HALF: gl.constexpr,
              ACC: gl.constexpr, PHASED: gl.constexpr, ph, NPH):
    # ACC's write of a tile's rows: ACC 2 and 3 store in the first phase (only where PHASED), ACC 3 and 4 write
    # the results in the last phase (_final_rows); otherwise adds
    if PHASED:
        if ph == 0:
            _add_rows(X, val, b, head, pos0, row0, r, H, stride_b, HEAD_DIM, HALF, ACC == 2 or ACC == 3)
        elif ACC >= 3 and ph == NPH - 1:
            _final_rows(X, XF, SEL, N, val, b, head, pos0, row0, r, H, stride_b, HEAD_DIM, HALF)
        else:
            _add_rows(X, val, b, head, pos0, row0, r, H, stride_b, HEAD_DIM, HALF, False)
    else:
        _add_rows(X, val, b, head, pos0, row0, r, H, stride_b, HEAD_DIM, HALF, ACC == 2)


@gluon.jit
def _kv_combo(row, RB, H, combo, GQA: gl.constexpr):
    # the tile's combo in K's and V's view: (pos0 % r)*Hkv + h // GQA (the query's own where GQA is 1)
    kv = combo
    if GQA > 1:
        r = gl.load(RB + gl.load(row + 1))
        kv = (gl.load(row + 2) % r) * (H // GQA) + gl.load(row + 0) // GQA
    return kv


@gluon.jit
def _query_heads(row, r, HEAD_END, GQA: gl.constexpr, PHASED: gl.constexpr, SPLIT: gl.constexpr):
    # gluon_bwd_dkdv under grouped-query attention: the query heads of a key tile, h0, h0 + step, ... (n of them),
    # h0 its table head. Grouped mode: all GQA heads of its kv head (step 1), or (SPLIT, where a kv head's query
    # heads span branches) those of the tile's branch, which end at HEAD_END[branch]. "All" mode (PHASED, not
    # SPLIT): those of the kv head's heads that share h0's offset, h0 % r (step r)
    n = 1
    step = 1
    if GQA > 1:
        h0 = gl.load(row + 0)
        if SPLIT:
            n = gl.minimum((h0 // GQA + 1) * GQA, gl.load(HEAD_END + gl.load(row + 1))) - h0
        else:
            if PHASED:
                step = r
            n = gl.cdiv(GQA - h0 % GQA, step)
    return n, step


@gluon.jit
def _producer(q0, q1, q2, q3, k0, k1, k2, k3, v0, v1, v2, v3, o0, o1, o2, o3, TABLE, RB, T, H, q_smem, k_smem,
              v_smem, z_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, ZFILL: gl.constexpr, CAUSAL: gl.constexpr, GQA: gl.constexpr):
    b = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    n_mine = (T - pid + G - 1) // G
    c = 0
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        br, combo, rbase = _tile_coords(row, RB, H)
        kv_combo = _kv_combo(row, RB, H, combo, GQA)
        n_k, _ = _key_walk(row, BLOCK_N, CAUSAL)
        # Q's buffer is free once both consumers issued their last S of the previous tile
        mbarrier.wait(q_empty, (i & 1) ^ 1)
        _copy_in(q0, q1, q2, q3, br, b, combo, rbase + gl.load(row + 4), q_ready, q_smem, True)
        for j in range(n_k):
            g = c + j
            st = g % STAGES
            ph = ((g // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(st), ph)
            _copy_in(k0, k1, k2, k3, br, b, kv_combo, rbase + j * BLOCK_N, k_ready.index(st), k_smem.index(st),
                     True)
            mbarrier.wait(v_empty.index(st), ph)
            _copy_in(v0, v1, v2, v3, br, b, kv_combo, rbase + j * BLOCK_N, v_ready.index(st), v_smem.index(st),
                     True)
        c += n_k
        if ZFILL:
            _zero_gaps(o0, o1, o2, o3, row, RB, H, b, br, rbase + gl.load(row + 4), z_smem)
    tma.store_wait(0)


@gluon.jit
def _consumer(o0, o1, o2, o3, LSE, TABLE, RB, T, H, qk_scale, stride_lg, stride_lb, stride_lh, q_smem, o_smem, k_smem,
              v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
              HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              MERGE: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
    # S, P: (HALF queries, BLOCK_N keys) in s_l; acc: (HALF queries, HEAD_DIM) in mma (the same layout when
    # HEAD_DIM == BLOCK_N); row statistics live in s_l's rows and move to acc's where they meet it
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, s_l)
    acc_rows: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)
    b = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    n_mine = (T - pid + G - 1) // G
    q_half = q_smem.slice(WG * HALF, HALF)
    o_half = o_smem.index(WG)
    c = 0
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        br, combo, rbase = _tile_coords(row, RB, H)
        head = gl.load(row + 0)
        pos0 = gl.load(row + 2)
        L = gl.load(row + 3)
        row0 = gl.load(row + 4) + WG * HALF
        r = gl.load(RB + br)
        n_k, n_full = _key_walk(row, BLOCK_N, CAUSAL)
        if CAUSAL:
            q_rows = row0 + gl.arange(0, HALF, layout=rows_l)
        m_i = gl.full([HALF], float("-inf"), gl.float32, layout=rows_l)
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=mma)
        mbarrier.wait(q_ready, i & 1)
        # key tile 0: S_0 and its softmax
        st = c % STAGES
        mbarrier.wait(k_ready.index(st), (c // STAGES) & 1)
        s_tok = warpgroup_mma(q_half, k_smem.index(st).permute((1, 0)),
                              gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(st), count=1)
        if CAUSAL:
            s = _causal_s(s, 0, n_full, q_rows, BLOCK_N, cols_l)
        m_i = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, axis=1)
        p_prev = gl.convert_layout(p.to(dtype), p_op)
        # key tiles 1..: S_j issued before P_{j-1} V_{j-1}; the softmax of S_j runs while that product does
        for j in range(1, n_k):
            g = c + j
            st = g % STAGES
            pst = (g - 1) % STAGES
            mbarrier.wait(k_ready.index(st), (g // STAGES) & 1)
            s_tok = warpgroup_mma(q_half, k_smem.index(st).permute((1, 0)),
                                  gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(pst), ((g - 1) // STAGES) & 1)
            acc_tok = warpgroup_mma(p_prev, v_smem.index(pst), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(st), count=1)
            if CAUSAL:
                s = _causal_s(s, j, n_full, q_rows, BLOCK_N, cols_l)
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
            mbarrier.arrive(v_empty.index(pst), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, acc_rows), 1)
            p_prev = gl.convert_layout(p.to(dtype), p_op)
        mbarrier.arrive(q_empty, count=1)
        g = c + n_k - 1
        st = g % STAGES
        mbarrier.wait(v_ready.index(st), (g // STAGES) & 1)
        acc_tok = warpgroup_mma(p_prev, v_smem.index(st), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
        mbarrier.arrive(v_empty.index(st), count=1)
        c += n_k
        # epilogue: out through shared memory and a TMA store, lse by pointers
        out = acc / gl.expand_dims(gl.convert_layout(l_i, acc_rows), 1)
        _store_out(o0, o1, o2, o3, br, b, combo, rbase + row0, o_half, out.to(dtype))
        rows = row0 + gl.arange(0, HALF, layout=rows_l)
        lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        lse_ptr = LSE
        if MERGE:
            lse_ptr += br.to(gl.int64) * stride_lg
        gl.store(lse_ptr + b.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh + pos0 + rows * r, lse,
                 mask=rows < L)
    tma.store_wait(0)


@gluon.jit
def _branch_desc(X, RB, i: gl.constexpr, B, N, H, stride_b, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    # x (B, N, H, D) viewed as (B, r*H, N/r, D) for branch i (RB is padded with the first branch's dilation)
    r = gl.load(RB + i)
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, ROWS, HEAD_DIM], X.dtype.element_ty)
    return tma.make_tensor_descriptor(X, [B, r * H, N // r, HEAD_DIM], [stride_b, HEAD_DIM, r * H * HEAD_DIM, 1],
                                      [1, 1, ROWS, HEAD_DIM], layout)


@gluon.jit
def _branch_descs(X, RB, B, N, H, stride_b, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    # the descriptors of the four branch slots (index = branch id)
    return (_branch_desc(X, RB, 0, B, N, H, stride_b, ROWS, HEAD_DIM),
            _branch_desc(X, RB, 1, B, N, H, stride_b, ROWS, HEAD_DIM),
            _branch_desc(X, RB, 2, B, N, H, stride_b, ROWS, HEAD_DIM),
            _branch_desc(X, RB, 3, B, N, H, stride_b, ROWS, HEAD_DIM))


@gluon.jit
def gluon_fwd(Q, K, V, OUT, LSE, TABLE, RB, T, B, N, H, qk_scale, stride_b, stride_kb, stride_og, stride_lg,
              stride_lb, stride_lh, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr, ZFILL: gl.constexpr, CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr,
              num_warps: gl.constexpr, MERGE: gl.constexpr, GQA: gl.constexpr = 1):
    # the descriptors: made once per program (Q, K, V: 128-row blocks; out: 64-row blocks, one per consumer); K and
    # V have H // GQA heads
    q0, q1, q2, q3 = _branch_descs(Q, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    k0, k1, k2, k3 = _branch_descs(K, RB, B, N, H // GQA, stride_kb, BLOCK_N, HEAD_DIM)
    v0, v1, v2, v3 = _branch_descs(V, RB, B, N, H // GQA, stride_kb, BLOCK_N, HEAD_DIM)
    if MERGE:
        # branch g's out starts g * stride_og elements in: past 2^31 where B*N*H*D reaches 2^31 / g, so 64-bit
        # (an int argument below 2^31 arrives as int32)
        og = stride_og.to(gl.int64)
        o0 = _branch_desc(OUT, RB, 0, B, N, H, stride_b, BLOCK_M // 2, HEAD_DIM)
        o1 = _branch_desc(OUT + og, RB, 1, B, N, H, stride_b, BLOCK_M // 2, HEAD_DIM)
        o2 = _branch_desc(OUT + 2 * og, RB, 2, B, N, H, stride_b, BLOCK_M // 2, HEAD_DIM)
        o3 = _branch_desc(OUT + 3 * og, RB, 3, B, N, H, stride_b, BLOCK_M // 2, HEAD_DIM)
    else:
        o0, o1, o2, o3 = _branch_descs(OUT, RB, B, N, H, stride_b, BLOCK_M // 2, HEAD_DIM)
    dtype: gl.constexpr = Q.dtype.element_ty
    HALF: gl.constexpr = BLOCK_M // 2
    m_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    h_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, HEAD_DIM], dtype)
    n_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    o_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], h_sl)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], n_sl)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], n_sl)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    z_smem = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], h_sl, value=gl.zeros([HALF, HEAD_DIM], dtype, zl))
    fence_async_shared()
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=2)
    for st in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(st), count=1)
        mbarrier.init(k_empty.index(st), count=2)
        mbarrier.init(v_ready.index(st), count=1)
        mbarrier.init(v_empty.index(st), count=2)
    gl.warp_specialize([
        (_consumer, (o0, o1, o2, o3, LSE, TABLE, RB, T, H, qk_scale, stride_lg, stride_lb, stride_lh, q_smem,
                     o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, 0, HEAD_DIM,
                     HALF, BLOCK_N, STAGES, CAUSAL, MERGE)),
        (_consumer, (o0, o1, o2, o3, LSE, TABLE, RB, T, H, qk_scale, stride_lg, stride_lb, stride_lh, q_smem,
                     o_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, 1, HEAD_DIM,
                     HALF, BLOCK_N, STAGES, CAUSAL, MERGE)),
        (_producer, (q0, q1, q2, q3, k0, k1, k2, k3, v0, v1, v2, v3, o0, o1, o2, o3, TABLE, RB, T, H, q_smem, k_smem,
                     v_smem, z_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, BLOCK_N, STAGES, ZFILL,
                     CAUSAL, GQA)),
    ], [4, 4], [CONSUMER_REGS, 512 - 2 * CONSUMER_REGS])

# ---------------------------------------------------------------------------------------------------------------
# The backward: gluon_bwd_dq (dq, and delta for dk/dv), then gluon_bwd_dkdv. They compute what dilated_bwd_dq and
# dilated_bwd_dkdv compute, with the forward's structure (persistent, a producer warpgroup issuing TMA copies and
# two consumer warpgroups of 64 rows each, descriptors per branch). Symbols, besides the forward's:
#   DO, dO            the gradient of out; DLSE, dlse that of lse (HAS_DLSE)
#   delta             rowsum(dO * O) - dlse of each selected query row: written by gluon_bwd_dq, read by dk/dv
#   lse2              lse in base 2; P = exp2(S * qk_scale - lse2) recomputes the forward's probabilities
#   dS                P * (dP - delta), dP = dO V^T; dQ = sm_scale * dS K, dK = sm_scale * dS^T Q, dV = P^T dO
#   gluon_bwd_dq      TABLE: 128-row query tiles; each consumer owns 64 rows; the producer copies the tile's Q and
#                     dO, then 64-row K/V tiles into a STAGES-deep ring (kv_ready / kv_empty); each consumer reads
#                     its rows of O (for delta) by pointers
#   gluon_bwd_dkdv    TABLE: 128-row key tiles; each consumer owns 64 keys and works on transposed products
#                     (S^T = K Q^T, dP^T = V dO^T); the producer copies the tile's K and V, then 64-row steps into
#                     a STAGES-deep ring (qd_ready / qd_empty): Q and dO by TMA, the step's lse and delta (rows
#                     strided by r) by cp.async into ld_smem. S^T and dP^T are issued together so the softmax runs
#                     while dP^T does (FA3's order)
#   LD, stride_ld     lse and delta in one (2, B, H, N) buffer: lse at LD + i, delta at LD + stride_ld + i
#   CAUSAL            dq: key steps up to the diagonal, masked from full_end on; dk/dv: query steps from lo (the
#                     diagonal) on, masked before mid
#   ZFILL             as in the forward: the producer writes zeros to the rows of the tile's span that its branch
#                     does not select, so dq, dk and dv need no memset
#   ACC               "all" mode: DQ (or DK, DV) are float32 and each tile adds its rows into them by pointer
#                     loads and stores (_add_rows). ACC 2: the first phase stores instead (its branch selects every
#                     row that a later phase adds to: the buffers need no zeroing). ACC 3 (the first phase stores)
#                     and 4 (it adds): the last phase, a branch that selects every row, writes the results in the
#                     inputs' dtype to DQF (DKF, DVF), reading DQ only at the rows an earlier phase wrote (SEL (H, N)
#                     nonzero; _final_rows), so no float32 buffer needs a cast afterwards
#   GQA               as in the forward: K and V (and dK, dV) have H // GQA heads, batch stride stride_kb. dq: the
#                     producer copies kv head h // GQA. dk/dv: TABLE's tiles belong to kv heads; a tile's head column
#                     is the first of the query heads that read its rows (_query_heads: the kv head's GQA query
#                     heads; in "all" mode those of the first's offset, h % r, step r), and the producer runs the
#                     query steps of each in turn into the same dK, dV accumulators (n_h * steps in all)
#   SPLIT, HEAD_END   grouped mode where a kv head's query heads span branches: dK and dV of its rows add over
#                     tiles of several branches, so dk/dv runs PHASED (a phase per branch, ACC 1: adding into
#                     float32 zeros); a tile walks the kv head's query heads in its branch, which end at
#                     HEAD_END[branch]
#   PHASED            [Note: phases] "all" mode's one launch per pass: TABLE holds the branches' tiles one branch
#                     after another, phase ph in rows [PHASES[ph], PHASES[ph + 1]), the batch folded into the walk.
#                     A row is in one tile of a branch, so no two tiles of a phase touch it; across phases, a
#                     consumer's first write of phase ph waits until all 2G consumers arrived on BAR[ph - 1] (each
#                     arrives after its last write of a phase). Only the writes wait: a program computes its first
#                     tile of the next phase meanwhile. The spin-waits need every program resident: the lowering
#                     launches PHASED grids cooperatively (launch_cooperative_grid), at most one program per SM
#   OVERLAP           [Note: overlap] grouped mode, not PHASED: dk/dv starts on the SMs that dq's last wave leaves
#                     idle. dq signals launch_dependents as it starts; each dq consumer, once it has stored the
#                     delta of its last tile, arrives on BAR (a zeroed counter); the lowering launches dk/dv with
#                     launch_pdl, and each dk/dv program waits until DQ_ARRIVALS (2 per dq program) have arrived
#                     before its warps start, and for dq's whole grid (griddepcontrol.wait) before it ends, so
#                     that anything after dk/dv in the stream also comes after dq. No dq program waits on dk/dv,
#                     and every dq program is running before any dk/dv program can start, so the wait ends


@gluon.jit
def _dq_producer(q0, q1, q2, q3, do0, do1, do2, do3, k0, k1, k2, k3, v0, v1, v2, v3, dq0, dq1, dq2, dq3, TABLE, RB,
                 T, B, H, PHASES, NPH, q_smem, do_smem, k_smem, v_smem, z_smem, t_ready, t_empty, kv_ready, kv_empty,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ZFILL: gl.constexpr, CAUSAL: gl.constexpr,
                 PHASED: gl.constexpr, GQA: gl.constexpr):
    b0 = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    c = 0
    it = 0
    for ph in range(NPH if PHASED else 1):
        start, count, n_mine = _phase(PHASES, ph, T, B, pid, G, PHASED)
        for i in range(n_mine):
            b, row = _walk_tile(TABLE, start, count, pid, i, G, b0, PHASED)
            br, combo, rbase = _tile_coords(row, RB, H)
            kv_combo = _kv_combo(row, RB, H, combo, GQA)
            row0 = gl.load(row + 4)
            n_k, _ = _key_walk(row, BLOCK_N, CAUSAL)
            mbarrier.wait(t_empty, ((it if PHASED else i) & 1) ^ 1)
            _copy_in(q0, q1, q2, q3, br, b, combo, rbase + row0, t_ready, q_smem, True)
            _copy_in(do0, do1, do2, do3, br, b, combo, rbase + row0, t_ready, do_smem, True)
            for j in range(n_k):
                g = c + j
                st = g % STAGES
                mbarrier.wait(kv_empty.index(st), ((g // STAGES) & 1) ^ 1)
                _copy_in(k0, k1, k2, k3, br, b, kv_combo, rbase + j * BLOCK_N, kv_ready.index(st),
                         k_smem.index(st), True)
                _copy_in(v0, v1, v2, v3, br, b, kv_combo, rbase + j * BLOCK_N, kv_ready.index(st),
                         v_smem.index(st), True)
            c += n_k
            it += 1
            if ZFILL:
                _zero_gaps(dq0, dq1, dq2, dq3, row, RB, H, b, br, rbase + row0, z_smem)
    tma.store_wait(0)


@gluon.jit
def _dq_consumer(dq0, dq1, dq2, dq3, DQ, DQF, SEL, N, OUT, LSE, DELTA, DLSE, TABLE, RB, T, B, H, PHASES, NPH, BAR,
                 qk_scale, sm_scale, stride_b, stride_lb, stride_lh, q_smem, do_smem, k_smem, v_smem, dq_smem,
                 t_ready, t_empty, kv_ready, kv_empty, WG: gl.constexpr, HEAD_DIM: gl.constexpr, HALF: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, HAS_DLSE: gl.constexpr, CAUSAL: gl.constexpr,
                 ACC: gl.constexpr, PHASED: gl.constexpr, OVERLAP: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
    # S, dP: (HALF queries, BLOCK_N keys); dQ: (HALF queries, HEAD_DIM)
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, HEAD_DIM, 16])
    op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, s_l)
    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    b0 = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    q_half = q_smem.slice(WG * HALF, HALF)
    do_half = do_smem.slice(WG * HALF, HALF)
    dq_out = dq_smem.index(WG)
    c = 0
    it = 0
    for ph in range(NPH if PHASED else 1):
        start, count, n_mine = _phase(PHASES, ph, T, B, pid, G, PHASED)
        for i in range(n_mine):
            b, row = _walk_tile(TABLE, start, count, pid, i, G, b0, PHASED)
            br, combo, rbase = _tile_coords(row, RB, H)
            head = gl.load(row + 0)
            pos0 = gl.load(row + 2)
            row0 = gl.load(row + 4) + WG * HALF
            r = gl.load(RB + br)
            n_k, n_full = _key_walk(row, BLOCK_N, CAUSAL)
            if CAUSAL:
                q_rows = row0 + gl.arange(0, HALF, layout=rows_l)
            offs = (b.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh + pos0
                    + (row0 + gl.arange(0, HALF, layout=rows_l)) * r)
            lse = gl.load(LSE + offs)
            lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            # O's rows by pointers, issued before the wait (its shared buffer would cost the K/V ring a stage)
            o_rows = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, blk))
            o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, blk))
            o_ptrs = (OUT + b.to(gl.int64) * stride_b
                      + (pos0 + gl.expand_dims(o_rows, 1) * r).to(gl.int64) * (H * HEAD_DIM)
                      + head * HEAD_DIM + gl.expand_dims(o_cols, 0))
            o_val = gl.load(o_ptrs)
            mbarrier.wait(t_ready, (it if PHASED else i) & 1)
            # delta = rowsum(dO * O) - dlse of these rows, for this kernel and for dk/dv
            prod = do_half.load(blk).to(gl.float32) * o_val.to(gl.float32)
            delta = gl.convert_layout(gl.sum(prod, axis=1), rows_l)
            if HAS_DLSE:
                delta = delta - gl.load(DLSE + offs)
            gl.store(DELTA + offs, delta)
            if OVERLAP:
                if i == n_mine - 1:
                    _grid_arrive(BAR)
            dq = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
            for j in range(n_k):
                g = c + j
                st = g % STAGES
                k_t = k_smem.index(st)
                mbarrier.wait(kv_ready.index(st), (g // STAGES) & 1)
                s_tok = warpgroup_mma(q_half, k_t.permute((1, 0)),
                                      gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False,
                                      is_async=True)
                dp_tok = warpgroup_mma(do_half, v_smem.index(st).permute((1, 0)),
                                       gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False,
                                       is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_tok, ))
                if CAUSAL:
                    s = _causal_s(s, j, n_full, q_rows, BLOCK_N, cols_l)
                p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
                dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
                ds = p * (dp - gl.expand_dims(delta, 1))
                dq_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_l), k_t, dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
                mbarrier.arrive(kv_empty.index(st), count=1)
            mbarrier.arrive(t_empty, count=1)
            c += n_k
            it += 1
            if ACC:
                _phase_wait(BAR, ph, i, G, PHASED)
                _acc_rows(DQ, DQF, SEL, N, dq * sm_scale, b, head, pos0, row0, r, H, stride_b, HEAD_DIM, HALF, ACC,
                          PHASED, ph, NPH)
            else:
                _store_out(dq0, dq1, dq2, dq3, br, b, combo, rbase + row0, dq_out, (dq * sm_scale).to(dtype))
        if PHASED:
            _grid_arrive(BAR + ph)
    tma.store_wait(0)


# NPH never specialised: triton 3.6 crashes compiling a phased (PHASED, ACC 2) launch whose phase count is the
# constant 1 ("all" mode with one branch; tests/test_gluon_compile.py)
@gluon.jit(do_not_specialize=["NPH"])
def gluon_bwd_dq(Q, K, V, DO, OUT, DQ, LSE, DELTA, DLSE, TABLE, RB, T, B, N, H, PHASES, NPH, BAR, qk_scale, sm_scale,
                 stride_b, stride_lb, stride_lh, stride_kb, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ZFILL: gl.constexpr, HAS_DLSE: gl.constexpr,
                 CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr, ACC: gl.constexpr,
                 PHASED: gl.constexpr, DQF=None, SEL=None, GQA: gl.constexpr = 1, OVERLAP: gl.constexpr = False):
    # DQF, SEL: ACC 3 and 4 only (_final_rows). GQA > 1: K and V have H // GQA heads, batch stride stride_kb.
    # OVERLAP: [Note: overlap]
    if OVERLAP:
        _launch_dependents(T)
    dtype: gl.constexpr = Q.dtype.element_ty
    HALF: gl.constexpr = BLOCK_M // 2
    q0, q1, q2, q3 = _branch_descs(Q, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    do0, do1, do2, do3 = _branch_descs(DO, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    if GQA > 1:
        k0, k1, k2, k3 = _branch_descs(K, RB, B, N, H // GQA, stride_kb, BLOCK_N, HEAD_DIM)
        v0, v1, v2, v3 = _branch_descs(V, RB, B, N, H // GQA, stride_kb, BLOCK_N, HEAD_DIM)
    else:
        k0, k1, k2, k3 = _branch_descs(K, RB, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
        v0, v1, v2, v3 = _branch_descs(V, RB, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
    dq0, dq1, dq2, dq3 = _branch_descs(DQ, RB, B, N, H, stride_b, HALF, HEAD_DIM)
    m_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    n_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    h_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, HEAD_DIM], dtype)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)
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
    # "ready" phases take all their copies (Q and dO; K and V), each arriving once with its byte count
    mbarrier.init(t_ready, count=2)
    mbarrier.init(t_empty, count=2)
    for st in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(st), count=2)
        mbarrier.init(kv_empty.index(st), count=2)
    gl.warp_specialize([
        (_dq_consumer, (dq0, dq1, dq2, dq3, DQ, DQF, SEL, N, OUT, LSE, DELTA, DLSE, TABLE, RB, T, B, H, PHASES, NPH,
                        BAR, qk_scale, sm_scale, stride_b, stride_lb, stride_lh, q_smem, do_smem, k_smem, v_smem,
                        dq_smem, t_ready, t_empty, kv_ready, kv_empty, 0, HEAD_DIM, HALF, BLOCK_N, STAGES, HAS_DLSE,
                        CAUSAL, ACC, PHASED, OVERLAP)),
        (_dq_consumer, (dq0, dq1, dq2, dq3, DQ, DQF, SEL, N, OUT, LSE, DELTA, DLSE, TABLE, RB, T, B, H, PHASES, NPH,
                        BAR, qk_scale, sm_scale, stride_b, stride_lb, stride_lh, q_smem, do_smem, k_smem, v_smem,
                        dq_smem, t_ready, t_empty, kv_ready, kv_empty, 1, HEAD_DIM, HALF, BLOCK_N, STAGES, HAS_DLSE,
                        CAUSAL, ACC, PHASED, OVERLAP)),
        (_dq_producer, (q0, q1, q2, q3, do0, do1, do2, do3, k0, k1, k2, k3, v0, v1, v2, v3, dq0, dq1, dq2, dq3, TABLE,
                        RB, T, B, H, PHASES, NPH, q_smem, do_smem, k_smem, v_smem, z_smem, t_ready, t_empty, kv_ready,
                        kv_empty, BLOCK_N, STAGES, ZFILL, CAUSAL, PHASED, GQA)),
    ], [4, 4], [CONSUMER_REGS, 512 - 2 * CONSUMER_REGS])


@gluon.jit
def _dkdv_producer(q0, q1, q2, q3, o0, o1, o2, o3, k0, k1, k2, k3, v0, v1, v2, v3, dk0, dk1, dk2, dk3, dv0, dv1, dv2,
                   dv3, LD, stride_ld, stride_lb, stride_lh, TABLE, RB, T, B, H, PHASES, NPH, k_smem, v_smem, q_smem,
                   do_smem, ld_smem, z_smem, kv_ready, kv_empty, qd_ready, qd_empty, BLOCK_M: gl.constexpr,
                   HALF: gl.constexpr, STAGES: gl.constexpr, ZFILL: gl.constexpr, CAUSAL: gl.constexpr,
                   PHASED: gl.constexpr, GQA: gl.constexpr, HEAD_END, SPLIT: gl.constexpr):
    # per step: the 64 queries' lse and delta (strided by r: no TMA) by cp.async into the step's ld_smem slot, one
    # element per thread, each thread arriving on qd_ready when its copy lands; then Q and dO by TMA
    ld_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    idx = gl.arange(0, 2 * BLOCK_M, layout=ld_l)
    which = idx // BLOCK_M   # 0: lse, 1: delta
    steps = idx % BLOCK_M
    b0 = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    c = 0
    it = 0
    for ph in range(NPH if PHASED else 1):
        start, count, n_mine = _phase(PHASES, ph, T, B, pid, G, PHASED)
        for i in range(n_mine):
            b, row = _walk_tile(TABLE, start, count, pid, i, G, b0, PHASED)
            br, combo, rbase = _tile_coords(row, RB, H)
            row0 = gl.load(row + 4)
            n_m = gl.cdiv(gl.load(row + 3), BLOCK_M)
            if CAUSAL:
                j0 = gl.load(row + 5) // BLOCK_M  # query steps before lo see none of the tile's keys
            else:
                j0 = 0
            r = gl.load(RB + br)
            kv_combo = _kv_combo(row, RB, H, combo, GQA)
            n_h, h_step = _query_heads(row, r, HEAD_END, GQA, PHASED, SPLIT)
            ld_base = LD + b.to(gl.int64) * stride_lb + gl.load(row + 0).to(gl.int64) * stride_lh + gl.load(row + 2)
            mbarrier.wait(kv_empty, ((it if PHASED else i) & 1) ^ 1)
            _copy_in(k0, k1, k2, k3, br, b, kv_combo, rbase + row0, kv_ready, k_smem, True)
            _copy_in(v0, v1, v2, v3, br, b, kv_combo, rbase + row0, kv_ready, v_smem, True)
            # GQA: the steps of each of the tile's query heads in turn (one head where GQA is 1)
            q_combo = combo
            for t in range(n_h):
                for j in range(j0, n_m):
                    g = c + j - j0
                    st = g % STAGES
                    mbarrier.wait(qd_empty.index(st), ((g // STAGES) & 1) ^ 1)
                    async_copy.async_copy_global_to_shared(ld_smem.index(st),
                                                           ld_base + which * stride_ld + (j * BLOCK_M + steps) * r)
                    async_copy.mbarrier_arrive(qd_ready.index(st), increment_count=False)
                    _copy_in(q0, q1, q2, q3, br, b, q_combo, rbase + j * BLOCK_M, qd_ready.index(st),
                             q_smem.index(st), True)
                    _copy_in(o0, o1, o2, o3, br, b, q_combo, rbase + j * BLOCK_M, qd_ready.index(st),
                             do_smem.index(st), True)
                c += n_m - j0
                if GQA > 1:
                    q_combo += h_step
                    ld_base += h_step * stride_lh
            it += 1
            if ZFILL:
                # _zero_gaps for dK and dV in one pass (two calls: the producer's 32 registers spill more), over
                # the kv heads' combos
                own = gl.load(row + 2) % r
                for o in range(0, r):
                    if o != own:
                        zc = o * (H // GQA) + gl.load(row + 0) // GQA
                        for half in gl.static_range(2):
                            _copy_out(dk0, dk1, dk2, dk3, br, b, zc, rbase + row0 + half * HALF, z_smem)
                            _copy_out(dv0, dv1, dv2, dv3, br, b, zc, rbase + row0 + half * HALF, z_smem)
    tma.store_wait(0)


@gluon.jit
def _dkdv_consumer(dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, DK, DV, DKF, DVF, SEL, N, stride_b, TABLE, RB, T, B, H,
                   PHASES, NPH, BAR, qk_scale, sm_scale, k_smem, v_smem, q_smem, do_smem, ld_smem, out_smem,
                   kv_ready, kv_empty, qd_ready, qd_empty, WG: gl.constexpr, HEAD_DIM: gl.constexpr, HALF: gl.constexpr,
                   BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, ACC: gl.constexpr,
                   PHASED: gl.constexpr, GQA: gl.constexpr, HEAD_END, SPLIT: gl.constexpr):
    # stride_b: that of DK and DV (the kv heads' under GQA)
    dtype: gl.constexpr = k_smem.dtype
    # S^T, dP^T: (HALF keys, BLOCK_M queries); dK, dV: (HALF keys, HEAD_DIM)
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, HEAD_DIM, 16])
    op_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)
    b0 = gl.program_id(1)
    pid = gl.program_id(0)
    G = gl.num_programs(0)
    k_half = k_smem.slice(WG * HALF, HALF)
    v_half = v_smem.slice(WG * HALF, HALF)
    out = out_smem.index(WG)
    c = 0
    it = 0
    for ph in range(NPH if PHASED else 1):
        start, count, n_mine = _phase(PHASES, ph, T, B, pid, G, PHASED)
        for i in range(n_mine):
            b, row = _walk_tile(TABLE, start, count, pid, i, G, b0, PHASED)
            br, combo, rbase = _tile_coords(row, RB, H)
            L = gl.load(row + 3)
            row0 = gl.load(row + 4) + WG * HALF
            n_m = gl.cdiv(L, BLOCK_M)
            if CAUSAL:
                j0 = gl.load(row + 5) // BLOCK_M
                n_masked = gl.cdiv(gl.load(row + 6), BLOCK_M)  # query steps before n_masked need masks
                k_rows = row0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_l))
            else:
                j0 = 0
            if GQA > 1:
                n_h, _ = _query_heads(row, gl.load(RB + br), HEAD_END, GQA, PHASED, SPLIT)
                jj_end = j0 + n_h * (n_m - j0)
            else:
                n_h = 1
                jj_end = n_m
            dk = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
            dv = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
            mbarrier.wait(kv_ready, (it if PHASED else i) & 1)
            for jj in range(j0, jj_end):
                # GQA: query head jj // (n_m - j0) of the tile's, step j (the same walk for each head)
                if GQA > 1:
                    j = j0 + (jj - j0) % (n_m - j0)
                else:
                    j = jj
                g = c + jj - j0
                st = g % STAGES
                mbarrier.wait(qd_ready.index(st), (g // STAGES) & 1)
                q_t = q_smem.index(st)
                do_t = do_smem.index(st)
                # lse read before the products are issued: read after the wait for S^T, it queued behind the
                # products' own shared-memory reads (dk/dv kernel 1.786 -> 1.640 ms, gluon_dkdv_ld_experiment)
                lse = ld_smem.index(st).slice(0, BLOCK_M).load(cols_l)
                # S^T and dP^T issued together; the softmax of S^T runs while dP^T is computed (FA3's order)
                st_tok = warpgroup_mma(k_half, q_t.permute((1, 0)), gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_l),
                                       use_acc=False, is_async=True)
                dpt_tok = warpgroup_mma(v_half, do_t.permute((1, 0)),
                                        gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_l), use_acc=False,
                                        is_async=True)
                s_t = warpgroup_mma_wait(1, deps=(st_tok, ))
                if CAUSAL:
                    s_t = _causal_st(s_t, j, n_masked, k_rows, BLOCK_M, cols_l)
                lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
                p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse2, 0))
                dv_tok = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_l), do_t, dv, is_async=True)
                dp_t = warpgroup_mma_wait(1, deps=(dpt_tok, ))
                delta = ld_smem.index(st).slice(BLOCK_M, BLOCK_M).load(cols_l)
                ds_t = p_t * (dp_t - gl.expand_dims(delta, 0))
                dk_tok = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_l), q_t, dk, is_async=True)
                dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
                mbarrier.arrive(qd_empty.index(st), count=1)
            mbarrier.arrive(kv_empty, count=1)
            c += n_h * (n_m - j0)
            it += 1
            if ACC:
                head = gl.load(row + 0) // GQA   # DK's and DV's head
                pos0 = gl.load(row + 2)
                r = gl.load(RB + br)
                _phase_wait(BAR, ph, i, G, PHASED)
                # both writes under one branch (two _acc_rows calls spill more in the causal form)
                HK = H // GQA
                if PHASED:
                    if ph == 0:
                        _add_rows(DK, dk * sm_scale, b, head, pos0, row0, r, HK, stride_b, HEAD_DIM, HALF,
                                  ACC == 2 or ACC == 3)
                        _add_rows(DV, dv, b, head, pos0, row0, r, HK, stride_b, HEAD_DIM, HALF, ACC == 2 or ACC == 3)
                    elif ACC >= 3 and ph == NPH - 1:
                        _final_rows(DK, DKF, SEL, N, dk * sm_scale, b, head, pos0, row0, r, HK, stride_b, HEAD_DIM,
                                    HALF)
                        _final_rows(DV, DVF, SEL, N, dv, b, head, pos0, row0, r, HK, stride_b, HEAD_DIM, HALF)
                    else:
                        _add_rows(DK, dk * sm_scale, b, head, pos0, row0, r, HK, stride_b, HEAD_DIM, HALF, False)
                        _add_rows(DV, dv, b, head, pos0, row0, r, HK, stride_b, HEAD_DIM, HALF, False)
                else:
                    _add_rows(DK, dk * sm_scale, b, head, pos0, row0, r, HK, stride_b, HEAD_DIM, HALF, ACC == 2)
                    _add_rows(DV, dv, b, head, pos0, row0, r, HK, stride_b, HEAD_DIM, HALF, ACC == 2)
            else:
                # dK, then dV, through this consumer's one buffer (which leaves room for a third Q/dO stage)
                kv_combo = _kv_combo(row, RB, H, combo, GQA)
                _store_out(dk0, dk1, dk2, dk3, br, b, kv_combo, rbase + row0, out, (dk * sm_scale).to(dtype))
                _store_out(dv0, dv1, dv2, dv3, br, b, kv_combo, rbase + row0, out, dv.to(dtype))
        if PHASED:
            _grid_arrive(BAR + ph)
    tma.store_wait(0)


# NPH never specialised: triton 3.6 crashes compiling a phased (PHASED, ACC 2) launch whose phase count is the
# constant 1 ("all" mode with one branch; tests/test_gluon_compile.py)
@gluon.jit(do_not_specialize=["NPH"])
def gluon_bwd_dkdv(Q, K, V, DO, DK, DV, LD, TABLE, RB, T, B, N, H, PHASES, NPH, BAR, qk_scale, sm_scale, stride_b,
                   stride_ld, stride_lb, stride_lh, stride_kb, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                   BLOCK_M: gl.constexpr, STAGES: gl.constexpr, ZFILL: gl.constexpr, CAUSAL: gl.constexpr,
                   CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr, ACC: gl.constexpr, PHASED: gl.constexpr,
                   DKF=None, DVF=None, SEL=None, GQA: gl.constexpr = 1, HEAD_END=None, SPLIT: gl.constexpr = False,
                   DQ_ARRIVALS=0, OVERLAP: gl.constexpr = False):
    # LD: lse at LD[b, h, n], delta at LD[stride_ld + b, h, n] (one (2, B, H, N) buffer). DKF, DVF, SEL: ACC 3
    # and 4 only (_final_rows). GQA > 1: K, V, DK, DV (and DKF, DVF, SEL) have H // GQA heads, batch stride
    # stride_kb, and TABLE is the lowering's key table for it (a row per key tile of a kv head and a set of its
    # query heads, _query_heads; its head column the set's first query head). SPLIT (grouped mode, PHASED, ACC 1):
    # a kv head's query heads span branches, a phase per branch adds each branch's share; HEAD_END[branch] is
    # the end of the branch's query heads. OVERLAP: [Note: overlap], DQ_ARRIVALS the dq consumers' arrivals on BAR
    dtype: gl.constexpr = Q.dtype.element_ty
    HALF: gl.constexpr = BLOCK_N // 2
    q0, q1, q2, q3 = _branch_descs(Q, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    o0, o1, o2, o3 = _branch_descs(DO, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)
    if GQA > 1:
        skb = stride_kb
        k0, k1, k2, k3 = _branch_descs(K, RB, B, N, H // GQA, stride_kb, BLOCK_N, HEAD_DIM)
        v0, v1, v2, v3 = _branch_descs(V, RB, B, N, H // GQA, stride_kb, BLOCK_N, HEAD_DIM)
        dk0, dk1, dk2, dk3 = _branch_descs(DK, RB, B, N, H // GQA, stride_kb, HALF, HEAD_DIM)
        dv0, dv1, dv2, dv3 = _branch_descs(DV, RB, B, N, H // GQA, stride_kb, HALF, HEAD_DIM)
    else:
        skb = stride_b
        k0, k1, k2, k3 = _branch_descs(K, RB, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
        v0, v1, v2, v3 = _branch_descs(V, RB, B, N, H, stride_b, BLOCK_N, HEAD_DIM)
        dk0, dk1, dk2, dk3 = _branch_descs(DK, RB, B, N, H, stride_b, HALF, HEAD_DIM)
        dv0, dv1, dv2, dv3 = _branch_descs(DV, RB, B, N, H, stride_b, HALF, HEAD_DIM)
    n_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    m_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    h_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, HEAD_DIM], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], n_sl)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], n_sl)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], m_sl)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], m_sl)
    out_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], h_sl)
    # a step's lse then delta (a rank-1 layout: a stage's index() is a plain vector)
    ld_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 2 * BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    z_smem = gl.allocate_shared_memory(dtype, [HALF, HEAD_DIM], h_sl, value=gl.zeros([HALF, HEAD_DIM], dtype, zl))
    fence_async_shared()
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qd_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qd_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # a "ready" phase: K and V (two TMA copies); Q and dO (two TMA copies) and lse/delta (one cp.async arrival per
    # producer thread: 4 warps)
    mbarrier.init(kv_ready, count=2)
    mbarrier.init(kv_empty, count=2)
    for st in gl.static_range(STAGES):
        mbarrier.init(qd_ready.index(st), count=2 + 4 * 32)
        mbarrier.init(qd_empty.index(st), count=2)
    if OVERLAP:
        _grid_wait(BAR, DQ_ARRIVALS)   # every delta written and visible; the producer's copies come after this
    gl.warp_specialize([
        (_dkdv_consumer, (dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, DK, DV, DKF, DVF, SEL, N, skb, TABLE, RB, T,
                          B, H, PHASES, NPH, BAR, qk_scale, sm_scale, k_smem, v_smem, q_smem, do_smem, ld_smem,
                          out_smem, kv_ready, kv_empty, qd_ready, qd_empty, 0, HEAD_DIM, HALF, BLOCK_M, STAGES,
                          CAUSAL, ACC, PHASED, GQA, HEAD_END, SPLIT)),
        (_dkdv_consumer, (dk0, dk1, dk2, dk3, dv0, dv1, dv2, dv3, DK, DV, DKF, DVF, SEL, N, skb, TABLE, RB, T,
                          B, H, PHASES, NPH, BAR, qk_scale, sm_scale, k_smem, v_smem, q_smem, do_smem, ld_smem,
                          out_smem, kv_ready, kv_empty, qd_ready, qd_empty, 1, HEAD_DIM, HALF, BLOCK_M, STAGES,
                          CAUSAL, ACC, PHASED, GQA, HEAD_END, SPLIT)),
        (_dkdv_producer, (q0, q1, q2, q3, o0, o1, o2, o3, k0, k1, k2, k3, v0, v1, v2, v3, dk0, dk1, dk2, dk3, dv0,
                          dv1, dv2, dv3, LD, stride_ld, stride_lb, stride_lh, TABLE, RB, T, B, H, PHASES, NPH, k_smem,
                          v_smem, q_smem, do_smem, ld_smem, z_smem, kv_ready, kv_empty, qd_ready, qd_empty, BLOCK_M,
                          HALF, STAGES, ZFILL, CAUSAL, PHASED, GQA, HEAD_END, SPLIT)),
    ], [4, 4], [CONSUMER_REGS, 512 - 2 * CONSUMER_REGS])
    if OVERLAP:
        _wait_prerequisite(T)
'''
