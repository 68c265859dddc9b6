"""Experiment: the lowering's Gluon kernels at head_dim 64, against the generated tl kernels (which the lowering
runs at D = 64), by ring depth. Cases (bf16, 16 heads): the four-branch grouped pattern at N = 64K, causal and
not, and one dense 16K segment.

The kernels take HEAD_DIM as a constexpr; at D = 64 the forward's scores (64 x 128 keys) and its accumulator
(64 x 64) have different layouts, which the forward now keeps apart (at D = 128 they coincide, and the SASS
instruction histograms are unchanged). All three compile for sm_90a (triton 3.6) without spills at D = 64.

The check: outputs poisoned with NaN (lse with -inf); out, lse, dq, dk and dv against the tl kernels' (the
backward kernels get the tl forward's lse and the same delta).

Result (H100, first run; table in benchmarks/results/H100-triton.md): every output written; dq, dk, dv bitwise
equal to the tl kernels'; out within 1.2e-3 relative of the tl forward (which walks 64-key blocks at D = 64).
Four-branch 64K: gluon_fwd 0.585-0.592 ms against 0.678; dq + dk/dv 0.742 + 1.094-1.120 against 2.695 for the tl
backward. Deeper rings won on one case and lost on another, so D = 64 keeps D = 128's depths; the lowering now
runs the Gluon kernels at D = 64.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_d64_experiment.py
"""

from __future__ import annotations

import math

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, D = 16, 64
FOUR = ((2048, 1), (4096, 2), (8192, 4), (16384, 8))
CASES = [("four-branch grouped", FOUR, False, 65536), ("four-branch grouped causal", FOUR, True, 65536),
         ("dense segment", ((16384, 1),), False, 16384)]


def main():
    from triton.testing import do_bench
    tl_lowering.USE_GLUON = False  # the references: the tl kernels
    rows = []

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    for name, pairs, causal, N in CASES:
        spec = AttentionSpec(tuple(Branch(w, r) for w, r in pairs), causal=causal)
        plan = build_plan(spec, N, H, D)
        low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
                         for _ in range(4))
        out, lse, aux = low.forward(q, k, v)
        dq, dk, dv = low.backward(dout, None, q, k, v, out, lse, aux)
        torch.cuda.synchronize()

        def bench(label, fn, check, flops):
            try:
                fn()
                torch.cuda.synchronize()
                err = check()
                rows.append((name, label, do_bench(fn, warmup=10, rep=60, return_mode="median"), flops, err))
            except Exception as e:
                rows.append((name, label, math.nan, flops, f"{type(e).__name__}: {str(e)[:150]}"))
            print(rows[-1], flush=True)

        def lse_err(a):
            if not torch.equal(torch.isinf(a), torch.isinf(lse)):
                return math.inf
            fin = torch.isfinite(lse)
            return float((a[fin] - lse[fin]).abs().max())

        bench("tl forward", lambda: low.forward(q, k, v), lambda: 0.0, plan.flops)
        bench("tl backward", lambda: low.backward(dout, None, q, k, v, out, lse, aux), lambda: 0.0,
              plan.flops_backward)
        for stages in (2, 3, 4):
            out_g, lse_g = torch.full_like(q, math.nan), torch.full_like(lse, -math.inf)
            bench(f"gluon_fwd, {stages} K/V stages",
                  lambda: low._launch_gluon_fwd(q, k, v, out_g, lse_g, True, stages=stages),
                  lambda: max(rel(out_g, out), lse_err(lse_g)), plan.flops)
        ld = torch.empty((2, 1, H, N), dtype=torch.float32, device="cuda")
        ld[0].copy_(lse)
        for stages in (3, 4):
            dq_g = torch.full_like(q, math.nan)
            bench(f"gluon_bwd_dq, {stages} K/V stages",
                  lambda: low._launch_gluon_dq(q, k, v, dout, out, dq_g, ld[0], ld[1], None, True, stages=stages),
                  lambda: rel(dq_g, dq), plan.flops_backward * 3 / 5)
        for stages in (3, 4):
            dk_g, dv_g = torch.full_like(k, math.nan), torch.full_like(v, math.nan)
            bench(f"gluon_bwd_dkdv, {stages} Q/dO stages",
                  lambda: low._launch_gluon_dkdv(q, k, v, dout, dk_g, dv_g, ld, True, stages=stages),
                  lambda: max(rel(dk_g, dk), rel(dv_g, dv)), plan.flops_backward * 4 / 5)
        del q, k, v, dout, out, lse, aux, dq, dk, dv, ld
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: bf16, H={H}, D={D}")
    print("| case | kernel | ms | TFLOP/s (useful, of its matmuls) | err against the tl kernels (rel; lse: max abs) |")
    print("|---|---|---|---|---|")
    for case, label, ms, flops, err in rows:
        print(f"| {case} | {label} | {ms:.3f} | {float(flops) / ms / 1e9:.0f} | "
              f"{err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
