"""Experiment: "all" mode's backward on the Gluon kernels
(gluon_hopper.ALL_MODE_BACKWARD) against the tl kernels, four-branch "all" mode at N = 64K (bf16, 16 heads,
D = 128), causal and not.

Why: "all" mode's fwd+bwd ran at 0.60x cuDNN over pre-gathered segments (23.8 against 14.3 ms at 64K;
benchmarks/results/H100-triton.md, stop 11), and its backward is most of that: the tl kernels add dq, dk and dv
over the branches with fp32 atomics. The Gluon backward runs at 550-670 TFLOP/s in grouped mode.

The form: per branch, one gluon_bwd_dq and one gluon_bwd_dkdv launch over that branch's tiles (every head), ACC:
each tile adds its rows into fp32 dq, dk, dv by pointer loads and stores (a row is in one tile of a branch, so no
two programs of a launch touch it; the launches follow each other on the stream). Same probabilities (the merged
lse) and delta as the tl backward. Compiled for sm_90a: no spills among a step's matrix instructions; dk/dv at
D = 128 has 21 (causal: 153) spill instructions in its epilogue, where both accumulators are added.

The check: dq, dk, dv of both forms from the same forward, compared (both accumulate in fp32 in different
orders: expect ~1e-3 relative in bf16); times of the lowering's backward alone and of forward + backward,
alternating the two forms over --rounds rounds. Result (H100, stop 12; benchmarks/results/H100-triton.md): fwd+bwd
23.41 -> 18.31 ms, causal 16.98 -> 11.98, differences 6.9e-4 and 9.7e-4 relative; gluon_hopper.ALL_MODE_BACKWARD
is now on (test_gpu_gluon_all_mode_backward checks it against the reference).

Second form (stop 12): the dilation-1 branch (which in "all" mode selects every row of every head) launches first
and stores (ACC 2) instead of adding, so the fp32 buffers need no zeroing and its launches read nothing back:
about 1 GB less memory traffic per buffer at 64K. Timed here as "store first" against "adding".

Since stop 13 the Gluon forms run as one launch per pass (a phase per branch, [Note: phases] in
gluon_hopper.py) instead of one per branch. Each row gets the same additions in the same order as before, and
the differences to tl read as before (6.9e-4, causal 9.7e-4). On the H100 (--rounds 2), store first: bwd
13.24 ms, fwd+bwd 17.58; causal 8.83 and 11.19.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_all_backward_experiment.py [--rounds 3]
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
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for causal in (False, True):
        spec = AttentionSpec(FOUR, head_assignment="all", causal=causal)
        plan = build_plan(spec, N, H, D)
        low = tl_lowering.TritonLowering(plan, dev, torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        out, lse, aux = low.forward(q, k, v)
        # "adding": every branch adds into zeroed buffers; "store first": the dilation-1 branch stores first
        store_first = low._all_mode_order()
        adding = [(b, False) for b, _ in store_first]
        forms = {"tl (atomics)": (False, adding), "gluon, adding": (True, adding),
                 "gluon, store first": (True, store_first)}

        def use(form):
            # the forms as they stood (stop 12): no final phase (ALL_MODE_FINAL_PHASE came in stop 17)
            gluon_hopper.ALL_MODE_BACKWARD, order = forms[form]
            gluon_hopper.ALL_MODE_FINAL_PHASE = False
            low._all_mode_order = lambda: order
            low._tables.pop(("all mode phases", dev), None)
        grads = {}
        uninitialized = tl_lowering._uninitialized
        # buffers the kernels fill by themselves start as NaN for the comparison (a row not stored shows)
        tl_lowering._uninitialized = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=device)
        for form in forms:
            use(form)
            grads[form] = low.backward(dout, None, q, k, v, out, lse, aux)
            torch.cuda.synchronize()
        tl_lowering._uninitialized = uninitialized
        ref = grads["tl (atomics)"]
        diff = {form: max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(gs, ref))
                for form, gs in grads.items()}
        times = {(f, p): [] for f in forms for p in ("bwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for form in forms:
                use(form)

                def bwd():
                    low.backward(dout, None, q, k, v, out, lse, aux)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(form, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(form, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        gluon_hopper.ALL_MODE_BACKWARD = True
        for (form, p), ts in times.items():
            flops = plan.flops_backward + (plan.flops if p == "fwd+bwd" else 0)
            ms = min(ts)
            rows.append((f"causal={causal}", p, form, ms, float(flops) / ms / 1e9, diff[form], ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, grads, ref, low
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: four-branch all mode N=64K, bf16, H={H}, D={D}; the lowering's "
          f"backward (and forward + backward), no autograd; best of {args.rounds} alternating rounds")
    print("| case | pass | backward | ms | TFLOP/s (useful) | max rel. difference to tl | rounds |")
    print("|---|---|---|---|---|---|---|")
    for case, p, form, ms, tflops, d, ts in rows:
        print(f"| {case} | {p} | {form} | {ms:.3f} | {tflops:.0f} | {d:.1e} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
