"""Experiment: the dq kernel's cost per query tile. Two Q/dO buffers, so that the next tile's Q and dO are copied
while this tile's last key steps run (dQ written out through the finished tile's Q buffer), at the price of the
K/V ring's third stage.

Why: in the lowering's dq kernel one Q/dO buffer is handed back only when both consumers have finished the tile's
last dS K product, and the producer copies the next tile's Q and dO (64 KB, from HBM: each is read once) only
then; it issues the next tile's K/V copies after those. So at every tile boundary the consumers wait for a copy
from HBM, then compute delta, before the first product of the tile. At 64K a tile has 32 key steps of 64, about
41 us on an H100, so a boundary of 2 to 3 us would be 5 to 7% of the kernel. Shared memory allows two buffers only
if the ring loses a stage (3 stages measured 1.122 ms against 1.158 with 2, stop 9) and dQ's 32 KB output buffer
goes: Q is copied as two 64-row halves, so that a consumer's half is one contiguous [64, D] block (a row slice of
a 128-byte swizzled [128, D] tile is not), and the consumer writes its dQ there once the tile's products are done,
handing the buffer back early in the next tile, after that store has read it. The control form is the lowering
with 2 stages, which tells the stage's price from the buffers' gain.

The arithmetic is unchanged, so dq (and dk, dv, which read delta) must be bitwise equal to the lowering's.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_dq_tile_experiment.py [--rounds 3]

``--check-compile`` compiles the forms' dq kernel for sm_90a without a GPU (triton 3.6).
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

Q2_PATCHES = [
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

FORMS = ("the lowering", "the lowering, 2 K/V stages", "two Q/dO buffers, 2 K/V stages")
STAGES = {FORMS[0]: 3, FORMS[1]: 2, FORMS[2]: 2}


def variant(low, form: str):
    """``low`` with its dq kernel changed as the form says, launched with the form's K/V stages."""
    if form == FORMS[2]:
        low = patch_gluon(low, form, Q2_PATCHES)
    if STAGES[form] != 3:
        low._launch_gluon_dq = functools.partial(low._launch_gluon_dq, stages=STAGES[form])
    return low


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, summarize
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        for form in FORMS:
            low = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form)
            label = f"causal={causal}, {form}, gluon_bwd_dq"
            try:
                consts = {**launch_constexprs("gluon_bwd_dq", D, causal), "STAGES": STAGES[form]}
                compiled = compile_sm90(low.gluon_kernels.gluon_bwd_dq, consts)
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
        equal = {}
        for f in FORMS:
            oks = []
            for _ in range(3):   # a race would show as a difference on some run
                grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
                oks.append(all(map(torch.equal, grads, ref)))
            dq, delta = torch.full_like(q, math.nan), torch.full_like(lse, math.nan)
            lows[f]._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True)
            torch.cuda.synchronize()
            equal[f] = all(oks) and torch.equal(dq, ref[0])
        print(f"causal={causal}: dq, dk, dv bitwise equal to the lowering's (3 runs each): {equal}", flush=True)
        times = {(f, p): [] for f in FORMS for p in ("dq kernel", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in FORMS:
                low = lows[f]
                dq, delta = torch.empty_like(q), torch.empty_like(lse)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "dq kernel")].append(do_bench(
                    lambda: low._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True),
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
