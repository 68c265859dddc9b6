"""Experiment: the Gluon dq kernel with each consumer's Q and dO rows held in registers as the A operands of
S = Q K^T and dP = dO V^T, and their shared buffer handed back to the producer as soon as they are loaded.

Why: in ``gluon_bwd_dq`` a query tile's Q and dO stay fixed over its whole key loop, yet both products read them
from shared memory at every key step (64 x 128 each per consumer). Read once into registers (32 registers a
thread each), the two products read only K and V from shared memory: 40% less shared-memory operand traffic per
step (S 16+16 KB, dP 16+16 KB, dQ 16 KB -> 16, 16, 16 KB per consumer). At the 700 W limit (power_check.py) a
step's time follows its energy, and operand reads are part of it. Second, the tile's single Q/dO buffer now goes
back to the producer before the key loop instead of after it, so the next tile's Q and dO (and the K/V copies
queued behind them) load during this tile's loop rather than after it.

The arithmetic is unchanged (the same products on the same values), so dq and delta must be bitwise equal to the
lowering's.

Four-branch grouped N = 64K, bf16, 16 heads, D = 128, causal and not: the dq kernel alone at two register splits,
then the lowering's backward and forward + backward, the forms alternating over --rounds rounds.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_dq_regs_experiment.py [--rounds 3]

The same change is tried in the forward (Q in registers for S = Q K^T, its buffer handed back at once) and in the
dk/dv kernel (each consumer's 64 keys in registers for S^T = K Q^T; V stays in shared memory: no room for both).
Each form adds its change to the one before.

``--check-compile`` compiles the first and last forms' kernels for sm_90a without a GPU (triton 3.6) and prints
their shared memory, matrix instructions and spills: dq 0 spills in a step (2 to 4 once per tile), the forward
none, dk/dv 83 (93 causal) outside the steps against 29 (56) for the lowering's.

Outcome (H200, stop 24, 9 alternating rounds, every form's out, lse, dq, dk and dv bitwise equal to the
lowering's; benchmarks/results/H200-triton.md, "Stop 24"):
- dq kernel alone: 1.236 -> 1.211 ms at 232 registers, 1.225 -> 1.196 at 240 (2%);
- the backward: 3.014 -> 2.996 ms (0.6%), and forward + backward not moved: 3.928 -> 3.938 ms;
- the forward with Q in registers: 0.898 -> 0.889 ms, inside the rounds' spread (0.873-0.915);
- dk/dv with K in registers: slower, backward 3.202 ms (causal 1.761 -> 1.902).
At the power limit the step does not follow the dq kernel's 2%. Not adopted.

Stop 42 (H100, power_ab.py --sustained 10 3, 5 rounds): fwd+bwd 3.841 -> 3.818 ms, faster in every round. Put
into the lowering, the form gave wrong dq (grad q errors of 2.1 and 2.7) in the GPU tests for causal head_dim 64,
grouped and "all" mode; D = 128 and D = 64 not causal passed. Reverted. The cause is in the machine code: ptxas
gives dS (the A operand of dQ = dS K) the registers of dO, which the loop still needs for the next step's dP, so
from the second key step on dP is computed from the previous dS (``gluon_compile.operand_overwrites`` finds it
without a GPU; the compile check now refuses it). Two more forms (indices into FORMS, as power_ab.py's
``--forms`` takes them):
- form 4 hands the Q/dO buffer back after the key loop, as the lowering does: the same allocation, the same
  fault (so the early hand-back is not the cause);
- form 5 names Q and dO in the waits of the products that read them (``warpgroup_mma_wait``'s ``deps``: kept
  alive while the product is unfinished): ptxas keeps dO apart and copies it into the operand registers each
  step; no overwrite found.
``--check-equal REPEATS`` compares forms 1, 4 and 5 with the lowering on the failing case, REPEATS times each.
The same check on form 3 (four-branch N = 64K, bf16): its dk/dv kernel with K in registers has the overwrite at
causal D = 64 (32 registers) and not at D = 128 not causal; its forward with Q in registers has none at either.

Stop 43 (H100): ``--check-equal 3`` gave forms 1 and 4 dq differences of 2.32 in every run (the same each time,
not a race) and form 5 bitwise equal; with form 5 patched into the lowering, the 22 Gluon GPU tests that ran
passed. Sustained (``power_ab.py --forms 0,5 --sustained 10 3 --rounds 3``) form 5 is 0.1% slower than the
lowering, 3.868 -> 3.872 ms in all 3 rounds: the copies of dO that keep it right take back form 1's gain. Not
adopted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_variants import patch_gluon, print_results  # noqa: E402

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))

PATCHES = [
    # the dq consumer's layouts: an A-operand layout for S and dP
    ("    rows_l: gl.constexpr = gl.SliceLayout(1, s_l)\n    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)\n"
     "    blk: gl.constexpr",
     "    rows_l: gl.constexpr = gl.SliceLayout(1, s_l)\n    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)\n"
     "    sop_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2)\n"
     "    blk: gl.constexpr"),
    # Q and dO into registers once per tile, after delta; the buffer goes back at once
    ("            gl.store(DELTA + offs, delta)\n",
     "            gl.store(DELTA + offs, delta)\n"
     "            q_reg = q_half.load(sop_l)\n"
     "            do_reg = do_half.load(sop_l)\n"
     "            mbarrier.arrive(t_empty, count=1)\n"),
    ("                s_tok = warpgroup_mma(q_half, k_t.permute((1, 0)),",
     "                s_tok = warpgroup_mma(q_reg, k_t.permute((1, 0)),"),
    ("                dp_tok = warpgroup_mma(do_half, v_smem.index(st).permute((1, 0)),",
     "                dp_tok = warpgroup_mma(do_reg, v_smem.index(st).permute((1, 0)),"),
    ("            mbarrier.arrive(t_empty, count=1)\n            c += n_k\n", "            c += n_k\n"),
]
FWD_PATCHES = [
    # the forward consumer: Q into registers once per tile; its buffer goes back at once (not after the last S)
    ("    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)\n    b = gl.program_id(1)\n",
     "    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)\n"
     "    sop_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2)\n"
     "    b = gl.program_id(1)\n"),
    ("        mbarrier.wait(q_ready, i & 1)\n",
     "        mbarrier.wait(q_ready, i & 1)\n        q_reg = q_half.load(sop_l)\n        mbarrier.arrive(q_empty, count=1)\n"),
    ("s_tok = warpgroup_mma(q_half, k_smem.index(st).permute((1, 0)),",
     "s_tok = warpgroup_mma(q_reg, k_smem.index(st).permute((1, 0)),"),
    ("        mbarrier.arrive(q_empty, count=1)\n        g = c + n_k - 1\n", "        g = c + n_k - 1\n"),
]
DKDV_PATCHES = [
    # the dk/dv consumer: its 64 keys into registers once per tile (V stays in shared memory: no room for both)
    ("    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)\n    b0 = gl.program_id(1)\n",
     "    cols_l: gl.constexpr = gl.SliceLayout(0, s_l)\n"
     "    sop_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_l, k_width=2)\n"
     "    b0 = gl.program_id(1)\n"),
    ("            mbarrier.wait(kv_ready, (it if PHASED else i) & 1)\n",
     "            mbarrier.wait(kv_ready, (it if PHASED else i) & 1)\n            k_reg = k_half.load(sop_l)\n"),
    ("st_tok = warpgroup_mma(k_half, q_t.permute((1, 0)),", "st_tok = warpgroup_mma(k_reg, q_t.permute((1, 0)),"),
]
# the dq consumer's Q and dO in registers, their buffer handed back after the key loop as in the lowering (stop 42:
# form 1 hands it back before the loop and gave wrong dq for causal head_dim 64 on the GPU; this form compiles to
# the same register overwrite, so the early hand-back was not the cause)
LATE_PATCHES = [PATCHES[0],
                (PATCHES[1][0], PATCHES[1][1].replace("            mbarrier.arrive(t_empty, count=1)\n", "")),
                PATCHES[2], PATCHES[3]]

# the form of PATCHES with Q and dO named in the waits of the products that read them (``deps``: kept alive while
# the product is unfinished); without it ptxas gives dS the registers of dO (gluon_compile.operand_overwrites)
DEPS_PATCHES = [*PATCHES,
                ("                s = warpgroup_mma_wait(1, deps=(s_tok, ))\n",
                 "                s, q_reg = warpgroup_mma_wait(1, deps=(s_tok, q_reg))\n"),
                ("                dp = warpgroup_mma_wait(0, deps=(dp_tok, ))\n",
                 "                dp, do_reg = warpgroup_mma_wait(0, deps=(dp_tok, do_reg))\n")]

# forms 1 to 3 each add their patches to the one before; forms 4 and 5 are form 1's dq kernel changed
FORMS = ("operands from shared memory (the lowering)", "dq: Q, dO in registers", "... and fwd: Q in registers",
         "... and dk/dv: K in registers", "dq: Q, dO in registers, buffer back after the loop",
         "dq: Q, dO in registers, kept alive by the waits")


def variant(low, form: str):
    """``low`` with its Gluon module's dq consumer in the form's operands."""
    if form == FORMS[0]:
        return low
    if form in FORMS[4:]:
        return patch_gluon(low, form, LATE_PATCHES if form == FORMS[4] else DEPS_PATCHES)
    level = FORMS.index(form)
    patches = [*PATCHES, *(FWD_PATCHES if level >= 2 else []), *(DKDV_PATCHES if level >= 3 else [])]
    return patch_gluon(low, form, patches,
                       expected=lambda old: 2 if old.startswith("s_tok = warpgroup_mma(q_half, k_smem") else 1)


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, summarize
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        for form in (FORMS[0], FORMS[3], *FORMS[4:]):
            kernels = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form).gluon_kernels
            for name in ("gluon_fwd", "gluon_bwd_dq", "gluon_bwd_dkdv"):
                for regs in (232, 240):
                    if (name == "gluon_bwd_dkdv" and regs != 240) or (form in FORMS[4:] and
                                                                       (name != "gluon_bwd_dq" or regs != 232)):
                        continue
                    consts = dict(launch_constexprs(name, D, causal), CONSUMER_REGS=regs)
                    label = f"causal={causal}, {form}, {name}, consumer regs {regs}"
                    try:
                        print(f"{label}: {summarize(compile_sm90(getattr(kernels, name), consts))}", flush=True)
                    except Exception as e:
                        print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)


# the GPU tests' grouped spec (tests/test_triton_lowering.py, test_gpu_gluon_kernels): N = 4096, 8 heads, batch 1
TEST_BRANCHES = (Branch(256, 1), Branch(512, 2, offset=1), Branch(1024, 4), Branch(2048, 8))
TEST_CASES = [(64, True, torch.float16)]   # test_gpu_gluon_kernels' failing case (stop 42)


def check_equal(repeats: int) -> None:
    """The dq forms (not the forward's or dk/dv's) against the lowering on the GPU tests' spec, each case run
    ``repeats`` times: whether out, lse, dq, dk and dv are bitwise equal to the lowering's, and dq's largest
    difference (a fault that depends on timing shows as a difference that comes and goes)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    for head_dim, causal, dtype in TEST_CASES:
        plan = build_plan(AttentionSpec(TEST_BRANCHES, causal=causal), 4096, 8, head_dim)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, dtype), f) for f in (FORMS[0], FORMS[1], *FORMS[4:])}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, 4096, 8, head_dim, device=dev, dtype=dtype, generator=g) for _ in range(4))
        base = lows[FORMS[0]]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        ref = base.backward(dout, None, q, k, v, out, lse, aux)
        for f, low in lows.items():
            found = []
            for _ in range(repeats):
                o, l_, a = low.forward(q, k, v)
                grads = low.backward(dout, None, q, k, v, o, l_, a)
                equal = torch.equal(o, out) and torch.equal(l_, lse) and all(map(torch.equal, grads, ref))
                found.append(f"{'equal' if equal else 'DIFFERS'} (dq {(grads[0] - ref[0]).abs().max().item():.3g})")
            print(f"D={head_dim} causal={causal} {str(dtype)[6:]} | {f}: {', '.join(found)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-compile", action="store_true")
    ap.add_argument("--check-equal", type=int, metavar="REPEATS", default=0,
                    help="only compare the dq forms with the lowering on the GPU tests' spec, REPEATS times a case")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()
    if args.check_equal:
        return check_equal(args.check_equal)
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for causal in (False, True):
        forms = FORMS if not causal else (FORMS[0], FORMS[3])
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in forms}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        base = lows[FORMS[0]]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        ref = base.backward(dout, None, q, k, v, out, lse, aux)
        equal = {}
        for f in forms:
            o, l_, _ = lows[f].forward(q, k, v)
            grads = lows[f].backward(dout, None, q, k, v, out, lse, aux)
            equal[f] = torch.equal(o, out) and torch.equal(l_, lse) and all(map(torch.equal, grads, ref))
        print(f"causal={causal}: out, lse, dq, dk, dv bitwise equal to the lowering's: {equal}", flush=True)
        # the dq kernel alone by register split (not causal)
        kernel_forms = [] if causal else [(f, regs) for f in FORMS[:2] for regs in (232, 240)]
        for f, regs in kernel_forms:
            dq, delta = torch.full_like(q, math.nan), torch.full_like(lse, math.nan)
            lows[f]._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True, consumer_regs=regs)
            torch.cuda.synchronize()
            equal[(f, regs)] = torch.equal(dq, ref[0])
        times = {key: [] for key in [*((f, p) for f in forms for p in ("fwd", "bwd", "fwd+bwd")), *kernel_forms]}
        for _ in range(args.rounds):
            for f, regs in kernel_forms:
                low = lows[f]
                dq, delta = torch.empty_like(q), torch.empty_like(lse)
                times[(f, regs)].append(do_bench(
                    lambda: low._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True, consumer_regs=regs),
                    warmup=5, rep=100, return_mode="median"))
            for f in forms:
                low = lows[f]

                def bwd():
                    low.backward(dout, None, q, k, v, out, lse, aux)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "fwd")].append(do_bench(lambda: low.forward(q, k, v), warmup=5, rep=100,
                                                  return_mode="median"))
                times[(f, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (f, p), ts in times.items():
            label = f"gluon_bwd_dq alone, consumer regs {p}" if isinstance(p, int) else p
            rows.append((f"causal={causal}", label, f, sorted(ts)[len(ts) // 2], equal[(f, p) if isinstance(p, int)
                                                                                        else f], ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, ref, lows, base
        torch.cuda.empty_cache()
    print_results(rows, args.rounds, H, D)


if __name__ == "__main__":
    main()
