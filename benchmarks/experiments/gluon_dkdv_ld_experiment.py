"""Experiment: where the dk/dv kernel's consumers read a step's lse and delta from shared memory.

Why: an ncu profile of the lowering's kernels (H100, stop 28, four-branch grouped 64K, bf16, D = 128) sampled the
dk/dv consumers stalled on the short scoreboard for 35% (first consumer) and 19% (second) of their time, nearly
all of it at the first use of lse, right after the wait for S^T. The consumers read lse from shared memory only
after that wait, and the read then queues behind the matrix instructions' own operand reads (the shared pipe was
65% busy). The dq kernel, which keeps its rows' lse and delta in registers across its key steps, shows no such
stall, and its tensor pipe is busier (76% against 65%).

The forms (the arithmetic is unchanged, so dk and dv must be bitwise equal to the lowering's):
- "lse early": the step's lse is read before S^T and dP^T are issued (its log2 scaling still after the wait);
- "lse early, delta after S": as above, and delta read right after the wait for S^T, so its read runs under
  the exponentials;
- "lse early, delta after dV issue": delta read once P^T dO is issued, before the wait for dP^T;
- "both early": lse and delta both read before the products are issued (16 more registers held across them).

Four-branch grouped N = 64K, bf16, 16 heads, D = 128, causal and not: the dk/dv kernel alone, then the lowering's
backward and forward + backward, the forms alternating over --rounds rounds.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_dkdv_ld_experiment.py [--rounds 5]

``--check-compile`` compiles the forms' dk/dv kernels for sm_90a without a GPU (triton 3.6) and prints, for each,
its shared memory, matrix instructions and spills, and where the first step's lse reads sit against its first
matrix instructions.
"""

from __future__ import annotations

import argparse
import hashlib
import math

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))

DO_T = "                do_t = do_smem.index(st)\n"
LSE = "                lse = ld_smem.index(st).slice(0, BLOCK_M).load(cols_l)\n"
LSE2 = "                lse2 = gl.where(lse == float(\"-inf\"), float(\"inf\"), lse * 1.4426950408889634)\n"
DELTA = "                delta = ld_smem.index(st).slice(BLOCK_M, BLOCK_M).load(cols_l)\n"
S_WAIT = "                s_t = warpgroup_mma_wait(1, deps=(st_tok, ))\n"
DV_ISSUE = "                dv_tok = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_l), do_t, dv, is_async=True)\n"

FORMS = ("the lowering", "lse early", "lse early, delta after S", "lse early, delta after dV issue", "both early")


def patches(form: str) -> list[tuple[str, str]]:
    if form == FORMS[0]:
        return []
    out = [(LSE + LSE2, LSE2), (DO_T, DO_T + LSE)]
    if form == FORMS[2]:
        out += [(DELTA, ""), (S_WAIT, S_WAIT + DELTA)]
    if form == FORMS[3]:
        out += [(DELTA, ""), (DV_ISSUE, DV_ISSUE + DELTA)]
    if form == FORMS[4]:
        out += [(DELTA, ""), (DO_T + LSE, DO_T + LSE + DELTA)]
    return out


def variant(low, form: str):
    """``low`` with its Gluon module's dk/dv consumers reading lse and delta as the form says."""
    if form == FORMS[0]:
        return low
    text = low._gluon_text
    for old, new in patches(form):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    low._gluon_text = text
    low._gluon_key = hashlib.sha256((low._gluon_key + form).encode()).hexdigest()[:24]
    low._gluon_module = None
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
        base = lows[FORMS[0]]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        ref = base.backward(dout, None, q, k, v, out, lse, aux)
        # the dk/dv kernel alone needs lse and delta side by side, as the backward makes them
        ld = torch.empty((2, *lse.shape), dtype=torch.float32, device=dev)
        ld[0].copy_(lse)
        base._launch_gluon_dq(q, k, v, dout, out, torch.empty_like(q), ld[0], ld[1], None, True)
        equal = {}
        for f in FORMS:
            oks = []
            for _ in range(3):   # a race would show as a difference on some run
                grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
                oks.append(all(map(torch.equal, grads, ref)))
            dk, dv = torch.full_like(k, math.nan), torch.full_like(v, math.nan)
            lows[f]._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True)
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
                    lambda: low._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True),
                    warmup=5, rep=100, return_mode="median"))
                times[(f, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal[f], ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, ref, lows, base, ld
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N=64K, bf16, H={H}, D={D}; median of {args.rounds} "
          "alternating rounds")
    print("| case | pass | form | ms | bitwise equal | rounds |")
    print("|---|---|---|---|---|---|")
    for case, p, f, ms, eq, ts in rows:
        print(f"| {case} | {p} | {f} | {ms:.3f} | {eq} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
