"""Experiment: the lowering's Gluon dq kernel (``gluon_bwd_dq``) with and without PIPE, against the generated tl
dq kernel, on the four-branch grouped 64K backward (bf16, 16 heads, D = 128).

PIPE: each consumer issues the next key step's S = Q K^T and dP = dO V^T right after this step's dQ += dS K,
then waits for dQ only, so its products queue back to back (FA3-style software pipelining). Compiled for sm_90a
(triton 3.6), neither form spills; PIPE has 72 HGMMA instructions against 40 (the first step is peeled).

Outputs are poisoned with NaN and compared against the tl kernel's dq and delta.

Result (H100): both correct; PIPE 1.644 ms (232 registers) and 1.656 ms (240) against 1.134-1.177 ms without
it, so the lowering leaves it off (gluon_hopper.DQ_PIPELINE).

    PYTHONPATH=. python benchmarks/gluon_dq_experiment.py
"""

from __future__ import annotations

import math

import torch
from triton.testing import do_bench

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton.autotune import TileConfig

FOUR = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))))


def main():
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

    for pipe, regs in ((False, 232), (True, 232), (True, 240), (False, 232)):
        dq, delta = torch.full_like(q, math.nan), torch.full_like(lse, math.nan)

        def fn():
            low._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True, consumer_regs=regs, pipe=pipe)
        try:
            fn()
            torch.cuda.synchronize()
            err = max(rel(dq, ref_dq), rel(delta, ref_delta))
            rows.append((f"PIPE={pipe}, consumer regs {regs}", do_bench(fn, warmup=10, rep=60, return_mode="median"),
                         err))
        except Exception as e:
            rows.append((f"PIPE={pipe}, consumer regs {regs}", math.nan, f"{type(e).__name__}: {str(e)[:120]}"))
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: gluon_bwd_dq, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| variant | ms | TFLOP/s of its matmuls | err against the tl kernel (NaN: unwritten) |")
    print("|---|---|---|---|")
    for name, ms, err in rows:
        print(f"| {name} | {ms:.3f} | {float(flops) / ms / 1e9:.0f} | "
              f"{err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
