"""Experiment: the lowering's Gluon kernels with CAUSAL=True, against the generated tl kernels, on the
four-branch causal grouped pattern (N = 64K, bf16, 16 heads, D = 128).

Why: causal grouped calls ran the tl kernels, and there the forward was slower than the hand-written gather
+ SDPA + scatter (0.963 against 0.796 ms; fwd+bwd 3.94 ms against 2.33 for cuDNN over pre-gathered segments,
benchmarks/results/H100-triton.md). Decoder-only language models train causal.

What CAUSAL changes in gluon_fwd, gluon_bwd_dq and gluon_bwd_dkdv (dilated_compiler/lowering/triton/
gluon_hopper.py): each tile walks only the partner tiles of its block table (the tile table's lo / hi columns:
keys up to the diagonal; for dk/dv, query steps from the diagonal on) and masks the scores of the blocks that
cross the diagonal (the mid / full_end columns), as the tl kernels do. With CAUSAL=False the three kernels
compile to the same SASS instruction histograms as before the change (sm_90a, triton 3.6).

The check: outputs poisoned with NaN (lse with -inf, as the lowering allocates it); out, lse, dq, dk and dv
against the tl kernels' (same lse and delta for the backward kernels).

Result (H100, first run): all five outputs written and equal to the tl kernels' (out and lse exactly; dq, dk,
dv within 6e-6 relative). gluon_fwd 0.851 ms against 0.977 for the tl forward; gluon_bwd_dq 0.990 +
gluon_bwd_dkdv 1.098 = 2.088 ms against 2.955 for the tl backward. The lowering now runs them for causal specs.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_causal_experiment.py [--check-compile]

--check-compile compiles the three kernels with CAUSAL=True for sm_90a without a GPU (triton 3.6) and counts
spill instructions among a step's matrix instructions and elsewhere.
"""

from __future__ import annotations

import argparse
import math

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering

CAUSAL_FOUR = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))),
                            causal=True)
H, D, N = 16, 128, 65536

KERNELS = {  # name: constexprs
    "gluon_fwd": dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=128, STAGES=2, ZFILL=True, CAUSAL=True,
                      CONSUMER_REGS=232, num_warps=4, MERGE=False),
    "gluon_bwd_dq": dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, STAGES=3, ZFILL=True, HAS_DLSE=False,
                         CAUSAL=True, CONSUMER_REGS=232, num_warps=4, ACC=False, PHASED=False),
    "gluon_bwd_dkdv": dict(HEAD_DIM=128, BLOCK_N=128, BLOCK_M=64, STAGES=3, ZFILL=True, CAUSAL=True,
                           CONSUMER_REGS=240, num_warps=4, ACC=False, PHASED=False),
}


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, summarize
    low = tl_lowering.TritonLowering(build_plan(CAUSAL_FOUR, N, H, D), torch.device("cpu"), torch.bfloat16)
    for name, consts in KERNELS.items():
        print(f"{name} CAUSAL=True: {summarize(compile_sm90(getattr(low.gluon_kernels, name), consts))}")


def run_gpu():
    from triton.testing import do_bench

    plan = build_plan(CAUSAL_FOUR, N, H, D)
    tl_lowering.USE_GLUON = False  # the lowering now runs causal calls with the Gluon kernels; the tl ones here
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    assert low.causal
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    # the tl kernels: the reference
    out, lse, aux = low.forward(q, k, v)
    dq, dk, dv = low.backward(dout, None, q, k, v, out, lse, aux)
    torch.cuda.synchronize()
    rows = []

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    def bench(name, fn, check, flops):
        try:
            fn()
            torch.cuda.synchronize()
            err = check()
            rows.append((name, do_bench(fn, warmup=10, rep=60, return_mode="median"), flops, err))
        except Exception as e:
            rows.append((name, math.nan, flops, f"{type(e).__name__}: {str(e)[:150]}"))
        print(rows[-1], flush=True)

    def lse_err(a):
        if not torch.equal(torch.isinf(a), torch.isinf(lse)):
            return math.inf
        fin = torch.isfinite(lse)
        return float((a[fin] - lse[fin]).abs().max())

    bench("tl forward (the lowering's, causal)", lambda: low.forward(q, k, v), lambda: 0.0, plan.flops)
    bench("tl backward (the lowering's, causal)", lambda: low.backward(dout, None, q, k, v, out, lse, aux),
          lambda: 0.0, plan.flops_backward)
    out_g = torch.full_like(q, math.nan)
    lse_g = torch.full_like(lse, -math.inf)
    bench("gluon_fwd CAUSAL", lambda: low._launch_gluon_fwd(q, k, v, out_g, lse_g, True),
          lambda: max(rel(out_g, out), lse_err(lse_g)), plan.flops)
    ld = torch.empty((2, 1, H, N), dtype=torch.float32, device="cuda")
    ld[0].copy_(lse)
    dq_g = torch.full_like(q, math.nan)
    bench("gluon_bwd_dq CAUSAL (with delta)",
          lambda: low._launch_gluon_dq(q, k, v, dout, out, dq_g, ld[0], ld[1], None, True),
          lambda: rel(dq_g, dq), plan.flops_backward * 3 / 5)
    dk_g, dv_g = torch.full_like(k, math.nan), torch.full_like(v, math.nan)
    bench("gluon_bwd_dkdv CAUSAL", lambda: low._launch_gluon_dkdv(q, k, v, dout, dk_g, dv_g, ld, True),
          lambda: max(rel(dk_g, dk), rel(dv_g, dv)), plan.flops_backward * 4 / 5)
    print(f"\n{torch.cuda.get_device_name()}: causal four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| kernel | ms | TFLOP/s (useful, of its matmuls) | err against the tl kernels (rel; lse: max abs) |")
    print("|---|---|---|---|")
    for name, ms, flops, err in rows:
        print(f"| {name} | {ms:.3f} | {float(flops) / ms / 1e9:.0f} | "
              f"{err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-compile", action="store_true")
    if ap.parse_args().check_compile:
        check_compile()
    else:
        run_gpu()
