"""Experiment (prepared, not yet run on a GPU): EARLY_RELEASE in the lowering's Gluon kernels, on the four-branch
grouped pattern at N = 64K (bf16, 16 heads, D = 128), causal and not.

Why: a step of the module spends 3.52 ms in its kernels (benchmarks/trace_step.py), and each kernel pays a
transition per tile: the forward's consumers free the tile's Q only after their last softmax, dq's free Q and dO
after their last dQ product, dk/dv's free K and V after their last dV and dK products; only then does the
producer load the next tile's, and the consumers wait for that copy after their epilogue. A causal tile walks
1 to 16 key blocks, so these transitions weigh most there (the causal forward, 0.850 ms, is slower than the
naive path's 0.798).

EARLY_RELEASE: each consumer arrives on the "empty" barrier as soon as the last product that reads the buffer
completes (forward: the tile's last S; dq: the last step's S and dP; dk/dv: the last step's S^T and dP^T). Same
arithmetic, so the outputs must be bitwise equal to those without it. Compiled for sm_90a (triton 3.6): no spill
instructions among a step's matrix instructions (tests/test_gluon_compile.py); with it off, the SASS instruction
histograms are those of the kernels the lowering runs.

The check: each kernel with and without EARLY_RELEASE, outputs poisoned with NaN, compared bitwise; times
alternate between the two forms (A B A B) to spread drift over both; then the module's fwd+bwd with all three
on and off, alternating likewise.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/gluon_release_experiment.py

dk/dv also runs with EPI_PTR (dK and dV stored by pointers from the accumulators rather than through one shared
buffer and two TMA stores with a wait between them), and with the fourth Q/dO stage the freed 32 KB makes room
for; those must be bitwise equal too.

If a form wins, set gluon_hopper.EARLY_RELEASE for that pass (and DKDV_EPI_PTR, DKDV_STAGES).
"""

from __future__ import annotations

import math

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan, compile_attention
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, D, N = 16, 128, 65536
FOUR = ((2048, 1), (4096, 2), (8192, 4), (16384, 8))
ROUNDS = 2


def main():
    from triton.testing import do_bench
    rows = []
    for causal in (False, True):
        spec = AttentionSpec(tuple(Branch(w, r) for w, r in FOUR), causal=causal)
        plan = build_plan(spec, N, H, D)
        low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
                         for _ in range(4))
        out, lse = torch.empty_like(q), torch.full((1, H, N), -math.inf, device="cuda")
        low._launch_gluon_fwd(q, k, v, out, lse, True, early=False)
        ld = torch.empty((2, 1, H, N), dtype=torch.float32, device="cuda")
        ld[0].copy_(lse)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        low._launch_gluon_dq(q, k, v, dout, out, dq, ld[0], ld[1], None, True, early=False)
        low._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True, early=False)
        torch.cuda.synchronize()
        ref = {"fwd": (out, lse), "dq": (dq, ld[1].clone()), "dkdv": (dk, dv)}

        def run(name, form):
            early, epi_ptr, stages = form
            if name == "fwd":
                o, l_ = torch.full_like(q, math.nan), torch.full_like(lse, -math.inf)
                return (o, l_), lambda: low._launch_gluon_fwd(q, k, v, o, l_, True, early=early), plan.flops
            if name == "dq":
                g_, ld2 = torch.full_like(q, math.nan), ld.clone()
                ld2[1].fill_(math.nan)
                return ((g_, ld2[1]), lambda: low._launch_gluon_dq(q, k, v, dout, out, g_, ld2[0], ld2[1], None,
                                                                   True, early=early),
                        plan.flops_backward * 3 / 5)
            a, b = torch.full_like(k, math.nan), torch.full_like(v, math.nan)
            return (a, b), lambda: low._launch_gluon_dkdv(q, k, v, dout, a, b, ld, True, early=early,
                                                          epi_ptr=epi_ptr, stages=stages), \
                plan.flops_backward * 4 / 5

        # (EARLY_RELEASE, EPI_PTR, stages); the first is the lowering's
        forms = {"fwd": [(False, None, None), (True, None, None)], "dq": [(False, None, None), (True, None, None)],
                 "dkdv": [(False, False, 3), (True, False, 3), (False, True, 3), (True, True, 3), (False, True, 4),
                          (True, True, 4)]}
        for name in ("fwd", "dq", "dkdv"):
            times = {f: [] for f in forms[name]}
            equal = {}
            for _ in range(ROUNDS):
                for form in forms[name]:
                    outs, fn, flops = run(name, form)
                    try:
                        fn()
                        torch.cuda.synchronize()
                        equal[form] = all(torch.equal(a, b) for a, b in zip(outs, ref[name]))
                        times[form].append(do_bench(fn, warmup=10, rep=60, return_mode="median"))
                    except Exception as e:
                        equal[form] = f"{type(e).__name__}: {str(e)[:120]}"
                        times[form].append(math.nan)
            for form in forms[name]:
                ms = min(times[form])
                label = f"gluon {name}, EARLY_RELEASE={form[0]}" + (
                    f", EPI_PTR={form[1]}, {form[2]} stages" if name == "dkdv" else "")
                rows.append((f"causal={causal}", label, ms, float(flops) / ms / 1e9, equal[form], times[form]))
                print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, ld, dq, dk, dv, ref
        torch.cuda.empty_cache()

        # the module, fwd+bwd, all three passes with and without it
        attn = compile_attention(spec, backend="triton")
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        dout = torch.randn_like(q)
        settings = {"the lowering's": (False, False, 3), "EARLY_RELEASE": (True, False, 3),
                    "EARLY_RELEASE + EPI_PTR, 4 dk/dv stages": (True, True, 4)}
        step_times = {name: [] for name in settings}
        for _ in range(ROUNDS):
            for name, (early, epi_ptr, stages) in settings.items():
                gluon_hopper.EARLY_RELEASE.update(fwd=early, dq=early, dkdv=early)
                gluon_hopper.DKDV_EPI_PTR, gluon_hopper.DKDV_STAGES[D] = epi_ptr, stages
                attn(q, k, v).backward(dout)
                step_times[name].append(do_bench(lambda: attn(q, k, v).backward(dout), warmup=10, rep=60,
                                                 grad_to_none=[q, k, v], return_mode="median"))
        gluon_hopper.EARLY_RELEASE.update(fwd=False, dq=False, dkdv=False)
        gluon_hopper.DKDV_EPI_PTR, gluon_hopper.DKDV_STAGES[D] = False, 3
        for name in settings:
            ms = min(step_times[name])
            rows.append((f"causal={causal}", f"module fwd+bwd, {name}", ms,
                         float(plan.flops + plan.flops_backward) / ms / 1e9, "-", step_times[name]))
            print(rows[-1], flush=True)
        del q, k, v, dout, attn
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N=64K, bf16, H={H}, D={D}; best of {ROUNDS} "
          "alternating rounds (all rounds in brackets)")
    print("| case | kernel | ms | TFLOP/s | bitwise equal to the lowering's form | rounds |")
    print("|---|---|---|---|---|---|")
    for case, name, ms, tflops, eq, all_ms in rows:
        print(f"| {case} | {name} | {ms:.3f} | {tflops:.0f} | {eq} | {', '.join(f'{t:.3f}' for t in all_ms)} |")


if __name__ == "__main__":
    main()
