"""Experiment: the dk/dv kernel's cost per key tile. Two K/V buffers, so that the next tile's K and V are copied
while this tile's last query steps run (dK and dV written out through the finished tile's K and V halves), at the
price of the Q/dO ring's third stage.

Why: in the lowering's dk/dv kernel one K/V buffer is handed back only when both consumers have finished the
tile's last step, and the producer copies the next tile's K and V (64 KB, from HBM) only then, and the next
tile's Q/dO copies after those. So at every tile boundary the consumers wait for a copy from HBM (partly under
their dK and dV stores, which go one after the other through one 32 KB buffer) before the first product of the
tile. At 64K a key tile has 32 query steps of 64, about 56 us on an H100. Shared memory allows two K/V buffers
(128 KB) only with two Q/dO stages (3 stages measured 1.659 ms against 1.735 with 2, stop 10) and without the 32
KB output buffer: K and V are copied as 64-row halves, so that a consumer's half is one contiguous [64, D] block (a
row slice of a 128-byte swizzled [128, D] tile is not), and each consumer writes its dK and dV there once its
products are done (both stores in flight at once), handing the buffer back after the next tile's first step,
once those stores have read it. The control form is the lowering with 2 stages, which tells the stage's price
from the buffers' gain.

The arithmetic is unchanged, so dq, dk and dv must be bitwise equal to the lowering's.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_dkdv_tile_experiment.py [--rounds 3]

``--check-compile`` compiles the forms' dk/dv kernel for sm_90a without a GPU (triton 3.6).
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
     "        mbarrier.init(kv_ready.index(kb), count=4)\n"
     "        mbarrier.init(kv_empty.index(kb), count=2)\n"),
    # the producer: tile it's K and V (two halves each) into buffer it % 2
    ("            mbarrier.wait(kv_empty, ((it if PHASED else i) & 1) ^ 1)\n"
     "            _copy_in(k0, k1, k2, k3, br, b, kv_combo, rbase + row0, kv_ready, k_smem, True)\n"
     "            _copy_in(v0, v1, v2, v3, br, b, kv_combo, rbase + row0, kv_ready, v_smem, True)\n",
     "            kb = it % 2\n"
     "            mbarrier.wait(kv_empty.index(kb), ((it // 2) & 1) ^ 1)\n"
     "            for hh in gl.static_range(2):\n"
     "                _copy_in(k0, k1, k2, k3, br, b, kv_combo, rbase + row0 + hh * HALF, kv_ready.index(kb),\n"
     "                         k_smem.index(2 * kb + hh), True)\n"
     "                _copy_in(v0, v1, v2, v3, br, b, kv_combo, rbase + row0 + hh * HALF, kv_ready.index(kb),\n"
     "                         v_smem.index(2 * kb + hh), True)\n"),
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
     "                v_half.store(dv.to(dtype))\n"
     "                fence_async_shared()\n"
     "                _copy_out(dk0, dk1, dk2, dk3, br, b, kv_combo, rbase + row0, k_half)\n"
     "                _copy_out(dv0, dv1, dv2, dv3, br, b, kv_combo, rbase + row0, v_half)\n"),
]

FORMS = ("the lowering", "the lowering, 2 Q/dO stages", "two K/V buffers, 2 Q/dO stages")
STAGES = {FORMS[0]: 3, FORMS[1]: 2, FORMS[2]: 2}


def variant(low, form: str):
    """``low`` with its dk/dv kernel changed as the form says, launched with the form's Q/dO stages."""
    if form == FORMS[2]:
        low = patch_gluon(low, form, KV2_PATCHES)
    if STAGES[form] != 3:
        low._launch_gluon_dkdv = functools.partial(low._launch_gluon_dkdv, stages=STAGES[form])
    return low


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, summarize
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        for form in FORMS:
            low = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form)
            label = f"causal={causal}, {form}, gluon_bwd_dkdv"
            try:
                consts = {**launch_constexprs("gluon_bwd_dkdv", D, causal), "STAGES": STAGES[form]}
                compiled = compile_sm90(low.gluon_kernels.gluon_bwd_dkdv, consts)
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
        # the dk/dv kernel alone needs lse and delta side by side, as the backward makes them
        ld = torch.empty((2, *lse.shape), dtype=torch.float32, device=dev)
        ld[0].copy_(lse)
        base._launch_gluon_dq(q, k, v, dout, out, torch.empty_like(q), ld[0], ld[1], None, True)
        equal = {}
        for f in FORMS:
            oks = []
            for _ in range(3):   # a race would show as a difference on some run
                grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
                oks.append(all(map(torch.equal, grads, ref)))
            dk, dv = torch.full_like(k, math.nan), torch.full_like(v, math.nan)
            lows[f]._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True)
            torch.cuda.synchronize()
            equal[f] = all(oks) and torch.equal(dk, ref[1]) and torch.equal(dv, ref[2])
        print(f"causal={causal}: dq, dk, dv bitwise equal to the lowering's (3 runs each): {equal}", flush=True)
        times = {(f, p): [] for f in FORMS for p in ("dk/dv kernel", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in FORMS:
                low = lows[f]
                dk, dv = torch.empty_like(k), torch.empty_like(v)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "dk/dv kernel")].append(do_bench(
                    lambda: low._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True),
                    warmup=5, rep=100, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
            print({key: round(ts[-1], 3) for key, ts in times.items()}, flush=True)
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal[f], ts))
        del q, k, v, dout, out, lse, aux, ref, lows, base
        torch.cuda.empty_cache()
    print_results(rows, args.rounds, H, D)


if __name__ == "__main__":
    main()
