"""Experiment: the Gluon forward's cost per query tile. Two Q buffers (the next tile's Q copied while this tile's last
key steps run, out staged through the finished tile's Q buffer), and the zero fill's stores spread or left out.

Why: the four-branch grouped 64K forward runs at about 593 useful TFLOP/s against 721 for the dense 16K forward on
the same kernel (stop 32, H100). Both have the same per-step work; the difference is the number of key steps per
query tile (16 against 128). Fitting t_tile = 16 s + X to both gives a per-tile cost X of about 5 us, about three
steps' worth. Two suspects:

* Q's copy. In the lowering's kernel one Q buffer is released only when both consumers have finished the tile's S
  products, so the next tile's Q copy (from HBM: Q is read once) starts under the last P V product and the
  epilogue, and the consumers may then wait for it. With two buffers the producer copies Q_{i+1} as soon as it
  has issued tile i's K/V copies (two steps before the end of the tile with two stages). Shared memory stays at
  the lowering's: the 32 KB out buffer goes, the second 32 KB Q buffer comes. Q is copied as two 64-row halves, so
  that a consumer's half is one contiguous [64, D] block; the consumer writes its out there once its own last S
  has completed, and hands the buffer back to the producer early in the next tile, after that store has read it
  (`tma.store_wait(0)` after the next tile's S_0).
* The zero fill: 2 (r - 1) TMA stores of a zero tile per tile (the positions a head's branch does not select:
  136 MB of the 256 MB of out at 64K), all issued after the tile's last K/V copies, where they stand in the copy
  engine's queue before the next tile's Q and K/V. One form spreads them over the key steps (one after each
  step's copies); a diagnostic form leaves them out (its out is not the lowering's: timed only).

The arithmetic of the other forms is unchanged, so their out and lse must be bitwise equal to the lowering's.

Outcome (H100, stop 33, 5 alternating rounds, not causal; `../results/H100-triton.md`, "Stop 33"), median ms, fwd
and fwd+bwd (every form's forward with the lowering's backward): the lowering 0.890 / 3.797; two Q buffers 0.879 /
3.826; zero stores spread 0.881 / 3.816 (bitwise equal); both 0.885 / 3.803; no zero fill 0.878 / 3.811. Every
difference is inside the rounds' spread (the lowering's forward alone read 0.830 to 0.903). Neither the Q copy
nor the zero fill is the per-tile cost; nothing adopted.

The two-Q-buffer form that ran was not bitwise equal to the lowering. Its cause, found afterwards by compiling for
sm_90a: that form kept Q in 128-row buffers and wrote out through `slice(WG * 64, 64)` of them, but in the
128-byte swizzled layout a [128, 128] bf16 tile is stored as two column blocks of [128, 64], so rows 64..127 are
not one contiguous [64, 128] block; the reinterpreted view's TMA store read from 8 KB in, not 16 KB (and each
consumer's out block overlapped the other's Q rows). The timing holds for the schedule (the same copies, products
and barriers; only that store's source address was wrong). The form in this file is the corrected one (Q in 64-row
halves, as described above); it compiles for sm_90a (the same shared memory, 64 HGMMAs, no spills) and has not run
on a GPU.

Stop 34 adds two forms on the two Q buffers that go after the other part of a tile's fixed cost: the tensor cores
idle from the tile's last P V product, through the epilogue (out normalised, stored; lse stored), the next tile's
S_0 and its softmax, with both consumers in step. Here the next tile's S_0 is issued before this tile's epilogue:
under the last P V and the whole epilogue, or (fewer live registers) once out is normalised, under its stores only.
Its result is carried into the next iteration as a plain tensor, so no product is in flight across the loop's back
edge; on the last tile it is set to a constant, since carrying the key loop's last S kept 64 more registers alive
through every step (2 and 4 spill instructions among a step's products, 33 and 39 elsewhere; with the constant,
none). Compiled for sm_90a: 80 HGMMAs (tile 0's S_0 peeled), no spills. Run at stop 35 (H100, `--causal no
--rounds 3 --forms 5,6`): forward 0.882 ms (form 5) and 0.889 (form 6) against the lowering's 0.908 (rounds 0.819,
0.911, 0.908); fwd+bwd 3.755 and 4.015 against 3.753. Both bitwise equal to the lowering, neither outside its
spread. Form 5 again at stop 36 (H100, `--causal no --rounds 7 --forms 5`): forward 0.905 ms (0.891-0.931) against
the lowering's 0.882 (0.859-0.905), fwd+bwd 3.841 against 3.846; bitwise equal, slower. Not adopted.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_q2_experiment.py [--forms 1,5,6]

``--check-compile`` compiles the forms' forward for sm_90a without a GPU (triton 3.6).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_variants import patch_gluon, print_results  # noqa: E402

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))

Q2_PATCHES = [
    # Q copied as two 64-row halves (a consumer's half is then one contiguous [64, D] block, the layout of out's
    # 64-row TMA blocks), into two tiles' buffers: q_smem[2 * buffer + consumer]
    ("    q0, q1, q2, q3 = _branch_descs(Q, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)\n"
     "    k0, k1, k2, k3 = _branch_descs(K, RB, B, N, H // GQA, stride_kb, BLOCK_N, HEAD_DIM)\n",
     "    q0, q1, q2, q3 = _branch_descs(Q, RB, B, N, H, stride_b, BLOCK_M // 2, HEAD_DIM)\n"
     "    k0, k1, k2, k3 = _branch_descs(K, RB, B, N, H // GQA, stride_kb, BLOCK_N, HEAD_DIM)\n"),
    ("    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)\n"
     "    o_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], h_sl)\n",
     "    q_smem = gl.allocate_shared_memory(dtype, [4, HALF, HEAD_DIM], h_sl)\n"
     "    o_smem = q_smem\n"),
    ("    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())\n"
     "    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())\n",
     "    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())\n"
     "    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())\n"),
    ("    mbarrier.init(q_ready, count=1)\n    mbarrier.init(q_empty, count=2)\n",
     "    for qb in gl.static_range(2):\n"
     "        mbarrier.init(q_ready.index(qb), count=2)\n"
     "        mbarrier.init(q_empty.index(qb), count=2)\n"),
    # the producer: tile i's Q into buffer i % 2, one copy per half
    ("        mbarrier.wait(q_empty, (i & 1) ^ 1)\n"
     "        _copy_in(q0, q1, q2, q3, br, b, combo, rbase + gl.load(row + 4), q_ready, q_smem, True)\n",
     "        qb = i % 2\n"
     "        q_row = rbase + gl.load(row + 4)\n"
     "        mbarrier.wait(q_empty.index(qb), ((i // 2) & 1) ^ 1)\n"
     "        _copy_in(q0, q1, q2, q3, br, b, combo, q_row, q_ready.index(qb), q_smem.index(2 * qb), True)\n"
     "        _copy_in(q0, q1, q2, q3, br, b, combo, q_row + q0.block_type.shape[2], q_ready.index(qb),\n"
     "                 q_smem.index(2 * qb + 1), True)\n"),
    # the consumers: their half of buffer i % 2, for S and then for out
    ("    q_half = q_smem.slice(WG * HALF, HALF)\n    o_half = o_smem.index(WG)\n", ""),
    ("        mbarrier.wait(q_ready, i & 1)\n",
     "        qb = i % 2\n"
     "        q_half = q_smem.index(2 * qb + WG)\n"
     "        mbarrier.wait(q_ready.index(qb), (i // 2) & 1)\n"),
    # the previous tile's buffer back to the producer once its out store has read it
    ("        s = warpgroup_mma_wait(0, deps=(s_tok, ))\n"
     "        mbarrier.arrive(k_empty.index(st), count=1)\n",
     "        s = warpgroup_mma_wait(0, deps=(s_tok, ))\n"
     "        mbarrier.arrive(k_empty.index(st), count=1)\n"
     "        if i > 0:\n"
     "            tma.store_wait(0)\n"
     "            mbarrier.arrive(q_empty.index(1 - qb), count=1)\n"),
    ("        mbarrier.arrive(q_empty, count=1)\n", ""),
    ("_store_out(o0, o1, o2, o3, br, b, combo, rbase + row0, o_half, out.to(dtype))",
     "_store_out(o0, o1, o2, o3, br, b, combo, rbase + row0, q_half, out.to(dtype))"),
]
NOZ_PATCHES = [("        if ZFILL:\n            _zero_gaps(o0,", "        if False:\n            _zero_gaps(o0,")]
# the zero stores spread over the tile's key steps (one after each step's K/V copies), instead of all 2 (r - 1) of
# them after the tile's last copies, where they stand in the copy engine's queue before the next tile's Q and K/V
ZSPREAD_PATCHES = [
    ("@gluon.jit\ndef _producer(",
     "@gluon.jit\n"
     "def _zero_one(d0, d1, d2, d3, branch, b, H, head, own, span0, j, z_smem):\n"
     "    # zero store j of a tile's 2 (r - 1): offset j // 2 among those not the tile's own, half j % 2\n"
     "    oi = j // 2\n"
     "    o = oi + (oi >= own).to(gl.int32)\n"
     "    _copy_out(d0, d1, d2, d3, branch, b, o * H + head, span0 + (j % 2) * d0.block_type.shape[2], z_smem)\n"
     "\n\n@gluon.jit\ndef _producer("),
    ("        n_k, _ = _key_walk(row, BLOCK_N, CAUSAL)\n"
     "        # Q's buffer is free",
     "        n_k, _ = _key_walk(row, BLOCK_N, CAUSAL)\n"
     "        n_z = 0\n"
     "        own = 0\n"
     "        zh = 0\n"
     "        span0 = 0\n"
     "        if ZFILL:\n"
     "            r_z = gl.load(RB + br)\n"
     "            own = gl.load(row + 2) % r_z\n"
     "            n_z = 2 * (r_z - 1)\n"
     "            zh = gl.load(row + 0)\n"
     "            span0 = rbase + gl.load(row + 4)\n"
     "        # Q's buffer is free"),
    ("            _copy_in(v0, v1, v2, v3, br, b, kv_combo, rbase + j * BLOCK_N, v_ready.index(st), v_smem.index(st),\n"
     "                     True)\n"
     "        c += n_k\n"
     "        if ZFILL:\n"
     "            _zero_gaps(o0, o1, o2, o3, row, RB, H, b, br, rbase + gl.load(row + 4), z_smem)\n",
     "            _copy_in(v0, v1, v2, v3, br, b, kv_combo, rbase + j * BLOCK_N, v_ready.index(st), v_smem.index(st),\n"
     "                     True)\n"
     "            if j < n_z:\n"
     "                _zero_one(o0, o1, o2, o3, br, b, H, zh, own, span0, j, z_smem)\n"
     "        c += n_k\n"
     "        for j in range(n_k, n_z):\n"
     "            _zero_one(o0, o1, o2, o3, br, b, H, zh, own, span0, j, z_smem)\n"),
]
# Two Q buffers, and each tile's S_0 issued under the previous tile's last P V product and epilogue: the consumer
# issues tile i's last P V, then tile i + 1's S_0 (its Q is in the other buffer), waits for the P V only, writes
# tile i's out and lse while S_0 runs, and carries S_0's result into the next iteration, where its softmax opens
# the tile. No product is in flight across the loop's back edge (that form ptxas serialises: C7512)
EARLY_CONSUMER = '''@gluon.jit
def _fwd_epilogue(o0, o1, o2, o3, LSE, br, b, combo, rbase, row0, head, pos0, L, r, out, l_i, m_i, q_half, stride_lg,
                  stride_lb, stride_lh, rows_l: gl.constexpr, HALF: gl.constexpr, MERGE: gl.constexpr):
    # out (normalised, in the input dtype) through this consumer's half of the finished tile's Q buffer and a TMA
    # store, lse by pointers
    _store_out(o0, o1, o2, o3, br, b, combo, rbase + row0, q_half, out)
    rows = row0 + gl.arange(0, HALF, layout=rows_l)
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    lse_ptr = LSE
    if MERGE:
        lse_ptr += br.to(gl.int64) * stride_lg
    gl.store(lse_ptr + b.to(gl.int64) * stride_lb + head.to(gl.int64) * stride_lh + pos0 + rows * r, lse,
             mask=rows < L)


@gluon.jit
def _consumer(o0, o1, o2, o3, LSE, TABLE, RB, T, H, qk_scale, stride_lg, stride_lb, stride_lh, q_smem, o_smem, k_smem,
              v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
              HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              MERGE: gl.constexpr):
    dtype: gl.constexpr = q_smem.dtype
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
    c = 0
    # tile 0's S_0 before the loop
    s = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l)
    if n_mine > 0:
        mbarrier.wait(q_ready.index(0), 0)
        mbarrier.wait(k_ready.index(0), 0)
        s_tok = warpgroup_mma(q_smem.index(WG), k_smem.index(0).permute((1, 0)),
                              gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(0), count=1)
    for i in range(n_mine):
        row = TABLE + (pid + i * G) * NCOLS
        br, combo, rbase = _tile_coords(row, RB, H)
        head = gl.load(row + 0)
        pos0 = gl.load(row + 2)
        L = gl.load(row + 3)
        row0 = gl.load(row + 4) + WG * HALF
        r = gl.load(RB + br)
        n_k, n_full = _key_walk(row, BLOCK_N, CAUSAL)
        qb = i % 2
        q_half = q_smem.index(2 * qb + WG)
        if CAUSAL:
            q_rows = row0 + gl.arange(0, HALF, layout=rows_l)
            s = _causal_s(s, 0, n_full, q_rows, BLOCK_N, cols_l)
        m_i = gl.max(s, axis=1) * qk_scale
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, axis=1)
        p_prev = gl.convert_layout(p.to(dtype), p_op)
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=mma)
        if i > 0:
            # the previous tile's out store has read the other buffer: it takes tile i + 1's Q
            tma.store_wait(0)
            mbarrier.arrive(q_empty.index(1 - qb), count=1)
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
        g = c + n_k - 1
        st = g % STAGES
        mbarrier.wait(v_ready.index(st), (g // STAGES) & 1)
        acc_tok = warpgroup_mma(p_prev, v_smem.index(st), acc, is_async=True)
        c += n_k
        if i + 1 < n_mine:
            nst = c % STAGES
            mbarrier.wait(q_ready.index(1 - qb), ((i + 1) // 2) & 1)
            mbarrier.wait(k_ready.index(nst), (c // STAGES) & 1)
#BRANCH
            s = warpgroup_mma_wait(0, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(nst), count=1)
        else:
            acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
            mbarrier.arrive(v_empty.index(st), count=1)
            out = (acc / gl.expand_dims(gl.convert_layout(l_i, acc_rows), 1)).to(dtype)
            _fwd_epilogue(o0, o1, o2, o3, LSE, br, b, combo, rbase, row0, head, pos0, L, r, out, l_i, m_i, q_half,
                          stride_lg, stride_lb, stride_lh, rows_l, HALF, MERGE)
            # no next tile: a constant, so that the key loop's last S is not kept alive past its softmax
            s = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l)
    tma.store_wait(0)


'''
# A: S_0 issued before the wait for the last P V, so it runs under that product's tail and the whole epilogue
EARLY_UNDER_PV = '''            s_tok = warpgroup_mma(q_smem.index(2 * (1 - qb) + WG), k_smem.index(nst).permute((1, 0)),
                                  gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc_tok, ))
            mbarrier.arrive(v_empty.index(st), count=1)
            out = (acc / gl.expand_dims(gl.convert_layout(l_i, acc_rows), 1)).to(dtype)
            _fwd_epilogue(o0, o1, o2, o3, LSE, br, b, combo, rbase, row0, head, pos0, L, r, out, l_i, m_i, q_half,
                          stride_lg, stride_lb, stride_lh, rows_l, HALF, MERGE)
'''
# B: S_0 issued once out is normalised (acc's registers free), under the out store and the lse store only
EARLY_AFTER_NORM = '''            acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
            mbarrier.arrive(v_empty.index(st), count=1)
            out = (acc / gl.expand_dims(gl.convert_layout(l_i, acc_rows), 1)).to(dtype)
            s_tok = warpgroup_mma(q_smem.index(2 * (1 - qb) + WG), k_smem.index(nst).permute((1, 0)),
                                  gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False, is_async=True)
            _fwd_epilogue(o0, o1, o2, o3, LSE, br, b, combo, rbase, row0, head, pos0, L, r, out, l_i, m_i, q_half,
                          stride_lg, stride_lb, stride_lh, rows_l, HALF, MERGE)
'''


def early_patches(text: str, branch: str):
    """Q2_PATCHES' kernel and producer parts, and the consumer replaced by EARLY_CONSUMER with ``branch`` (the
    order of the next S_0 and this tile's epilogue)."""
    start = text.index("@gluon.jit\ndef _consumer(")
    end = text.index("@gluon.jit\ndef _branch_desc(")
    return Q2_PATCHES[:5] + [(text[start:end], EARLY_CONSUMER.replace("#BRANCH\n", branch))]


FORMS = ("the lowering", "two Q buffers", "zero stores spread", "two Q buffers, zero stores spread",
         "no zero fill (diagnostic)", "two Q buffers, next S_0 under the last P V and epilogue",
         "two Q buffers, next S_0 under the out store")
EXACT = set(FORMS[:4]) | set(FORMS[5:])


def variant(low, form: str):
    """``low`` with its Gluon forward changed as the form says."""
    if form in FORMS[5:]:
        branch = EARLY_UNDER_PV if form == FORMS[5] else EARLY_AFTER_NORM
        return patch_gluon(low, form, early_patches(low._gluon_text, branch))
    patches = {FORMS[0]: [], FORMS[1]: Q2_PATCHES, FORMS[2]: ZSPREAD_PATCHES, FORMS[3]: Q2_PATCHES + ZSPREAD_PATCHES,
               FORMS[4]: NOZ_PATCHES}[form]
    return patch_gluon(low, form, patches) if patches else low


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, summarize
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        for form in FORMS:
            kernels = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form).gluon_kernels
            label = f"causal={causal}, {form}, gluon_fwd"
            try:
                compiled = compile_sm90(kernels.gluon_fwd, launch_constexprs("gluon_fwd", D, causal))
                print(f"{label}: {summarize(compiled)}", flush=True)
            except Exception as e:
                print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check-compile", action="store_true")
    ap.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--forms", default=",".join(str(i) for i in range(len(FORMS))),
                    help="the forms to run, by index into FORMS (0, the lowering, is always run)")
    args = ap.parse_args()
    forms = tuple(FORMS[i] for i in sorted({0} | {int(x) for x in args.forms.split(",")}))
    if args.check_compile:
        return check_compile()
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for causal in {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]:
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in forms}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        base = lows[FORMS[0]]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        equal = {}
        for f in forms:
            if f not in EXACT:
                equal[f] = "not checked"
                continue
            oks = []
            for _ in range(3):   # a race would show as a difference on some run
                o, l_, _a = lows[f].forward(q, k, v)
                oks.append(torch.equal(o, out) and torch.equal(l_, lse))
            equal[f] = all(oks)
        print(f"causal={causal}: out, lse bitwise equal to the lowering's (3 runs each): {equal}", flush=True)
        times = {(f, p): [] for f in forms for p in ("fwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in forms:
                low = lows[f]

                def step():
                    # the lowering's backward for every form (they differ in the forward only), so that the
                    # forms' backward kernels need not be compiled again
                    o, l_, a = low.forward(q, k, v)
                    base.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "fwd")].append(do_bench(lambda: low.forward(q, k, v), warmup=5, rep=100,
                                                  return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal[f], ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, lows, base
        torch.cuda.empty_cache()
    print_results(rows, args.rounds, H, D)


if __name__ == "__main__":
    main()
