"""Experiment: the dk/dv kernel's dK (and dV) products issued one query step late, under the next step's softmax.

Why: the ncu profile of stop 28 (after the lse fix) sampled the dk/dv consumers waiting for their own products
(WARPGROUP.DEPBAR) for about 13% of their time, most of it at the end of each query step, where a consumer waits
for dS^T Q, issued last, before it issues the next step's S^T and dP^T. The same order in the dq kernel
(``gluon_dq_skew_experiment.py``) gained nothing; the dk/dv kernel is the longest of the three and its
end-of-step product is issued later in its step than dq's.

The forms (every product stays inside its step, so ptxas does not serialise them, as stop 9's PIPE form was):
- "the lowering": step j issues S^T_j and dP^T_j, then P^T_j dO_j after the softmax, dS^T_j Q_j at the end, and
  waits for both;
- "dK late": step j issues S^T_j, dP^T_j, then dS^T_{j-1} Q_{j-1} (held in registers from step j - 1), then
  P^T_j dO_j after the softmax; it ends waiting for P^T_j dO_j and dS^T_{j-1} Q_{j-1};
- "dV and dK late": step j issues S^T_j, dP^T_j, P^T_{j-1} dO_{j-1} and dS^T_{j-1} Q_{j-1}.
The first step issues a product of zeros with its own tile instead, and the last late products run after the
loop. A Q/dO stage is handed back one step later, so the producer runs one stage less ahead. The arithmetic is the
same (the accumulators add the same products in the same order, and 0 + 0 is exact), so dk and dv must be bitwise
equal to the lowering's.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_dkdv_skew_experiment.py [--rounds 3]

``--check-compile`` compiles the forms' dk/dv kernels for sm_90a without a GPU (triton 3.6) and prints their SASS
summaries (registers, spills, matrix instructions, and whether ptxas serialises them).

Outcome (compiled for sm_90a, stop 29; not timed): ptxas serialises every matrix instruction of both late forms
("C7512 ... insufficient register resources"), causal and not, and they spill among the products (dK late: 5
spill instructions in a step's products, 66 elsewhere, against 0 and 25 for the lowering; dV and dK late: 46 and
128). The dk/dv consumers already need 240 registers (232 spills among the products), and the late operand held
across the step (dS^T as a 64 x 64 bf16 operand, 16 registers a thread) does not fit: giving the consumers 248 or
256 registers (the producer 24) still serialises the dK-late form. Holding dS^T in shared memory instead would fit
(16 KiB for the two consumers beside the kernel's 215,056 bytes) but was not built: the same order in the dq
kernel, whose end-of-step product has the same shape (64 x 128 x 64), gained nothing on the H100. Not adopted.
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

# the step loop's head; its forms run without grouped-query attention (GQA 1: j is jj, the loop j0..n_m)
HEAD = """            mbarrier.wait(kv_ready, (it if PHASED else i) & 1)
            for jj in range(j0, jj_end):
                # GQA: query head jj // (n_m - j0) of the tile's, step j (the same walk for each head)
                if GQA > 1:
                    j = j0 + (jj - j0) % (n_m - j0)
                else:
                    j = jj
                g = c + jj - j0
                st = g % STAGES
"""
ST_ISSUE = """                dpt_tok = warpgroup_mma(v_half, do_t.permute((1, 0)),
                                        gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_l), use_acc=False,
                                        is_async=True)
                s_t = warpgroup_mma_wait(1, deps=(st_tok, ))
"""
DV_ISSUE = "                dv_tok = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_l), do_t, dv, is_async=True)\n"
DP_WAIT = "                dp_t = warpgroup_mma_wait(1, deps=(dpt_tok, ))\n"
TAIL = """                dk_tok = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_l), q_t, dk, is_async=True)
                dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
                mbarrier.arrive(qd_empty.index(st), count=1)
            mbarrier.arrive(kv_empty, count=1)
"""
ZERO = "gl.zeros([HALF, BLOCK_M], dtype, layout=op_l)"
# step j - 1's stage; at the first step, the step's own (its late product is of zeros)
PST = "                pst = (g - gl.minimum(j - j0, 1)) % STAGES\n"
ISSUE_ST = "                s_t = warpgroup_mma_wait(1, deps=(st_tok, ))\n"
LATE_DK = "                dk_tok = warpgroup_mma(dst_prev, q_smem.index(pst), dk, is_async=True)\n"
LATE_DV = "                dv_tok = warpgroup_mma(pt_prev, do_smem.index(pst), dv, is_async=True)\n"
AFTER_LOOP = """            if n_m > j0:
                st = (c + n_m - j0 - 1) % STAGES
{issue}                dv, dk = warpgroup_mma_wait(0, deps=({deps}))
                mbarrier.arrive(qd_empty.index(st), count=1)
            mbarrier.arrive(kv_empty, count=1)
"""

FORMS = ("the lowering", "dK late", "dV and dK late")


def patches(form: str) -> list[tuple[str, str]]:
    if form == FORMS[1]:
        return [
            (HEAD, HEAD.replace("            for j", f"            dst_prev = {ZERO}\n            for j") + PST),
            (ST_ISSUE, ST_ISSUE.replace(ISSUE_ST, LATE_DK + ISSUE_ST.replace("wait(1", "wait(2"))),
            (DP_WAIT, DP_WAIT.replace("wait(1", "wait(2")),
            (TAIL, """                dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
                if j > j0:
                    mbarrier.arrive(qd_empty.index(pst), count=1)
                dst_prev = gl.convert_layout(ds_t.to(dtype), op_l)
""" + AFTER_LOOP.format(issue=LATE_DK.replace("pst", "st"), deps="dv, dk_tok")),
        ]
    if form == FORMS[2]:
        return [
            (HEAD, HEAD.replace("            for j", f"            pt_prev = {ZERO}\n            dst_prev = {ZERO}\n"
                                "            for j") + PST),
            (ST_ISSUE, ST_ISSUE.replace(ISSUE_ST, LATE_DV + LATE_DK + ISSUE_ST.replace("wait(1", "wait(3"))),
            (DV_ISSUE, ""),
            (DP_WAIT, DP_WAIT.replace("wait(1", "wait(2")),
            (TAIL, """                dv, dk = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok))
                if j > j0:
                    mbarrier.arrive(qd_empty.index(pst), count=1)
                pt_prev = gl.convert_layout(p_t.to(dtype), op_l)
                dst_prev = gl.convert_layout(ds_t.to(dtype), op_l)
""" + AFTER_LOOP.format(issue=(LATE_DV + LATE_DK).replace("pst", "st"), deps="dv_tok, dk_tok")),
        ]
    return []


def variant(low, form: str):
    """``low`` with its Gluon module's dk/dv consumers issuing their products as the form says."""
    if form == FORMS[0]:
        return low
    return patch_gluon(low, form, patches(form))


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, summarize
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
            print(f"{label}: {summarize(compiled)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-compile", action="store_true")
    ap.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--forms", default="0,1,2", help="comma-separated indices into FORMS to time")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()
    from triton.testing import do_bench
    forms = [FORMS[int(i)] for i in args.forms.split(",")]
    if FORMS[0] not in forms:
        forms.insert(0, FORMS[0])
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for causal in {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]:
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in forms}
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
        for f in forms:
            oks = []
            for _ in range(3):   # a race would show as a difference on some run
                grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
                oks.append(all(map(torch.equal, grads, ref)))
            dk, dv = torch.full_like(k, math.nan), torch.full_like(v, math.nan)
            lows[f]._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True)
            torch.cuda.synchronize()
            equal[f] = all(oks) and torch.equal(dk, ref[1]) and torch.equal(dv, ref[2])
        print(f"causal={causal}: dq, dk, dv bitwise equal to the lowering's (3 runs each): {equal}", flush=True)
        times = {(f, p): [] for f in forms for p in ("dk/dv kernel", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in forms:
                low = lows[f]
                dk, dv = torch.empty_like(k), torch.empty_like(v)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "dk/dv kernel")].append(do_bench(
                    lambda: low._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True),
                    warmup=5, rep=100, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
            print({key: round(ts[-1], 3) for key, ts in times.items()}, flush=True)
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal[f], ts))
        del q, k, v, dout, out, lse, aux, ref, lows, base, ld
        torch.cuda.empty_cache()
    print_results(rows, args.rounds, H, D)


if __name__ == "__main__":
    main()
