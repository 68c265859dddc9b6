"""Experiment: the grouped backward with dS stored by the dk/dv kernel and dQ made from it, instead of recomputed.

Why: the lowering's split backward runs 7 matrix products per (query block, key block): gluon_bwd_dq recomputes S
and dP before dQ = dS K; gluon_bwd_dkdv computes S^T, dP^T, dV and dK. cuDNN's fused backward runs 5. Stop 13's
fused form (dQ added from the dk/dv kernel by TMA reduce-adds) was slower: the dQ product put the two consumers in
lock step, and the adds and the write-out of finished segments cost more than the product saved
(benchmarks/results/H100-triton.md). Here the dk/dv kernel keeps its 4 products and only stores its dS^T tiles
(bf16, through the consumer's output buffer and TMA stores, no extra product, no synchronisation between
consumers). A separate kernel then makes dQ = dS K from them: one product per block pair, bound by reading dS.

Per block pair the new form moves 2 x 8 KB of dS (one store, one load) instead of running 2 products. Whether that
is cheaper on an H200 (memory 4.8 TB/s; the products run at the power limit) is the question. The probe stores
every segment's dS in full (a workspace of size N*w, 1.9 GiB at 64K), which the memory target forbids; a form worth
adopting would need a bounded ring of segments. The probe answers first whether it is worth building.

The new backward, in order:
- ``delta``: delta = rowsum(dO * O) of every row (a tl kernel; the lowering's dq kernel writes it today);
- ``gluon_bwd_dkdv`` patched (VARIANTS): each step also stores dS^T (64 keys x 64 queries per consumer) to the
  workspace, viewed as one (L x L) matrix per segment, keys down and queries across, through two 64 x 64 slots of
  the consumer's output buffer;
- dQ = dS K per 128-query tile over the segment's key tiles, dS^T read from the workspace: ``dq_from_ds`` (tl,
  pointer loads) or ``gluon_dq_from_ds`` (TMA ring, asynchronous warpgroup MMAs, A = the dS^T block transposed).

Case: four-branch grouped N = 64K (every segment has L = 2048 selected rows), bf16, 16 heads, D = 128, batch 1.

Result (H200, stop 17; benchmarks/results/H200-triton.md): a small gain, and not adopted.
- dq matches the lowering's to 8.3e-4 of its largest value, dk to 6.7e-4 (delta is summed in another order), dv is
  bitwise equal; the same on a second run of each form.
- Storing dS costs the dk/dv kernel 0.22-0.29 ms (1.996-2.063 against 1.773 ms). Without the stores to global
  memory (shared stores and waits kept) it costs 0.05 ms: the cost is writing 1.9 GiB.
- dQ from dS takes 0.776 ms at best (Gluon, 64-key blocks, 6 stages: 2.4 TB/s of dS), against 1.226 ms for
  gluon_bwd_dq; the tl kernel takes 1.31 ms.
- Backward 2.969 against 3.064 ms, fwd+bwd 3.911 against 4.089 (median of 3 rounds): about 4%.
- Adopting it would need the workspace bounded, which the 4% does not pay for: the dS of the segments in flight
  (8 MiB each) exceeds L2, so a ring still writes and reads it through HBM, and adds waits between programs.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_ds_experiment.py [--rounds 3]

``--check-compile`` compiles the patched dk/dv kernels and ``gluon_dq_from_ds`` for sm_90a without a GPU (triton
3.6). ``--check-cpu`` runs ``dq_from_ds`` and ``delta_kernel`` under TRITON_INTERPRET=1 on a small case against
torch.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys

if "--check-cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton.diskcache import load_module

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))
SEG_L = 2048  # selected rows per segment in the four-branch case (w / r)

# ---- the patch of the lowering's Gluon module: dk/dv stores dS^T -------------------------------------------
# The grouped launch (PHASED and ACC off) does not read PHASES or BAR: the probe passes the table rows' segment
# numbers as PHASES and the bf16 workspace as BAR.
COMMON = [
    ("    out = out_smem.index(WG)\n    c = 0\n",
     "    out = out_smem.index(WG)\n"
     "    DS_L: gl.constexpr = " + str(SEG_L) + "\n"
     "    ds_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF, BLOCK_M], dtype)\n"
     "    ws = tma.make_tensor_descriptor(BAR, [T * (DS_L // 16), DS_L], [DS_L, 1], [HALF, BLOCK_M], ds_sl)\n"
     "    ds_bufs = out_smem._reinterpret(dtype, [4, HALF, BLOCK_M], ds_sl)\n"
     "    c = 0\n"),
    ("            dk = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)\n",
     "            seg = gl.load(PHASES + pid + i * G)\n"
     "            dk = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)\n"),
]
DS_OLD = ("                ds_t = p_t * (dp_t - gl.expand_dims(delta, 0))\n"
          "                dk_tok = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_l), q_t, dk, is_async=True)\n")
# dS^T into this consumer's slot g % 2 of its output buffer (two 64 x 64 slots), once the slot's store from two
# steps back has read it (at a tile's first step: once every store has, as the tile's dK and dV left through the
# same buffer), then a TMA store to the segment's matrix
DS_STORE = ("                ds_c = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(dtype)\n"
            "                ds_buf = ds_bufs.index(WG * 2 + g % 2)\n"
            "                if j == j0:\n"
            "                    tma.store_wait(0)\n"
            "                else:\n"
            "                    tma.store_wait(1)\n"
            "                gl.thread_barrier()\n"
            "                ds_buf.store(ds_c)\n"
            "                fence_async_shared()\n"
            "                gl.thread_barrier()\n"
            "                tma.async_copy_shared_to_global(ws, [seg * DS_L + row0, j * BLOCK_M], ds_buf)\n")
DK_REG = "                dk_tok = warpgroup_mma(gl.convert_layout(ds_c, op_l), q_t, dk, is_async=True)\n"
DK_SMEM = "                dk_tok = warpgroup_mma(ds_buf, q_t, dk, is_async=True)\n"
DS_CAST = "                ds_c = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(dtype)\n"
NO_GLOBAL = ("                tma.async_copy_shared_to_global(ws, [seg * DS_L + row0, j * BLOCK_M], ds_buf)\n", "")
VARIANTS = {
    # dK's product takes dS^T from registers, as the lowering's does; the store goes first
    "dS stored, dK from registers": COMMON + [(DS_OLD, DS_STORE + DK_REG)],
    # dK's product reads dS^T from the shared slot the TMA store reads (FA3's way)
    "dS stored, dK from shared": COMMON + [(DS_OLD, DS_STORE + DK_SMEM)],
    # dK's product issued first (from registers), the store made while it runs
    "dS stored after dK's issue": COMMON + [(DS_OLD, DS_CAST + DK_REG + DS_STORE.replace(DS_CAST, ""))],
    # diagnostics, wrong dq: the shared stores and waits without the stores to global memory
    "(no global store) dK from shared": COMMON + [(DS_OLD, DS_STORE + DK_SMEM), NO_GLOBAL],
    "(no global store) after dK's issue": COMMON + [(DS_OLD, DS_CAST + DK_REG + DS_STORE.replace(DS_CAST, "")),
                                                   NO_GLOBAL],
}


def ds_lowering(low, variant: str):
    """``low`` with its Gluon module's dk/dv kernel storing dS^T (see VARIANTS)."""
    text = low._gluon_text
    for old, new in VARIANTS[variant]:
        assert text.count(old) == 1, (variant, old)
        text = text.replace(old, new)
    low._gluon_text = text
    low._gluon_key = hashlib.sha256((low._gluon_key + variant).encode()).hexdigest()[:24]
    low._gluon_module = None
    return low


# ---- the two tl kernels ---------------------------------------------------------------------------------------
@triton.jit
def delta_kernel(O, DO, DELTA, N, H, D: tl.constexpr, BR: tl.constexpr):
    # O, DO (1, N, H, D) as N*H rows; DELTA (H, N): delta[h, n] = sum_d O[n, h, d] * DO[n, h, d]
    m = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, D)
    offs = m.to(tl.int64)[:, None] * D + cols[None, :]
    d = tl.sum(tl.load(O + offs).to(tl.float32) * tl.load(DO + offs).to(tl.float32), 1)
    tl.store(DELTA + (m % H).to(tl.int64) * N + m // H, d)


@triton.jit
def dq_from_ds(WS, K, DQ, QT, RB, H, sm_scale, L: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr,
               BK: tl.constexpr):
    # QT rows: head, branch, pos0, segment, row0. dQ rows pos0 + (row0 + i) * r of head `head` =
    # sm_scale * sum over the segment's keys of dS (queries x keys) K; dS^T of segment s at WS[s*L + key, query]
    row = QT + tl.program_id(0) * 5
    head = tl.load(row)
    r = tl.load(RB + tl.load(row + 1))
    pos0 = tl.load(row + 2)
    seg = tl.load(row + 3)
    row0 = tl.load(row + 4)
    aq = tl.arange(0, BQ)
    ak = tl.arange(0, BK)
    ad = tl.arange(0, D)
    ws = WS + seg.to(tl.int64) * L * L + row0
    kb = K + head * D
    acc = tl.zeros([BQ, D], tl.float32)
    for kk in range(0, L, BK):
        ds_t = tl.load(ws + (kk + ak).to(tl.int64)[:, None] * L + aq[None, :])
        kt = tl.load(kb + (pos0 + (kk + ak) * r).to(tl.int64)[:, None] * (H * D) + ad[None, :])
        acc = tl.dot(tl.trans(ds_t), kt, acc)
    dq = DQ + (pos0 + (row0 + aq) * r).to(tl.int64)[:, None] * (H * D) + head * D + ad[None, :]
    tl.store(dq, (acc * sm_scale).to(DQ.dtype.element_ty))


# the lowering's Gluon helpers, used as they are
_low = load_module(f"gluon_ds_helpers_{gluon_hopper.source_fingerprint()}",
                   gluon_hopper.gluon_source(AttentionSpec(FOUR), {}))
_branch_descs, _copy_in, _copy_out = _low._branch_descs, _low._copy_in, _low._copy_out


@gluon.jit
def gluon_dq_from_ds(WS, K, DQ, QT, RB, B, N, H, NSEG, sm_scale, stride_b, L: gl.constexpr,
                     HEAD_DIM: gl.constexpr, BQ: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                     num_warps: gl.constexpr):
    # dq_from_ds with TMA copies into a ring of STAGES (dS^T block, K block) pairs and asynchronous warpgroup
    # MMAs, A = the dS^T block seen transposed; dQ leaves by a TMA store through the ring's first slot
    dtype: gl.constexpr = K.dtype.element_ty
    k0, k1, k2, k3 = _branch_descs(K, RB, B, N, H, stride_b, BK, HEAD_DIM)
    dq0, dq1, dq2, dq3 = _branch_descs(DQ, RB, B, N, H, stride_b, BQ, HEAD_DIM)
    ws_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BK, BQ], dtype)
    ws = tma.make_tensor_descriptor(WS, [NSEG * L, L], [L, 1], [BK, BQ], ws_sl)
    n_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BK, HEAD_DIM], dtype)
    o_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BQ, HEAD_DIM], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, BQ], ws_sl)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, HEAD_DIM], n_sl)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=2)
    row = QT + gl.program_id(0) * 5
    head = gl.load(row)
    br = gl.load(row + 1)
    pos0 = gl.load(row + 2)
    seg = gl.load(row + 3)
    row0 = gl.load(row + 4)
    r = gl.load(RB + br)
    combo = (pos0 % r) * H + head
    rbase = pos0 // r
    NK: gl.constexpr = L // BK
    for p in gl.static_range(STAGES - 1):
        mbarrier.expect(ready.index(p), ws.block_type.nbytes)
        tma.async_copy_global_to_shared(ws, [seg * L + p * BK, row0], ready.index(p), ds_smem.index(p))
        _copy_in(k0, k1, k2, k3, br, 0, combo, rbase + p * BK, ready.index(p), k_smem.index(p), True)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, HEAD_DIM, 16])
    acc = gl.zeros([BQ, HEAD_DIM], gl.float32, layout=acc_l)
    for t in range(NK):
        st = t % STAGES
        mbarrier.wait(ready.index(st), (t // STAGES) & 1)
        acc = warpgroup_mma(ds_smem.index(st).permute((1, 0)), k_smem.index(st), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        nt = t + STAGES - 1
        if nt < NK:
            ns = nt % STAGES
            mbarrier.expect(ready.index(ns), ws.block_type.nbytes)
            tma.async_copy_global_to_shared(ws, [seg * L + nt * BK, row0], ready.index(ns), ds_smem.index(ns))
            _copy_in(k0, k1, k2, k3, br, 0, combo, rbase + nt * BK, ready.index(ns), k_smem.index(ns), True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    out = ds_smem._reinterpret(dtype, [BQ, HEAD_DIM], o_sl)  # the ring's first slots: at least BQ x HEAD_DIM
    out.store((acc * sm_scale).to(dtype))
    fence_async_shared()
    _copy_out(dq0, dq1, dq2, dq3, br, 0, combo, rbase + row0, out)
    tma.store_wait(0)


# ---- tables ---------------------------------------------------------------------------------------------------
def segments_of(table: torch.Tensor):
    """Segment numbers of a dk/dv table's rows (a segment: head, branch, pos0) and the segments in order."""
    segs: dict[tuple, int] = {}
    of = []
    for h, br, pos0, L in table[:, :4].tolist():
        assert L == SEG_L, "the probe assumes every segment has SEG_L selected rows"
        of.append(segs.setdefault((h, br, pos0), len(segs)))
    return torch.tensor(of, dtype=torch.int32), list(segs)


def q_table(segs, bq: int) -> torch.Tensor:
    return torch.tensor([(h, br, pos0, s, row0) for s, (h, br, pos0) in enumerate(segs)
                         for row0 in range(0, SEG_L, bq)], dtype=torch.int32)


# dQ kernels: ("tl", BQ, BK, warps, stages) or ("gluon", BQ, BK, warps, stages)
DQ_CONFIGS = (("tl", 128, 64, 8, 3), ("gluon", 128, 128, 4, 3), ("gluon", 128, 64, 4, 6), ("gluon", 128, 64, 4, 5))


def launch_dq(ws, k, dq, qt, dil, scale, cfg):
    kind, bq, bk, warps, stages = cfg
    if kind == "tl":
        dq_from_ds[(qt.shape[0], )](ws, k, dq, qt, dil, k.shape[2], scale, L=SEG_L, D=k.shape[3], BQ=bq, BK=bk,
                                    num_warps=warps, num_stages=stages)
    else:
        B, n, h, d = k.shape
        gluon_dq_from_ds[(qt.shape[0], )](ws, k, dq, qt, dil, B, n, h, ws.shape[0] // SEG_L, scale, k.stride(0),
                                          L=SEG_L, HEAD_DIM=d, BQ=bq, BK=bk, STAGES=stages, num_warps=warps)


def launch_delta(out, dout, delta):
    B, n, h, d = out.shape
    assert B == 1
    delta_kernel[(n * h // 64, )](out, dout, delta, n, h, D=d, BR=64)


# ---- checks ---------------------------------------------------------------------------------------------------
def check_cpu():
    """dq_from_ds and delta_kernel under the interpreter against torch (small case, float32)."""
    global SEG_L
    SEG_L = 128
    spec = AttentionSpec((Branch(128, 1), Branch(256, 2)))
    n, h, d = 512, 4, 32
    plan = build_plan(spec, n, h, d)
    from dilated_compiler.lowering.triton.tables import tile_table
    kt = tile_table(plan, "k", 128, 64)
    seg_of, segs = segments_of(kt)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, n, h, d, generator=g)
    ws = torch.randn(len(segs) * SEG_L, SEG_L, generator=g)
    dil = torch.tensor(gluon_hopper.padded_dilations(spec), dtype=torch.int32)
    for bq in (64, 128):
        qt = q_table(segs, bq)
        dq = torch.zeros(1, n, h, d)
        launch_dq(ws, k, dq, qt, dil, 0.5, ("tl", bq, 64, 4, 1))
        ref = torch.zeros(1, n, h, d)
        for s, (hh, br, pos0) in enumerate(segs):
            r = int(dil[br])
            rows = pos0 + torch.arange(SEG_L) * r
            ds = ws[s * SEG_L:(s + 1) * SEG_L].T  # queries x keys
            ref[0, rows, hh] = 0.5 * ds.double().mm(k[0, rows, hh].double()).float()
        err = float((dq - ref).abs().max())
        print(f"dq_from_ds BQ={bq}: max abs error {err:.2e} (|ref| max {float(ref.abs().max()):.1f})")
        assert err < 1e-3 * float(ref.abs().max())
    o, do = torch.randn(1, n, h, d, generator=g), torch.randn(1, n, h, d, generator=g)
    delta = torch.empty(h, n)
    launch_delta(o, do, delta)
    ref = (o * do).sum(-1)[0].T
    err = float((delta - ref).abs().max())
    print(f"delta: max abs error {err:.2e}")
    assert err < 1e-4


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, summarize
    g = gluon_hopper
    plan = build_plan(AttentionSpec(FOUR), N, H, D)
    lows = {"lowering": tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16)}
    lows.update({v: ds_lowering(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), v)
                 for v in VARIANTS})
    for name, low in lows.items():
        kern = compile_sm90(low.gluon_kernels.gluon_bwd_dkdv,
                            dict(HEAD_DIM=D, ZFILL=True, CAUSAL=False, num_warps=4, ACC=0, PHASED=False,
                                 BLOCK_N=g.BWD_BLOCK, BLOCK_M=g.BWD_STEP, STAGES=g.DKDV_STAGES[D],
                                 CONSUMER_REGS=g.DKDV_CONSUMER_REGS), "bf16", {"BAR": "*bf16"})
        print(f"{name}, gluon_bwd_dkdv: {summarize(kern)}")
    for kind, bq, bk, warps, stages in DQ_CONFIGS:
        if kind == "gluon":
            kern = compile_sm90(gluon_dq_from_ds, dict(L=SEG_L, HEAD_DIM=D, BQ=bq, BK=bk, STAGES=stages,
                                                       num_warps=warps),
                                "bf16", {"QT": "*i32", "NSEG": "i32"})
            print(f"gluon_dq_from_ds {bq, bk, warps, stages}: {summarize(kern)}")


# ---- the GPU run ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-compile", action="store_true")
    ap.add_argument("--check-cpu", action="store_true")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()
    if args.check_cpu:
        return check_cpu()
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    plan = build_plan(AttentionSpec(FOUR), N, H, D)
    base = tl_lowering.TritonLowering(plan, dev, torch.bfloat16)
    lows = {v: ds_lowering(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), v) for v in VARIANTS}
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    assert base.gluon_unsupported(q, k, v, False) is None
    out, lse, aux = base.forward(q, k, v)

    tiles = tl_lowering._GLUON_BWD_TILES
    table, grid, dil = base._gluon_launch_args("k", tiles, q)
    seg_of, segs = segments_of(table.cpu())
    seg_of = seg_of.to(dev)
    ws = torch.empty(len(segs) * SEG_L, SEG_L, device=dev, dtype=torch.bfloat16)
    print(f"{len(segs)} segments, dk/dv table {table.shape[0]} rows, workspace {ws.numel() * 2 / 2**30:.2f} GiB",
          flush=True)
    zfill_kv = base._zfill("k", tiles, dev)
    zfill_q = base._zfill("q", tiles, dev)
    qk_scale = base.scale * math.log2(math.e)
    qts = {bq: q_table(segs, bq).to(dev) for bq in {cfg[1] for cfg in DQ_CONFIGS}}

    def dkdv_ds(variant, ld, dk, dv):
        lows[variant].gluon_kernels.gluon_bwd_dkdv[grid](
            q, k, v, dout, dk, dv, ld, table, dil, table.shape[0], q.shape[0], N, H, seg_of, 1, ws, qk_scale,
            base.scale, q.stride(0), ld.stride(0), ld.stride(1), ld.stride(2), HEAD_DIM=D,
            BLOCK_N=gluon_hopper.BWD_BLOCK, BLOCK_M=gluon_hopper.BWD_STEP, STAGES=gluon_hopper.DKDV_STAGES[D],
            ZFILL=zfill_kv, CAUSAL=False, CONSUMER_REGS=gluon_hopper.DKDV_CONSUMER_REGS, num_warps=4, ACC=0,
            PHASED=False)

    def new_backward(variant, cfg):
        ld = torch.empty((2, 1, H, N), dtype=torch.float32, device=dev)
        ld[0].copy_(lse)
        launch_delta(out, dout, ld[1, 0])
        alloc = torch.empty if zfill_kv else torch.zeros
        dk, dv = alloc(k.shape, dtype=k.dtype, device=dev), alloc(k.shape, dtype=k.dtype, device=dev)
        dkdv_ds(variant, ld, dk, dv)
        dq = torch.zeros(q.shape, dtype=q.dtype, device=dev)
        launch_dq(ws, k, dq, qts[cfg[1]], dil, base.scale, cfg)
        return dq, dk, dv

    ref = base.backward(dout, None, q, k, v, out, lse, aux)
    torch.cuda.synchronize()

    def rel(a, b):
        return float((a.float() - b.float()).abs().max()) / float(b.float().abs().max())

    for variant in VARIANTS:
        if variant.startswith("("):
            continue
        for cfg in DQ_CONFIGS:
            for _ in range(2):  # twice: a race would show as a difference between runs
                got = new_backward(variant, cfg)
                torch.cuda.synchronize()
                print(f"{variant}, dQ by {cfg}: max abs difference / max |lowering|: dq {rel(got[0], ref[0]):.2e}, "
                      f"dk {rel(got[1], ref[1]):.2e}, dv {rel(got[2], ref[2]):.2e}", flush=True)

    # the parts alone (inputs as the backward leaves them)
    ld = torch.empty((2, 1, H, N), dtype=torch.float32, device=dev)
    ld[0].copy_(lse)
    dq0 = torch.empty_like(q)
    dk0, dv0 = torch.empty_like(k), torch.empty_like(v)
    parts = {
        "lowering: gluon_bwd_dq (with delta)": lambda: base._launch_gluon_dq(q, k, v, dout, out, dq0, ld[0], ld[1],
                                                                              None, zfill_q),
        "lowering: gluon_bwd_dkdv": lambda: base._launch_gluon_dkdv(q, k, v, dout, dk0, dv0, ld, zfill_kv),
        "new: delta": lambda: launch_delta(out, dout, ld[1, 0]),
        "new: zeroing dq": lambda: dq0.zero_(),
    }
    for variant in VARIANTS:
        parts[f"new: gluon_bwd_dkdv, {variant}"] = (lambda var: lambda: dkdv_ds(var, ld, dk0, dv0))(variant)
    for cfg in DQ_CONFIGS:
        parts[f"new: dQ from dS {cfg}"] = (lambda c: lambda: launch_dq(ws, k, dq0, qts[c[1]], dil, base.scale, c))(cfg)
    base.backward(dout, None, q, k, v, out, lse, aux)
    part_ms = {}
    for name, fn in parts.items():
        part_ms[name] = do_bench(fn, warmup=5, rep=200, return_mode="median")
        print(f"{name}: {part_ms[name]:.3f} ms", flush=True)
    best_v = min((var for var in VARIANTS if not var.startswith("(")),
                 key=lambda var: part_ms[f"new: gluon_bwd_dkdv, {var}"])
    best_c = min(DQ_CONFIGS, key=lambda c: part_ms[f"new: dQ from dS {c}"])

    forms = {
        "lowering": (lambda: base.backward(dout, None, q, k, v, out, lse, aux),
                     lambda: base.backward(dout, None, q, k, v, *base.forward(q, k, v))),
        f"{best_v}, dQ by {best_c}": (lambda: new_backward(best_v, best_c),
                                      lambda: (base.forward(q, k, v), new_backward(best_v, best_c))),
    }
    times = {(f, p): [] for f in forms for p in ("bwd", "fwd+bwd")}
    for _ in range(args.rounds):
        for f, (bwd, step) in forms.items():
            times[(f, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
            times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N=64K, bf16, H={H}, D={D}; median of "
          f"{args.rounds} alternating rounds (the new form's fwd+bwd uses the lowering's forward)")
    print("| form | pass | ms | rounds |")
    print("|---|---|---|---|")
    for (f, p), ts in times.items():
        print(f"| {f} | {p} | {sorted(ts)[len(ts) // 2]:.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
