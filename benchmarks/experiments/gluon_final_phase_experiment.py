"""Experiment: "all" mode's backward with the dilation-1 branch as the last phase, writing the gradients in the
inputs' dtype (gluon_hopper.ALL_MODE_FINAL_PHASE), against that branch first and float32 -> bf16 casts after.

Why: in "all" mode the Gluon backward adds each branch's dq, dk and dv into float32 buffers, a phase per branch.
Until stop 17 the dilation-1 branch (it selects every row) went first and stored, so the buffers needed no zeroing,
and three casts to bf16 followed: 555 us of the 15.24 ms step at 64K (stop 16, `benchmarks/trace_step.py --mode
all`). With that branch last, its tiles write bf16 directly, reading the float32 buffers only at the rows an
earlier phase wrote (for r = 2, 4, 8 with offsets h % r: the rows n % 2 == h % 2, half of them); the r = 2 branch,
whose rows include those of r = 4 and 8, stores first. Float32 traffic per gradient drops from about 2.1 to 1.1
GiB, and the casts go.

The two orders add the branches in different orders, so the gradients differ by float32 rounding before the one
rounding to bf16: at most one bf16 step in a few elements.

Four-branch "all" mode N = 64K, bf16, 16 heads, D = 128, causal and not: the lowering's backward alone and
forward + backward, the forms alternating over --rounds rounds.

Result (H200, stop 17; benchmarks/results/H200-triton.md): adopted as gluon_hopper.ALL_MODE_FINAL_PHASE.
- Not causal: backward 13.108 -> 12.604 ms, fwd+bwd 16.899 -> 16.356 (median of 3; the rounds do not overlap).
- Causal: backward 8.115 -> 7.970, fwd+bwd 10.646 -> 10.544, within the rounds' spread. The causal dk/dv kernel
  spills more outside its steps in this form (1037 spill instructions against 254, tests/test_gluon_compile.py).
- Each form is bitwise the same on a second run. Causal, they differ in 616 (dq), 1575 (dk) and 646 (dv) of
  134M elements, by one bf16 step at most.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_final_phase_experiment.py [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))
FORMS = {"dilation 1 first, casts": False, "dilation 1 last, bf16": True}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for causal in (False, True):
        spec = AttentionSpec(FOUR, head_assignment="all", causal=causal)
        plan = build_plan(spec, N, H, D)
        low = tl_lowering.TritonLowering(plan, dev, torch.bfloat16)

        def use(form):
            gluon_hopper.ALL_MODE_FINAL_PHASE = FORMS[form]
            low._tables.pop(("all mode phases", dev), None)

        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        assert low.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = low.forward(q, k, v)
        grads = {}
        for form in FORMS:
            use(form)
            print(form, "phases:", low._all_mode_phases(dev)[:2], flush=True)
            grads[form] = low.backward(dout, None, q, k, v, out, lse, aux)
            again = low.backward(dout, None, q, k, v, out, lse, aux)
            torch.cuda.synchronize()
            print(form, "bitwise equal on a second run:", all(torch.equal(a, b) for a, b in zip(grads[form], again)),
                  flush=True)
        a, b = grads.values()
        for name, x, y in zip("dq dk dv".split(), a, b):
            d = (x.float() - y.float()).abs()
            print(f"causal={causal} {name}: max abs difference {float(d.max()):.2e} (max |{name}| "
                  f"{float(y.float().abs().max()):.2e}), elements differing {int((d > 0).sum())} of {d.numel()}",
                  flush=True)
        times = {(f, p): [] for f in FORMS for p in ("bwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in FORMS:
                use(f)

                def bwd():
                    low.backward(dout, None, q, k, v, out, lse, aux)

                def step():
                    o, l_, a_ = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a_)
                times[(f, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (f, p), ts in times.items():
            ms = sorted(ts)[len(ts) // 2]
            rows.append((f"causal={causal}", p, f, ms, ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, grads, a, b, low
        torch.cuda.empty_cache()
    gluon_hopper.ALL_MODE_FINAL_PHASE = True
    print(f"\n{torch.cuda.get_device_name()}: four-branch all mode N=64K, bf16, H={H}, D={D}; the lowering's "
          f"backward (and forward + backward), no autograd; median of {args.rounds} alternating rounds")
    print("| case | pass | form | ms | rounds |")
    print("|---|---|---|---|---|")
    for case, p, f, ms, ts in rows:
        print(f"| {case} | {p} | {f} | {ms:.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
