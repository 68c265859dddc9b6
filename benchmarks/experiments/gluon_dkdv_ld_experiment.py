"""Experiment: where the dk/dv kernel's consumers read a step's lse and delta from shared memory.

Why: an ncu profile of the lowering's kernels (H100, stop 28, four-branch grouped 64K, bf16, D = 128) sampled the
dk/dv consumers stalled on the short scoreboard for 35% (first consumer) and 19% (second) of their time, nearly
all of it at the first use of lse, right after the wait for S^T. The consumers read lse from shared memory only
after that wait, and the read then queues behind the matrix instructions' own operand reads (the shared pipe was
65% busy). The dq kernel, which keeps its rows' lse and delta in registers across its key steps, shows no such
stall, and its tensor pipe is busier (76% against 65%).

The forms (the arithmetic is unchanged, so dk and dv must be bitwise equal to the lowering's):
- "lse after the S^T wait": the lowering before this experiment;
- "lse early (the lowering)": the step's lse is read before S^T and dP^T are issued (its log2 scaling still
  after the wait);
- "lse early, delta after S": as above, and delta read right after the wait for S^T, so its read runs under
  the exponentials;
- "lse early, delta after dV issue": delta read once P^T dO is issued, before the wait for dP^T;
- "both early": lse and delta both read before the products are issued (16 more registers held across them);
- "lse early, scaled beforehand": the backward scales lse by log2(e) (-inf to +inf) in its lse/delta buffer once
  the dq kernel has read it, so the consumers use it as read (no compare, multiply and select per step).

Four-branch grouped N = 64K, bf16, 16 heads, D = 128, causal and not: the dk/dv kernel alone, then the lowering's
backward and forward + backward, the forms alternating over --rounds rounds.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_dkdv_ld_experiment.py [--rounds 5]

``--check-compile`` compiles the forms' dk/dv kernels for sm_90a without a GPU (triton 3.6) and prints, for each,
its shared memory, matrix instructions and spills, and the order of the first step's shared loads, matrix
instructions and waits. ``--profile FORM`` runs one forward and backward of ``FORMS[FORM]`` for ncu.

Outcome (H100, stop 28, 5 alternating rounds in each of two calls; every form's dq, dk and dv bitwise equal to the
lowering's on 3 runs each; benchmarks/results/H100-triton.md, "Stop 28"), median ms, first call / second call:
- dk/dv kernel alone: 1.786 / 1.815 with lse read after the wait, 1.640 / 1.682 with lse early; causal 1.015 /
  1.039 against 0.964 / 1.001;
- fwd+bwd: 3.942 / 4.041 against 3.803 / 3.882; causal 2.347 / 2.431 against 2.260 / 2.377;
- ncu on the lse-early kernel: 1.62 -> 1.45 ms, SM throughput 65% -> 74%, the first consumer's short-scoreboard
  share 35% -> 14%, and the producer's per-step reload of a spilled register gone;
- moving delta too gained nothing beyond the spread (delta after the dV issue: dk/dv 1.643 / 1.684 against 1.640 /
  1.682), and was slower in the causal form; scaling lse beforehand: dk/dv 1.672 against 1.682 in its one call,
  fwd+bwd 3.962 against 3.882 (two small kernels more);
- a third call on another H100 (3 rounds, not causal), after the change: dk/dv 1.779 / 1.660 / 1.636 ms and
  fwd+bwd 3.920 / 3.766 / 3.791 for lse after the wait / lse early / lse scaled beforehand.
Adopted: lse early (``gluon_hopper._dkdv_consumer``). The other forms stay as measured here.
"""

from __future__ import annotations

import argparse
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

LSE = "                lse = ld_smem.index(st).slice(0, BLOCK_M).load(cols_l)\n"
LSE2 = "                lse2 = gl.where(lse == float(\"-inf\"), float(\"inf\"), lse * 1.4426950408889634)\n"
DELTA = "                delta = ld_smem.index(st).slice(BLOCK_M, BLOCK_M).load(cols_l)\n"
S_WAIT = "                s_t = warpgroup_mma_wait(1, deps=(st_tok, ))\n"
DV_ISSUE = "                dv_tok = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_l), do_t, dv, is_async=True)\n"

# the lowering reads lse before the products are issued (adopted from this experiment) and delta after the wait
# for dP^T; the first form below is the lowering before that change
FORMS = ("lse after the S^T wait", "lse early (the lowering)", "lse early, delta after S",
         "lse early, delta after dV issue", "both early", "lse early, scaled beforehand")
SCALED = FORMS[5]
BASE = FORMS[1]


def patches(form: str) -> list[tuple[str, str]]:
    return {
        FORMS[0]: [(LSE, ""), (LSE2, LSE + LSE2)],
        FORMS[1]: [],
        FORMS[2]: [(DELTA, ""), (S_WAIT, S_WAIT + DELTA)],
        FORMS[3]: [(DELTA, ""), (DV_ISSUE, DV_ISSUE + DELTA)],
        FORMS[4]: [(DELTA, ""), (LSE, LSE + DELTA)],
        FORMS[5]: [(LSE2, "                lse2 = lse\n")],
    }[form]


def scale_lse(ld):
    """What the kernel's log2 scaling of lse does (-inf to +inf, NaN kept), in place on ``ld[0]`` (two small
    kernels where the lowering copies lse in one)."""
    torch.mul(ld[0], 1.4426950408889634, out=ld[0])
    ld[0].nan_to_num_(nan=math.nan, posinf=math.inf, neginf=math.inf)


def launch_alone(low, form, q, k, v, dout, dk, dv, ld, ld_scaled):
    """The dk/dv kernel alone, with lse as the form reads it."""
    if form == SCALED:
        return type(low)._launch_gluon_dkdv(low, q, k, v, dout, dk, dv, ld_scaled, True)
    return low._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True)


def variant(low, form: str):
    """``low`` with its Gluon module's dk/dv consumers reading lse and delta as the form says."""
    if form == BASE:
        return low
    patch_gluon(low, form, patches(form))
    if form == SCALED:
        # the backward's lse/delta buffer scaled before the dk/dv launch (after the dq kernel has read lse from it)
        def launch(q, k, v, dout, dk, dv, ld, *args, _launch=low._launch_gluon_dkdv, **kwargs):
            scale_lse(ld)
            return _launch(q, k, v, dout, dk, dv, ld, *args, **kwargs)
        low._launch_gluon_dkdv = launch
    return low


def check_compile():
    import itertools
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, sass, summarize
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        for form in FORMS:
            kernels = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form).gluon_kernels
            label = f"causal={causal}, {form}"
            try:
                compiled = compile_sm90(kernels.gluon_bwd_dkdv, launch_constexprs("gluon_bwd_dkdv", D, causal),
                                        pointers={"LD": "*fp32"})
            except Exception as e:
                print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
                continue
            # the order of the first 32-bit-pair shared loads (LDS.64: lse, delta) and matrix instructions
            marks = "".join("M" if "HGMMA" in ln else "L" if "LDS.64" in ln else "W" if "WARPGROUP.DEPBAR" in ln
                            else "" for ln in sass(compiled).splitlines())
            order = "".join(f"{m}{len(list(run))}" for m, run in itertools.groupby(marks[:60]))
            print(f"{label}: {summarize(compiled)}; first shared loads (L), matrix instructions (M) and waits (W): "
                  f"{order}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--check-compile", action="store_true")
    ap.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--profile", type=int, metavar="FORM", help="run one backward of FORMS[FORM] (for ncu) and stop")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()
    if args.profile is not None:
        plan = build_plan(AttentionSpec(FOUR), N, H, D)
        low = variant(tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16), FORMS[args.profile])
        q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse, aux = low.forward(q, k, v)
        low.backward(dout, None, q, k, v, out, lse, aux)
        torch.cuda.synchronize()
        return print(f"profiled: one forward and backward of the form {FORMS[args.profile]!r}")
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for causal in {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]:
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in FORMS}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        base = lows[BASE]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        ref = base.backward(dout, None, q, k, v, out, lse, aux)
        # the dk/dv kernel alone needs lse and delta side by side, as the backward makes them
        ld = torch.empty((2, *lse.shape), dtype=torch.float32, device=dev)
        ld[0].copy_(lse)
        base._launch_gluon_dq(q, k, v, dout, out, torch.empty_like(q), ld[0], ld[1], None, True)
        ld_scaled = ld.clone()
        scale_lse(ld_scaled)
        equal = {}
        for f in FORMS:
            oks = []
            for _ in range(3):   # a race would show as a difference on some run
                grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
                oks.append(all(map(torch.equal, grads, ref)))
            dk, dv = torch.full_like(k, math.nan), torch.full_like(v, math.nan)
            launch_alone(lows[f], f, q, k, v, dout, dk, dv, ld, ld_scaled)
            torch.cuda.synchronize()
            equal[f] = all(oks) and torch.equal(dk, ref[1]) and torch.equal(dv, ref[2])
        print(f"causal={causal}: dq, dk, dv bitwise equal to the lowering's (3 runs each): {equal}", flush=True)
        times = {(f, p): [] for f in FORMS for p in ("dk/dv kernel", "bwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in FORMS:
                low = lows[f]
                dk, dv = torch.empty_like(k), torch.empty_like(v)

                def bwd():
                    low.backward(dout, None, q, k, v, out, lse, aux)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "dk/dv kernel")].append(do_bench(
                    lambda: launch_alone(low, f, q, k, v, dout, dk, dv, ld, ld_scaled),
                    warmup=5, rep=100, return_mode="median"))
                times[(f, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal[f], ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, ref, lows, base, ld, ld_scaled
        torch.cuda.empty_cache()
    print_results(rows, args.rounds, H, D)


if __name__ == "__main__":
    main()
