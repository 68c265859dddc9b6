"""Experiment: the backward kernels' cost per tile. The dq kernel with two Q/dO buffers and the dk/dv kernel with two
K/V buffers, so that the next tile's fixed operands are copied while this tile's last steps run, each at the
price of its ring's third stage.

Why: in the lowering's backward kernels a tile's fixed operands (dq: Q and dO of 128 queries; dk/dv: K and V of
128 keys, 64 KB from HBM either way) sit in one buffer, handed back only when both consumers have finished the
tile's last step. The producer copies the next tile's operands only then, and that tile's ring copies after them.
So at every tile boundary the consumers wait for a copy from HBM (dq: then compute delta; dk/dv: partly under their
dK and dV stores, which go one after the other through one 32 KB buffer) before the tile's first product. At 64K a
tile has 32 steps of 64: about 41 us (dq) and 56 us (dk/dv) on an H100, so a boundary of 2 to 3 us would be 4 to 7%
of a kernel.

Shared memory allows the second buffer only if the ring loses its third stage (measured: dq 1.122 ms with 3
stages against 1.158 with 2, stop 9; dk/dv 1.659 against 1.735, stop 10) and the 32 KB output buffer goes. The
outputs are written through the finished tile's buffer instead, which is therefore copied as two 64-row halves, so
that a consumer's half is one contiguous [64, D] block (a row slice of a 128-byte swizzled [128, D] tile is not):
- dq: Q in halves; each consumer stores its dQ through its Q half; the buffer goes back to the producer after the
  next tile's delta, once that store has read it.
- dk/dv: K and V in halves; each consumer stores dK through its K half and dV through its V half, both stores in
  flight at once; the buffer goes back after the next tile's first step.
The control forms run the lowering with 2 stages, which tells a stage's price from the buffers' gain.

The arithmetic is unchanged, so dq, dk and dv must be bitwise equal to the lowering's.

Compiled for sm_90a (stop 34): no spills among a step's products in any form; dq 213576 B of shared memory, the
same 40 HGMMAs; dk/dv 214520 B, 48 HGMMAs, 75 spill instructions outside the loop against the lowering's 25 (45
causal). The producer has 32 registers: with its four copies each choosing the branch's descriptors it had 99 (146
causal), so they go under one choice and one expect.
Run at stop 35 (H100, `--causal no --rounds 3`), kernel times: dq 1.228 ms (the lowering), 1.233 (2 K/V stages),
1.262 (two Q/dO buffers); dk/dv 1.685 (the lowering), 1.668 (2 Q/dO stages), 1.694 (two K/V buffers); fwd+bwd
3.801 against 3.795-3.861 for every form. All bitwise equal; the second buffer gains nothing in either kernel, so
the tile boundary's copy is not what they wait on. Not adopted.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_bwd_tile_experiment.py [--rounds 3]

``--check-compile`` compiles the forms' backward kernels for sm_90a without a GPU (triton 3.6).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_variants import patch_gluon, print_results  # noqa: E402

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))

DQ_PATCHES = [
    # Q copied as two 64-row halves into two tiles' buffers (q_smem[2 * buffer + consumer]); dO in two buffers
    ("    q0, q1, q2, q3 = _branch_descs(Q, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)\n"
     "    do0, do1, do2, do3 = _branch_descs(DO, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)\n",
     "    q0, q1, q2, q3 = _branch_descs(Q, RB, B, N, H, stride_b, BLOCK_M // 2, HEAD_DIM)\n"
     "    do0, do1, do2, do3 = _branch_descs(DO, RB, B, N, H, stride_b, BLOCK_M, HEAD_DIM)\n"),
    ("    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)\n"
     "    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], m_sl)\n",
     "    q_smem = gl.allocate_shared_memory(dtype, [4, HALF, HEAD_DIM], h_sl)\n"
     "    do_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], m_sl)\n"),
    ("    dq_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], h_sl)\n", "    dq_smem = q_smem\n"),
    ("    t_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())\n"
     "    t_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())\n",
     "    t_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())\n"
     "    t_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())\n"),
    ("    mbarrier.init(t_ready, count=2)\n    mbarrier.init(t_empty, count=2)\n",
     "    for tb in gl.static_range(2):\n"
     "        mbarrier.init(t_ready.index(tb), count=3)\n"
     "        mbarrier.init(t_empty.index(tb), count=2)\n"),
    # the producer: tile it's Q (two halves) and dO into buffer it % 2
    ("            mbarrier.wait(t_empty, ((it if PHASED else i) & 1) ^ 1)\n"
     "            _copy_in(q0, q1, q2, q3, br, b, combo, rbase + row0, t_ready, q_smem, True)\n"
     "            _copy_in(do0, do1, do2, do3, br, b, combo, rbase + row0, t_ready, do_smem, True)\n",
     "            tb = it % 2\n"
     "            mbarrier.wait(t_empty.index(tb), ((it // 2) & 1) ^ 1)\n"
     "            _copy_in(q0, q1, q2, q3, br, b, combo, rbase + row0, t_ready.index(tb), q_smem.index(2 * tb), True)\n"
     "            _copy_in(q0, q1, q2, q3, br, b, combo, rbase + row0 + q0.block_type.shape[2], t_ready.index(tb),\n"
     "                     q_smem.index(2 * tb + 1), True)\n"
     "            _copy_in(do0, do1, do2, do3, br, b, combo, rbase + row0, t_ready.index(tb), do_smem.index(tb), True)\n"),
    # the consumers: their half of buffer it % 2 (Q for S and then for dQ's store; dO's rows)
    ("    q_half = q_smem.slice(WG * HALF, HALF)\n"
     "    do_half = do_smem.slice(WG * HALF, HALF)\n"
     "    dq_out = dq_smem.index(WG)\n", ""),
    ("            mbarrier.wait(t_ready, (it if PHASED else i) & 1)\n",
     "            tb = it % 2\n"
     "            q_half = q_smem.index(2 * tb + WG)\n"
     "            do_half = do_smem.index(tb).slice(WG * HALF, HALF)\n"
     "            mbarrier.wait(t_ready.index(tb), (it // 2) & 1)\n"),
    # the previous tile's buffer back to the producer once its dQ store has read it (after this tile's delta)
    ("            gl.store(DELTA + offs, delta)\n",
     "            gl.store(DELTA + offs, delta)\n"
     "            if it > 0:\n"
     "                tma.store_wait(0)\n"
     "                mbarrier.arrive(t_empty.index(1 - tb), count=1)\n"),
    ("            mbarrier.arrive(t_empty, count=1)\n            c += n_k\n", "            c += n_k\n"),
    ("_store_out(dq0, dq1, dq2, dq3, br, b, combo, rbase + row0, dq_out, (dq * sm_scale).to(dtype))",
     "_store_out(dq0, dq1, dq2, dq3, br, b, combo, rbase + row0, q_half, (dq * sm_scale).to(dtype))"),
]


def _kv_descs(heads: str, stride: str, rows: str) -> str:
    return (f"        k0, k1, k2, k3 = _branch_descs(K, RB, B, N, {heads}, {stride}, {rows}, HEAD_DIM)\n"
            f"        v0, v1, v2, v3 = _branch_descs(V, RB, B, N, {heads}, {stride}, {rows}, HEAD_DIM)\n")


KV2_PATCHES = [
    # K and V copied as two 64-row halves into two tiles' buffers: k_smem[2 * buffer + consumer]
    ("        skb = stride_kb\n" + _kv_descs("H // GQA", "stride_kb", "BLOCK_N"),
     "        skb = stride_kb\n" + _kv_descs("H // GQA", "stride_kb", "HALF")),
    ("        skb = stride_b\n" + _kv_descs("H", "stride_b", "BLOCK_N"),
     "        skb = stride_b\n" + _kv_descs("H", "stride_b", "HALF")),
    ("    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], n_sl)\n"
     "    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], n_sl)\n",
     "    k_smem = gl.allocate_shared_memory(dtype, [4, HALF, HEAD_DIM], h_sl)\n"
     "    v_smem = gl.allocate_shared_memory(dtype, [4, HALF, HEAD_DIM], h_sl)\n"),
    ("    out_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], h_sl)\n", "    out_smem = k_smem\n"),
    ("    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())\n"
     "    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())\n",
     "    kv_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())\n"
     "    kv_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())\n"),
    ("    mbarrier.init(kv_ready, count=2)\n    mbarrier.init(kv_empty, count=2)\n",
     "    for kb in gl.static_range(2):\n"
     "        mbarrier.init(kv_ready.index(kb), count=1)\n"
     "        mbarrier.init(kv_empty.index(kb), count=2)\n"),
    # the producer: tile it's K and V (two halves each) into buffer it % 2
    ("            mbarrier.wait(kv_empty, ((it if PHASED else i) & 1) ^ 1)\n"
     "            _copy_in(k0, k1, k2, k3, br, b, kv_combo, rbase + row0, kv_ready, k_smem, True)\n"
     "            _copy_in(v0, v1, v2, v3, br, b, kv_combo, rbase + row0, kv_ready, v_smem, True)\n",
     "            kb = it % 2\n"
     "            mbarrier.wait(kv_empty.index(kb), ((it // 2) & 1) ^ 1)\n"
     "            _copy_kv_halves(k0, k1, k2, k3, v0, v1, v2, v3, br, b, kv_combo, rbase + row0, kv_ready.index(kb),\n"
     "                            k_smem, v_smem, kb, HALF)\n"),
    # the four copies under one choice of branch (the producer has 32 registers)
    ("@gluon.jit\ndef _dkdv_producer(",
     "@gluon.jit\n"
     "def _copy_kv_halves(k0, k1, k2, k3, v0, v1, v2, v3, branch, b, combo, row, bar, k_smem, v_smem, kb,\n"
     "                    HALF: gl.constexpr):\n"
     "    mbarrier.expect(bar, 4 * k0.block_type.nbytes)\n"
     "    if branch == 0:\n"
     "        _kv_halves(k0, v0, b, combo, row, bar, k_smem, v_smem, kb, HALF)\n"
     "    elif branch == 1:\n"
     "        _kv_halves(k1, v1, b, combo, row, bar, k_smem, v_smem, kb, HALF)\n"
     "    elif branch == 2:\n"
     "        _kv_halves(k2, v2, b, combo, row, bar, k_smem, v_smem, kb, HALF)\n"
     "    else:\n"
     "        _kv_halves(k3, v3, b, combo, row, bar, k_smem, v_smem, kb, HALF)\n"
     "\n\n@gluon.jit\n"
     "def _kv_halves(kd, vd, b, combo, row, bar, k_smem, v_smem, kb, HALF: gl.constexpr):\n"
     "    for hh in gl.static_range(2):\n"
     "        kdst = k_smem.index(2 * kb + hh)._reinterpret(k_smem.dtype, kd.block_type.shape, kd.layout)\n"
     "        tma.async_copy_global_to_shared(kd, [b, combo, row + hh * HALF, 0], bar, kdst)\n"
     "        vdst = v_smem.index(2 * kb + hh)._reinterpret(v_smem.dtype, vd.block_type.shape, vd.layout)\n"
     "        tma.async_copy_global_to_shared(vd, [b, combo, row + hh * HALF, 0], bar, vdst)\n"
     "\n\n@gluon.jit\ndef _dkdv_producer("),
    # the consumers: their halves of buffer it % 2
    ("    k_half = k_smem.slice(WG * HALF, HALF)\n"
     "    v_half = v_smem.slice(WG * HALF, HALF)\n"
     "    out = out_smem.index(WG)\n", ""),
    ("            mbarrier.wait(kv_ready, (it if PHASED else i) & 1)\n",
     "            kb = it % 2\n"
     "            k_half = k_smem.index(2 * kb + WG)\n"
     "            v_half = v_smem.index(2 * kb + WG)\n"
     "            mbarrier.wait(kv_ready.index(kb), (it // 2) & 1)\n"),
    # the previous tile's buffer back to the producer after this tile's first step, once its stores have read it
    ("                dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))\n"
     "                mbarrier.arrive(qd_empty.index(st), count=1)\n",
     "                dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))\n"
     "                mbarrier.arrive(qd_empty.index(st), count=1)\n"
     "                if jj == j0:\n"
     "                    if it > 0:\n"
     "                        tma.store_wait(0)\n"
     "                        mbarrier.arrive(kv_empty.index(1 - kb), count=1)\n"),
    ("            mbarrier.arrive(kv_empty, count=1)\n            c += n_h * (n_m - j0)\n",
     "            c += n_h * (n_m - j0)\n"),
    # dK and dV through this consumer's K and V halves, both stores in flight at once
    ("                _store_out(dk0, dk1, dk2, dk3, br, b, kv_combo, rbase + row0, out, (dk * sm_scale).to(dtype))\n"
     "                _store_out(dv0, dv1, dv2, dv3, br, b, kv_combo, rbase + row0, out, dv.to(dtype))\n",
     "                k_half.store((dk * sm_scale).to(dtype))\n"
     "                fence_async_shared()\n"
     "                _copy_out(dk0, dk1, dk2, dk3, br, b, kv_combo, rbase + row0, k_half)\n"
     "                v_half.store(dv.to(dtype))\n"
     "                fence_async_shared()\n"
     "                _copy_out(dv0, dv1, dv2, dv3, br, b, kv_combo, rbase + row0, v_half)\n"),
]

FORMS = ("the lowering", "dq: 2 K/V stages", "dq: two Q/dO buffers, 2 K/V stages", "dk/dv: 2 Q/dO stages",
         "dk/dv: two K/V buffers, 2 Q/dO stages", "both kernels with two buffers")
# per form: (dq kernel's patches, its K/V stages, dk/dv kernel's patches, its Q/dO stages)
SETUP = {FORMS[0]: ([], 3, [], 3), FORMS[1]: ([], 2, [], 3), FORMS[2]: (DQ_PATCHES, 2, [], 3),
         FORMS[3]: ([], 3, [], 2), FORMS[4]: ([], 3, KV2_PATCHES, 2), FORMS[5]: (DQ_PATCHES, 2, KV2_PATCHES, 2)}


def variant(low, form: str):
    """``low`` with its backward kernels changed as the form says, launched with the form's stages."""
    dq_patches, dq_stages, dkdv_patches, dkdv_stages = SETUP[form]
    if dq_patches or dkdv_patches:
        low = patch_gluon(low, form, dq_patches + dkdv_patches)
    if dq_stages != 3:
        low._launch_gluon_dq = functools.partial(low._launch_gluon_dq, stages=dq_stages)
    if dkdv_stages != 3:
        low._launch_gluon_dkdv = functools.partial(low._launch_gluon_dkdv, stages=dkdv_stages)
    return low


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, summarize
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        for form in FORMS:
            low = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form)
            dq_patches, dq_stages, dkdv_patches, dkdv_stages = SETUP[form]
            for kernel, patched, stages in (("gluon_bwd_dq", dq_patches, dq_stages),
                                            ("gluon_bwd_dkdv", dkdv_patches, dkdv_stages)):
                if form != FORMS[0] and not patched and stages == 3:
                    continue   # the lowering's kernel, compiled above
                label = f"causal={causal}, {form}, {kernel}"
                try:
                    consts = {**launch_constexprs(kernel, D, causal), "STAGES": stages}
                    compiled = compile_sm90(getattr(low.gluon_kernels, kernel), consts)
                except Exception as e:
                    print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                    continue
                print(f"{label}: {summarize(compiled)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-compile", action="store_true")
    ap.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for causal in {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]:
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in FORMS}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        base = lows[FORMS[0]]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        ref = base.backward(dout, None, q, k, v, out, lse, aux)
        # each kernel alone: lse and delta side by side in one buffer, as the backward makes them
        ld = torch.empty((2, *lse.shape), dtype=torch.float32, device=dev)
        ld[0].copy_(lse)
        base._launch_gluon_dq(q, k, v, dout, out, torch.empty_like(q), ld[0], ld[1], None, True)
        delta = torch.empty_like(lse)   # the dq kernel's delta when it runs alone (ld keeps the lowering's)

        def alone(low, kernel, grads):
            if kernel == "dq kernel":
                low._launch_gluon_dq(q, k, v, dout, out, grads[0], ld[0], delta, None, True)
            else:
                low._launch_gluon_dkdv(q, k, v, dout, grads[1], grads[2], ld, True)
        equal = {}
        for f in FORMS:
            oks = []
            for _ in range(3):   # a race would show as a difference on some run
                grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
                oks.append(all(map(torch.equal, grads, ref)))
            grads = [torch.full_like(t, math.nan) for t in (q, k, v)]
            alone(lows[f], "dq kernel", grads)
            alone(lows[f], "dk/dv kernel", grads)
            torch.cuda.synchronize()
            equal[f] = all(oks) and all(map(torch.equal, grads, ref))
        print(f"causal={causal}: dq, dk, dv bitwise equal to the lowering's (3 runs each, and each kernel alone): "
              f"{equal}", flush=True)
        times = {(f, p): [] for f in FORMS for p in ("dq kernel", "dk/dv kernel", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in FORMS:
                low = lows[f]
                grads = [torch.empty_like(t) for t in (q, k, v)]

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                for kernel in ("dq kernel", "dk/dv kernel"):
                    times[(f, kernel)].append(do_bench(lambda: alone(low, kernel, grads), warmup=5, rep=100,
                                                       return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
            print({key: round(ts[-1], 3) for key, ts in times.items()}, flush=True)
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal[f], ts))
        del q, k, v, dout, out, lse, aux, ref, lows, base
        torch.cuda.empty_cache()
    print_results(rows, args.rounds, H, D)


if __name__ == "__main__":
    main()
