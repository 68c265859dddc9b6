"""Experiment: ping-pong scheduling of the two consumer warpgroups (FA3's inter-warpgroup overlap) in the Gluon
forward, and in the dq kernel.

Why: each consumer warpgroup of ``gluon_fwd`` already overlaps its own softmax with its own products (S_j is
issued before P_{j-1} V_{j-1}), but nothing keeps the two warpgroups out of step: left alone they tend to issue
their products at the same time and then both do their softmax while the tensor cores idle. FA3 orders them
with two named barriers: a warpgroup waits for its turn before issuing its products and hands the turn to the
other warpgroup right after, so one warpgroup's softmax runs under the other's products. Here the turns are two
mbarriers (one arrival each), the second warpgroup arriving once at the start so the first goes first. Both
warpgroups walk the same tiles with the same number of key steps, so their turn counts match.

Turn points: the forward's S_0 issue, each step's S_j + P_{j-1} V_{j-1} issue, the last P V issue; the dq
kernel's S + dP issue and its dS K issue.

The arithmetic is unchanged (the same products in the same order within a warpgroup), so out, lse, dq, dk and dv
must be bitwise equal to the lowering's.

Four-branch grouped N = 64K, bf16, 16 heads, D = 128, causal and not: the forward and the dq kernel alone, then
the lowering's forward, backward and forward + backward, the forms alternating over --rounds rounds.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_pingpong_experiment.py [--rounds 5]

``--check-compile`` compiles the forms' forward and dq kernels for sm_90a without a GPU (triton 3.6): the same
shared memory (+32 B of barriers), the same 64 / 40 HGMMAs, no spills.

Outcome (H100, stop 27, 5 alternating rounds; every form's out, lse, dq, dk and dv bitwise equal to the
lowering's on 3 runs each; benchmarks/results/H100-triton.md, "Stop 27"), median ms:
- forward: 0.884 (the lowering), 0.893 (ping-pong); causal 0.546, 0.539;
- dq kernel alone: 1.235, 1.264 with ping-pong in dq; causal 0.730, 0.754;
- fwd+bwd: 3.973, 3.946 (fwd ping-pong), 4.048 (fwd and dq); causal 2.322, 2.350, 2.397.
Nothing moved beyond the rounds' spread, and ping-pong in dq is slower. Not adopted: the warp schedulers already
keep the two consumers' products and softmax apart as well as the turns do, and the step runs at the power limit.
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

TURN_WAIT = "mbarrier.wait(turn.index(WG), tp & 1)\n"
TURN_PASS = "mbarrier.arrive(turn.index(1 - WG), count=1)\n"

FWD_PATCHES = [
    # the turn barriers: allocated, initialised, passed to both consumers
    ("    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())\n"
     "    zl: gl.constexpr",
     "    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())\n"
     "    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())\n"
     "    zl: gl.constexpr"),
    ("        mbarrier.init(v_empty.index(st), count=2)\n    gl.warp_specialize([\n"
     "        (_consumer, ",
     "        mbarrier.init(v_empty.index(st), count=2)\n"
     "    mbarrier.init(turn.index(0), count=1)\n    mbarrier.init(turn.index(1), count=1)\n"
     "    gl.warp_specialize([\n        (_consumer, "),
    ("v_ready, v_empty, 0, HEAD_DIM,", "v_ready, v_empty, turn, 0, HEAD_DIM,"),
    ("v_ready, v_empty, 1, HEAD_DIM,", "v_ready, v_empty, turn, 1, HEAD_DIM,"),
    ("v_ready, v_empty, WG: gl.constexpr, HEAD_DIM: gl.constexpr,",
     "v_ready, v_empty, turn, WG: gl.constexpr, HEAD_DIM: gl.constexpr,"),
    # the second warpgroup lets the first go first
    ("    o_half = o_smem.index(WG)\n    c = 0\n",
     "    o_half = o_smem.index(WG)\n    c = 0\n    tp = 0\n    if WG == 1:\n"
     "        mbarrier.arrive(turn.index(0), count=1)\n"),
    # S_0
    ("        mbarrier.wait(k_ready.index(st), (c // STAGES) & 1)\n"
     "        s_tok = warpgroup_mma(q_half, k_smem.index(st).permute((1, 0)),\n"
     "                              gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False, is_async=True)\n",
     "        mbarrier.wait(k_ready.index(st), (c // STAGES) & 1)\n"
     "        " + TURN_WAIT +
     "        s_tok = warpgroup_mma(q_half, k_smem.index(st).permute((1, 0)),\n"
     "                              gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_l), use_acc=False, is_async=True)\n"
     "        " + TURN_PASS + "        tp += 1\n"),
    # each step: S_j and P_{j-1} V_{j-1}
    ("            mbarrier.wait(k_ready.index(st), (g // STAGES) & 1)\n"
     "            s_tok = warpgroup_mma(q_half,",
     "            mbarrier.wait(k_ready.index(st), (g // STAGES) & 1)\n"
     "            " + TURN_WAIT +
     "            s_tok = warpgroup_mma(q_half,"),
    ("            acc_tok = warpgroup_mma(p_prev, v_smem.index(pst), acc, is_async=True)\n",
     "            acc_tok = warpgroup_mma(p_prev, v_smem.index(pst), acc, is_async=True)\n"
     "            " + TURN_PASS + "            tp += 1\n"),
    # the last P V
    ("        mbarrier.wait(v_ready.index(st), (g // STAGES) & 1)\n"
     "        acc_tok = warpgroup_mma(p_prev, v_smem.index(st), acc, is_async=True)\n",
     "        mbarrier.wait(v_ready.index(st), (g // STAGES) & 1)\n"
     "        " + TURN_WAIT +
     "        acc_tok = warpgroup_mma(p_prev, v_smem.index(st), acc, is_async=True)\n"
     "        " + TURN_PASS + "        tp += 1\n"),
]
DQ_PATCHES = [
    ("    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())\n"
     "    # \"ready\" phases",
     "    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())\n"
     "    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())\n"
     "    mbarrier.init(turn.index(0), count=1)\n    mbarrier.init(turn.index(1), count=1)\n"
     "    # \"ready\" phases"),
    ("dq_smem, t_ready, t_empty, kv_ready, kv_empty, 0, HEAD_DIM,",
     "dq_smem, t_ready, t_empty, kv_ready, kv_empty, turn, 0, HEAD_DIM,"),
    ("dq_smem, t_ready, t_empty, kv_ready, kv_empty, 1, HEAD_DIM,",
     "dq_smem, t_ready, t_empty, kv_ready, kv_empty, turn, 1, HEAD_DIM,"),
    ("                 t_ready, t_empty, kv_ready, kv_empty, WG: gl.constexpr,",
     "                 t_ready, t_empty, kv_ready, kv_empty, turn, WG: gl.constexpr,"),
    ("    dq_out = dq_smem.index(WG)\n    c = 0\n    it = 0\n",
     "    dq_out = dq_smem.index(WG)\n    c = 0\n    it = 0\n    tp = 0\n"
     "    if WG == 1:\n        mbarrier.arrive(turn.index(0), count=1)\n"),
    # S and dP
    ("                mbarrier.wait(kv_ready.index(st), (g // STAGES) & 1)\n"
     "                s_tok = warpgroup_mma(q_half, k_t.permute((1, 0)),",
     "                mbarrier.wait(kv_ready.index(st), (g // STAGES) & 1)\n"
     "                " + TURN_WAIT +
     "                s_tok = warpgroup_mma(q_half, k_t.permute((1, 0)),"),
    ("                                       is_async=True)\n"
     "                s = warpgroup_mma_wait(1, deps=(s_tok, ))\n",
     "                                       is_async=True)\n"
     "                " + TURN_PASS + "                tp += 1\n"
     "                s = warpgroup_mma_wait(1, deps=(s_tok, ))\n"),
    # dS K
    ("                dq_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_l), k_t, dq, is_async=True)\n",
     "                " + TURN_WAIT +
     "                dq_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_l), k_t, dq, is_async=True)\n"
     "                " + TURN_PASS + "                tp += 1\n"),
]
FORMS = ("the lowering", "fwd ping-pong", "fwd and dq ping-pong")


def variant(low, form: str):
    """``low`` with its Gluon module's consumers scheduled as the form says."""
    if form == FORMS[0]:
        return low
    patches = [*FWD_PATCHES, *(DQ_PATCHES if form == FORMS[2] else [])]
    return patch_gluon(low, form, patches)


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, summarize
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        for form in FORMS:
            kernels = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form).gluon_kernels
            for name in ("gluon_fwd", "gluon_bwd_dq"):
                label = f"causal={causal}, {form}, {name}"
                try:
                    print(f"{label}: {summarize(compile_sm90(getattr(kernels, name), launch_constexprs(name, D, causal)))}",
                          flush=True)
                except Exception as e:
                    print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
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
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in FORMS}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        base = lows[FORMS[0]]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        ref = base.backward(dout, None, q, k, v, out, lse, aux)
        equal = {}
        for f in FORMS:
            oks = []
            for _ in range(3):   # a race would show as a difference on some run
                o, l_, _a = lows[f].forward(q, k, v)
                grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
                oks.append(torch.equal(o, out) and torch.equal(l_, lse) and all(map(torch.equal, grads, ref)))
            equal[f] = all(oks)
            # the dq kernel alone, from NaN-filled outputs
            dq, delta = torch.full_like(q, math.nan), torch.full_like(lse, math.nan)
            lows[f]._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True)
            torch.cuda.synchronize()
            equal[f] = equal[f] and torch.equal(dq, ref[0])
        print(f"causal={causal}: out, lse, dq, dk, dv bitwise equal to the lowering's (3 runs each): {equal}",
              flush=True)
        times = {(f, p): [] for f in FORMS for p in ("dq kernel", "fwd", "bwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in FORMS:
                low = lows[f]
                dq, delta = torch.empty_like(q), torch.empty_like(lse)

                def bwd():
                    low.backward(dout, None, q, k, v, out, lse, aux)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "dq kernel")].append(do_bench(
                    lambda: low._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True),
                    warmup=5, rep=100, return_mode="median"))
                times[(f, "fwd")].append(do_bench(lambda: low.forward(q, k, v), warmup=5, rep=100,
                                                  return_mode="median"))
                times[(f, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (f, p), ts in times.items():
            rows.append((f"causal={causal}", p, f, sorted(ts)[len(ts) // 2], equal[f], ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, ref, lows, base
        torch.cuda.empty_cache()
    print_results(rows, args.rounds, H, D)


if __name__ == "__main__":
    main()
