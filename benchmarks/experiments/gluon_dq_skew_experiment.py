"""Experiment: the dq kernel's dS K product issued one key step late, so that it runs under the next step's softmax.

Why: in the dq kernel each consumer waits for its own dQ += dS K at the end of every key step before it issues the
next step's S and dP; the ncu profile of stop 28 sampled the consumers waiting on their products (WARPGROUP.DEPBAR)
for about 30% of their time, the end-of-step wait the largest. Stop 9's PIPE form (the next step's S and dP issued
before waiting for dQ) was 45% slower: compiled again here, ptxas serialises every wgmma of that form ("C7512:
wgmma.mma_async instructions are serialized due to insufficient register resources"), at head_dim 64 too, so the
cause is the product left in flight across the loop's back edge, not the register count.

The form here keeps every product inside its step, as the forward does with P V: step j issues S_j, dP_j, then
dS_{j-1} K_{j-1}, and waits for all three before it ends; step 0 issues a product of zeros with its own K tile
instead, and the last dS K runs after the loop. A K/V stage is handed back one step later, so the producer runs
one stage less ahead. Compiled for sm_90a: no serialisation, no spills, HGMMA 48 (40 + the step-0 product).

The arithmetic is the same (dQ starts at 0 and adds dS_j K_j in the same order), so dq must be bitwise equal.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_dq_skew_experiment.py [--rounds 3]

``--check-compile`` compiles the two forms and stop 9's PIPE form for sm_90a without a GPU (triton 3.6) and prints
their SASS summaries, which name ptxas's reason where it serialises the wgmmas (the PIPE form's).

Outcome (H100, stop 28, one call, 3 alternating rounds, not causal; dq, dk and dv bitwise equal to the lowering's on
3 runs each), median ms: dq kernel 1.204 (the lowering) against 1.213, fwd+bwd 3.735 against 3.759; the rounds
overlap (1.104-1.259 against 1.205-1.231). No gain: the two consumers' interleaving already fills the tensor cores
while one waits for its dS K. Not adopted. The causal form was not timed (the session's device time ran out).
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

OLD = """            dq = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
            for j in range(n_k):
                g = c + j
                st = g % STAGES
                k_t = k_smem.index(st)
                mbarrier.wait(kv_ready.index(st), (g // STAGES) & 1)
                s_tok = warpgroup_mma(q_half, k_t.permute((1, 0)),
                                      gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False,
                                      is_async=True)
                dp_tok = warpgroup_mma(do_half, v_smem.index(st).permute((1, 0)),
                                       gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False,
                                       is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_tok, ))
                if CAUSAL:
                    s = _causal_s(s, j, n_full, q_rows, BLOCK_N, cols_l)
                p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
                dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
                ds = p * (dp - gl.expand_dims(delta, 1))
                dq_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_l), k_t, dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
                mbarrier.arrive(kv_empty.index(st), count=1)
            mbarrier.arrive(t_empty, count=1)
"""
NEW = """            dq = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
            # dS_{j-1} K_{j-1} is issued after S_j and dP_j, so it runs under the softmax of S_j
            ds_prev = gl.zeros([HALF, BLOCK_N], dtype, layout=op_l)
            for j in range(n_k):
                g = c + j
                st = g % STAGES
                pst = (g - gl.minimum(j, 1)) % STAGES   # step j - 1's stage; at j = 0 a product of zeros
                k_t = k_smem.index(st)
                mbarrier.wait(kv_ready.index(st), (g // STAGES) & 1)
                s_tok = warpgroup_mma(q_half, k_t.permute((1, 0)),
                                      gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False,
                                      is_async=True)
                dp_tok = warpgroup_mma(do_half, v_smem.index(st).permute((1, 0)),
                                       gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False,
                                       is_async=True)
                dq_tok = warpgroup_mma(ds_prev, k_smem.index(pst), dq, is_async=True)
                s = warpgroup_mma_wait(2, deps=(s_tok, ))
                if CAUSAL:
                    s = _causal_s(s, j, n_full, q_rows, BLOCK_N, cols_l)
                p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
                dp = warpgroup_mma_wait(1, deps=(dp_tok, ))
                ds = p * (dp - gl.expand_dims(delta, 1))
                dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
                if j > 0:
                    mbarrier.arrive(kv_empty.index(pst), count=1)
                ds_prev = gl.convert_layout(ds.to(dtype), op_l)
            if n_k > 0:
                st = (c + n_k - 1) % STAGES
                dq_tok = warpgroup_mma(ds_prev, k_smem.index(st), dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
                mbarrier.arrive(kv_empty.index(st), count=1)
            mbarrier.arrive(t_empty, count=1)
"""
# stop 9's PIPE form, rebuilt for the compile check: each step issues S and dP, then waits for the step before's
# dS K (left in flight across the loop's back edge). Not timed: ptxas serialises its wgmmas.
_HOPPER = "from triton.experimental.gluon.language.nvidia.hopper import "
IMPORT = (_HOPPER + "(fence_async_shared, mbarrier, tma, warpgroup_mma,",
          _HOPPER + "warpgroup_mma_init\n" + _HOPPER + "(fence_async_shared, mbarrier, tma, warpgroup_mma,")
INIT = ("""            dq = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l)
            for j in range(n_k):""",
        """            dq = warpgroup_mma_init(gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_l))
            prev = 0
            for j in range(n_k):""")
TAIL = ("""                dq_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_l), k_t, dq, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
                mbarrier.arrive(kv_empty.index(st), count=1)
            mbarrier.arrive(t_empty, count=1)
""", """                dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_l), k_t, dq, is_async=True)
                prev = st
            dq = warpgroup_mma_wait(0, deps=(dq, ))
            if n_k > 0:
                mbarrier.arrive(kv_empty.index(prev), count=1)
            mbarrier.arrive(t_empty, count=1)
""")
S_ISSUE = """                s_tok = warpgroup_mma(q_half, k_t.permute((1, 0)),
                                      gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False,
                                      is_async=True)
"""
DP_ISSUE = """                dp_tok = warpgroup_mma(do_half, v_smem.index(st).permute((1, 0)),
                                       gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False,
                                       is_async=True)
"""
DQ_DONE = """                dq = warpgroup_mma_wait(WAITN, deps=(dq, ))
                if j > 0:
                    mbarrier.arrive(kv_empty.index(prev), count=1)
"""
PIPE_PATCHES = [IMPORT, INIT, TAIL, (DP_ISSUE, DP_ISSUE + DQ_DONE.replace("WAITN", "2"))]

FORMS = ("the lowering", "dS K one step late", "PIPE (stop 9)")
TIMED = FORMS[:2]


def variant(low, form: str):
    if form == FORMS[0]:
        return low
    return patch_gluon(low, form, [(OLD, NEW)] if form == FORMS[1] else PIPE_PATCHES)


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, summarize
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        for form in FORMS:
            low = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form)
            label = f"causal={causal}, {form}"
            try:
                compiled = compile_sm90(low.gluon_kernels.gluon_bwd_dq, launch_constexprs("gluon_bwd_dq", D, causal))
            except Exception as e:
                print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
                continue
            print(f"{label}: {summarize(compiled)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-compile", action="store_true")
    ap.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for causal in {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]:
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in TIMED}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        base = lows[FORMS[0]]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        ref = base.backward(dout, None, q, k, v, out, lse, aux)
        equal = {}
        for f in TIMED:
            oks = []
            for _ in range(3):
                grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
                oks.append(all(map(torch.equal, grads, ref)))
            dq, delta = torch.full_like(q, math.nan), torch.full_like(lse, math.nan)
            lows[f]._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True)
            torch.cuda.synchronize()
            equal[f] = all(oks) and torch.equal(dq, ref[0])
        print(f"causal={causal}: dq, dk, dv bitwise equal to the lowering's (3 runs each): {equal}", flush=True)
        times = {(f, p): [] for f in TIMED for p in ("dq kernel", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in TIMED:
                low = lows[f]
                dq, delta = torch.empty_like(q), torch.empty_like(lse)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "dq kernel")].append(do_bench(
                    lambda: low._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True),
                    warmup=5, rep=100, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
            print({key: round(ts[-1], 3) for key, ts in times.items()}, flush=True)
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal[f], ts))
        del q, k, v, dout, out, lse, aux, ref, lows, base
        torch.cuda.empty_cache()
    print_results(rows, args.rounds, H, D)


if __name__ == "__main__":
    main()
