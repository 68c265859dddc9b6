"""Experiment: the lowering's Gluon dq kernel (``gluon_bwd_dq``) against the generated tl dq kernel, on the
four-branch grouped 64K backward (bf16, 16 heads, D = 128), by K/V ring depth and consumer registers.

Outputs are poisoned with NaN and compared against the tl kernel's dq and delta.

History (H100; every variant correct):
- Run 1, O (for delta) through shared memory by TMA, two K/V stages: 1.134-1.177 ms. PIPE (each consumer issues
  the next key step's S = Q K^T and dP = dO V^T right after this step's dQ += dS K, FA3-style) 1.644 / 1.656 ms.
- Run 2: O_PTR (O's rows for delta read by pointers, once per tile, issued before the consumer waits for Q and
  dO) frees O's 32 KB of shared memory for a third K/V stage: 1.158 ms with two stages, 1.122 with three,
  against 1.172 / 1.187 for run 1's form in the same run; PIPE with three stages 1.482-1.496 ms.
The lowering keeps O_PTR with three stages (gluon_hopper.DQ_STAGES); PIPE and the TMA copy of O are gone.

--check-compile compiles the variants for sm_90a (triton 3.6) and counts spill instructions.

    PYTHONPATH=. python benchmarks/experiments/gluon_dq_experiment.py [--check-compile]
"""

from __future__ import annotations

import argparse
import math

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton.autotune import TileConfig

FOUR = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))))


# (K/V stages, consumer registers); the first is the lowering's
VARIANTS = [
    (3, 232),
    (2, 232),
    (3, 240),
    (3, 232),
]


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, summarize
    low = tl_lowering.TritonLowering(build_plan(FOUR, 65536, 16, 128), torch.device("cpu"), torch.bfloat16)
    for stages, regs in VARIANTS[:-1]:
        consts = dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, STAGES=stages, ZFILL=True, HAS_DLSE=False,
                      CAUSAL=False, CONSUMER_REGS=regs, num_warps=4, ACC=False, PHASED=False)
        label = f"{stages} K/V stages, consumer regs {regs}"
        try:
            print(f"{label}: {summarize(compile_sm90(low.gluon_kernels.gluon_bwd_dq, consts))}")
        except Exception as e:
            print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")


def main():
    from triton.testing import do_bench

    H, D, N = 16, 128, 65536
    plan = build_plan(FOUR, N, H, D)
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    kpm = torch.zeros(1, dtype=torch.uint8, device="cuda")
    out, lse, _ = low.forward(q, k, v)
    ref_dq, ref_delta = torch.zeros_like(q), torch.zeros_like(lse)
    low._launch_dq(TileConfig(128, 64, 8, 3, False), q, k, v, kpm, False, dout, out, None, lse, ref_delta, ref_dq,
                   False)
    flops = plan.flops_backward * 3 / 5
    rows = []

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    for stages, regs in VARIANTS:
        dq, delta = torch.full_like(q, math.nan), torch.full_like(lse, math.nan)
        label = f"{stages} K/V stages, consumer regs {regs}"

        def fn():
            low._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True, consumer_regs=regs, stages=stages)
        try:
            fn()
            torch.cuda.synchronize()
            err = max(rel(dq, ref_dq), rel(delta, ref_delta))
            rows.append((label, do_bench(fn, warmup=10, rep=60, return_mode="median"), err))
        except Exception as e:
            rows.append((label, math.nan, f"{type(e).__name__}: {str(e)[:120]}"))
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: gluon_bwd_dq, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| variant | ms | TFLOP/s of its matmuls | err against the tl kernel (NaN: unwritten) |")
    print("|---|---|---|---|")
    for name, ms, err in rows:
        print(f"| {name} | {ms:.3f} | {float(flops) / ms / 1e9:.0f} | "
              f"{err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-compile", action="store_true")
    if ap.parse_args().check_compile:
        check_compile()
    else:
        main()
