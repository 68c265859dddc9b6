"""Experiment: the fused backward (bwd_delta + gluon_bwd_fused: dQ, dK and dV in one pass over the key tiles,
dQ added by TMA reduce-adds into a few segments' float32 slots) against gluon_bwd_dq + gluon_bwd_dkdv, grouped
four-branch N = 64K (bf16, 16 heads, D = 128), causal and not.

Why: the split backward runs 7 matrix products per block pair (dq recomputes S and dP); a fused one runs 5. At the
H100's power limit both passes run their products at 640-700 TFLOP/s, so fewer products is the remaining lever
(benchmarks/results/H100-triton.md, stop 12). A fused dQ needs an fp32 accumulator; here it is a ring of NSLOT
slots of one segment's rows each (a segment's tiles run at about the same time), not N rows.

The check: dq, dk, dv of both forms from the same forward, outputs the kernels fill starting as NaN; then times of
the lowering's backward alone and of forward + backward, alternating the forms over --rounds rounds.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/gluon_fused_bwd_experiment.py [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))


def main():
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--cases", default="grouped,causal")
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for case in args.cases.split(","):
        causal = case == "causal"
        spec = AttentionSpec(FOUR, causal=causal)
        plan = build_plan(spec, args.n, H, D)
        low = tl_lowering.TritonLowering(plan, dev, torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, args.n, H, D, device=dev, dtype=torch.bfloat16, generator=g)
                         for _ in range(4))
        out, lse, aux = low.forward(q, k, v)
        forms = {"split (dq, dk/dv)": False, "fused": True}
        grads = {}
        uninitialized = tl_lowering._uninitialized
        tl_lowering._uninitialized = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device)
        for form, fused in forms.items():
            gluon_hopper.FUSED_BACKWARD = fused
            grads[form] = low.backward(dout, None, q, k, v, out, lse, aux)
            torch.cuda.synchronize()
        tl_lowering._uninitialized = uninitialized
        print(case, "fused:", low.fused_backward_unsupported(q) if gluon_hopper.FUSED_BACKWARD else None,
              low._fused_args(q)[2:], flush=True)
        ref = grads["split (dq, dk/dv)"]
        diff = {}
        for form, gs in grads.items():
            diff[form] = [float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(gs, ref)]
            print(case, form, "nan:", [bool(x.isnan().any()) for x in gs], "max rel diff dq dk dv:", diff[form],
                  flush=True)
        times = {(f, p): [] for f in forms for p in ("bwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for form, fused in forms.items():
                gluon_hopper.FUSED_BACKWARD = fused

                def bwd():
                    low.backward(dout, None, q, k, v, out, lse, aux)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(form, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(form, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        gluon_hopper.FUSED_BACKWARD = True
        for (form, p), ts in times.items():
            flops = plan.flops_backward + (plan.flops if p == "fwd+bwd" else 0)
            ms = sorted(ts)[len(ts) // 2]
            rows.append((case, p, form, ms, float(flops) / ms / 1e9, max(diff[form]), ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, grads, ref, low
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N={args.n}, bf16, H={H}, D={D}; the lowering's "
          f"backward (and forward + backward), no autograd; median of {args.rounds} alternating rounds")
    print("| case | pass | backward | ms | TFLOP/s (useful) | max rel. difference to split | rounds |")
    print("|---|---|---|---|---|---|---|")
    for case, p, form, ms, tflops, d, ts in rows:
        print(f"| {case} | {p} | {form} | {ms:.3f} | {tflops:.0f} | {d:.1e} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
