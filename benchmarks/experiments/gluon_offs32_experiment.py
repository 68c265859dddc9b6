"""Experiment: "all" mode's backward writing its float32 rows with 32-bit offsets from a tile base.

Why: in "all" mode each backward tile writes its dq (or dk, dv) rows by pointers (`_add_rows`, `_final_rows` in
gluon_hopper.py), with a 64-bit offset per element: pos * H * D + column, pos = pos0 + row * r. The causal dk/dv
kernel holds dk and dv (128 registers a thread) while it writes, and those offsets push it into spills outside its
matrix loops: 254 spill instructions with the dilation-1 branch storing first (ACC 2), 1037 with it writing the
results last (ACC 3, the lowering's form since stop 17), compiled for sm_90a. The tile's rows lie within one
segment, so with the segment start pos0 folded into a 64-bit base, each offset, row * r * H * D + column, fits 32
bits whenever a segment's extent times H * D does (w * H * D < 2^31: 16384 * 16 * 128 = 2^25 for the
four-branch pattern). Compiled, the causal dk/dv kernel then spills 108 (ACC 2) and 388 (ACC 3) instructions.

The arithmetic is unchanged, so the gradients must be bitwise equal to the lowering's. Adopting it would take a
constexpr chosen on the host from that bound, with the 64-bit form kept for longer segments.

Four-branch "all" mode N = 64K, bf16, 16 heads, D = 128, causal and not: the lowering's backward and forward +
backward, the forms alternating over --rounds rounds.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_offs32_experiment.py [--rounds 3]

``--check-compile`` compiles both forms' "all"-mode dq and dk/dv kernels for sm_90a without a GPU (triton 3.6)
and prints their spill counts.

Outcome (H200, stop 18, 5 rounds): bitwise equal gradients, causal and not; the medians moved less than the
rounds' spread (bwd 12.869 -> 12.863 ms, causal 7.914 -> 8.105; fwd+bwd 16.922 -> 16.636, causal 10.728 ->
10.257). The spills are outside the matrix loops, once per tile, and cost no measurable time. Not adopted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_variants import patch_gluon  # noqa: E402

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))

PATCHES = [
    # _add_rows
    ("    base = X + b.to(gl.int64) * stride_b + head * HEAD_DIM\n"
     "    offs = gl.expand_dims((pos0 + rows * r).to(gl.int64) * (H * HEAD_DIM), 1) + gl.expand_dims(cols, 0)\n",
     "    base = X + b.to(gl.int64) * stride_b + head * HEAD_DIM + pos0.to(gl.int64) * (H * HEAD_DIM)\n"
     "    offs = gl.expand_dims(rows * r * (H * HEAD_DIM), 1) + gl.expand_dims(cols, 0)\n"),
    # _final_rows
    ("    at = b.to(gl.int64) * stride_b + head * HEAD_DIM\n"
     "    offs = gl.expand_dims(pos.to(gl.int64) * (H * HEAD_DIM), 1) + gl.expand_dims(cols, 0)\n",
     "    at = b.to(gl.int64) * stride_b + head * HEAD_DIM + pos0.to(gl.int64) * (H * HEAD_DIM)\n"
     "    offs = gl.expand_dims(rows * r * (H * HEAD_DIM), 1) + gl.expand_dims(cols, 0)\n"),
]
FORMS = ("64-bit offsets (the lowering)", "32-bit offsets")


def variant(low, form: str):
    """``low`` with its Gluon module's row writes in the form's offsets."""
    if form == FORMS[0]:
        return low
    return patch_gluon(low, "offs32", PATCHES)


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, summarize
    g = gluon_hopper
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, head_assignment="all", causal=causal), N, H, D)
        for form in FORMS:
            kernels = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form).gluon_kernels
            for acc in (2, 3):
                common = dict(HEAD_DIM=D, ZFILL=False, CAUSAL=causal, num_warps=4, ACC=acc, PHASED=True)
                dq = compile_sm90(kernels.gluon_bwd_dq, dict(common, BLOCK_M=g.BWD_BLOCK, BLOCK_N=g.BWD_STEP,
                                                             STAGES=g.DQ_STAGES[D], HAS_DLSE=False,
                                                             CONSUMER_REGS=g.DQ_CONSUMER_REGS), "bf16", {"DQ": "*fp32"})
                dkdv = compile_sm90(kernels.gluon_bwd_dkdv, dict(common, BLOCK_N=g.BWD_BLOCK, BLOCK_M=g.BWD_STEP,
                                                                 STAGES=g.DKDV_STAGES[D],
                                                                 CONSUMER_REGS=g.DKDV_CONSUMER_REGS),
                                    "bf16", {"DK": "*fp32", "DV": "*fp32"})
                for name, k in (("gluon_bwd_dq", dq), ("gluon_bwd_dkdv", dkdv)):
                    print(f"causal={causal}, {form}, ACC {acc}, {name}: {summarize(k)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-compile", action="store_true")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    assert max(b.segment_length for b in FOUR) * H * D < 2 ** 31  # the offsets within a segment fit 32 bits
    rows = []
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, head_assignment="all", causal=causal), N, H, D)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in FORMS}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        base = lows[FORMS[0]]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        grads = {f: lows[f].backward(dout, None, q, k, v, out, lse, aux) for f in FORMS}
        torch.cuda.synchronize()
        equal = all(torch.equal(a, b) for a, b in zip(*grads.values()))
        print(f"causal={causal}: gradients bitwise equal: {equal}", flush=True)
        times = {(f, p): [] for f in FORMS for p in ("bwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in FORMS:
                low = lows[f]

                def bwd():
                    low.backward(dout, None, q, k, v, out, lse, aux)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal, ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, grads, lows, base
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: four-branch all mode N=64K, bf16, H={H}, D={D}; the lowering's "
          f"backward (and forward + backward); median of {args.rounds} alternating rounds")
    print("| case | pass | form | ms | bitwise equal | rounds |")
    print("|---|---|---|---|---|---|")
    for case, p, f, ms, eq, ts in rows:
        print(f"| {case} | {p} | {f} | {ms:.3f} | {eq} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
