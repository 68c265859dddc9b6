"""Experiment: an earlier experiment's forms timed again as the target rounds now time the step, from a cool GPU.

Why: on the H100 the fwd+bwd step runs at the 700 W limit, so its time follows its energy, and a GPU that has been
busy for seconds runs at a lower SM clock than one that was idle (stop 36). The Gluon experiments up to stop 34 timed
their forms back to back in a fixed order, so a form's time also depended on what ran before it; a form that saves
energy rather than time at full clock (fewer shared-memory operand reads, say) could read as "not moved". This
script takes an experiment's ``FORMS`` and ``variant`` (a lowering with its Gluon source patched), and times each
form's fwd+bwd as ``target_rounds.py --rotate --idle S`` times the module: the GPU idles S seconds before each form,
the forms' order changes every round, and each round's ratios set every form against the lowering's form of the same
round. Before timing it checks that every form's out, lse, dq, dk and dv are bitwise equal to the lowering's (the
forms tried here change where operands are read from, not the arithmetic).

Case: four-branch grouped N = 64K, bf16, 16 heads, D = 128, batch 1, not causal (the issue's main case).

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/power_ab.py \\
        --experiment gluon_dq_regs_experiment --forms 0,1,2 [--rounds 9] [--idle 5]

``--sustained HEAT MEASURE`` times instead what a training loop sees: each form's step runs HEAT seconds untimed,
meant to bring the GPU to the power limit's steady clock, then MEASURE seconds of steps back to back are timed with
CUDA events (no cache flush between steps). At stop 41 the cool measurements (``--idle``) came out in two modes,
about 3.41 ms or about 3.7 ms for the same form, as the power limit did or did not set in within do_bench's 60 ms;
the sustained figure has one: at stop 42 (H100, ``--sustained 10 3``) each form's five rounds spread by 0.2%.

The timing is the lowering's forward and backward (``TritonLowering.forward`` / ``backward``), not the module's
step: the forms differ only inside the kernels, and the module's Python is the same for all of them.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from target_rounds import gpu_state, rotated, sustained_ms  # noqa: E402

from dilated_compiler import AttentionSpec, Branch, build_plan  # noqa: E402
from dilated_compiler.lowering.triton import lowering as tl_lowering  # noqa: E402

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", required=True, help="a module in benchmarks/experiments with FORMS and variant")
    ap.add_argument("--forms", default="0,1", help="comma-separated indices into its FORMS (0, the lowering, is "
                                                   "always timed)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds the GPU idles before each form's measurement")
    ap.add_argument("--sustained", type=float, nargs=2, metavar=("HEAT", "MEASURE"),
                    help="instead of do_bench from a cool GPU: run each form's step HEAT seconds untimed (to the "
                         "power limit's steady clock), then time MEASURE seconds of steps back to back (CUDA events)")
    args = ap.parse_args()
    exp = importlib.import_module(args.experiment)
    forms = [exp.FORMS[int(i)] for i in args.forms.split(",")]
    if exp.FORMS[0] not in forms:
        forms.insert(0, exp.FORMS[0])
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    plan = build_plan(AttentionSpec(FOUR), N, H, D)
    lows = {f: exp.variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in forms}
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    base = lows[forms[0]]
    assert base.gluon_unsupported(q, k, v, False) is None
    out, lse, aux = base.forward(q, k, v)
    ref = (out, lse, *base.backward(dout, None, q, k, v, out, lse, aux))
    for f in forms:
        o, l_, a = lows[f].forward(q, k, v)
        got = (o, l_, *lows[f].backward(dout, None, q, k, v, o, l_, a))
        equal = all(map(torch.equal, got, ref))
        print(f"{f}: out, lse, dq, dk, dv bitwise equal to the lowering's: {equal}", flush=True)
        if not equal:
            raise SystemExit(f"form {f!r} computes something else; not timed")

    def step_of(low):
        def step():
            o, l_, a = low.forward(q, k, v)
            low.backward(dout, None, q, k, v, o, l_, a)
        return step

    steps = {f: step_of(low) for f, low in lows.items()}
    for step in steps.values():
        step()  # compile outside the timing
    times = {f: [] for f in forms}
    for i in range(args.rounds):
        order = rotated(forms, i)
        states = {}
        for f in order:
            torch.cuda.synchronize()
            if args.sustained:
                ms, states[f] = sustained_ms(steps[f], *args.sustained)
                times[f].append(ms)
                continue
            time.sleep(args.idle)
            states[f] = gpu_state()
            # bench_triton.bench's settings, as the target rounds use
            times[f].append(do_bench(steps[f], warmup=10, rep=60, return_mode="median"))
        print(f"round {i}: " + "; ".join(f"[{forms.index(f)}] {times[f][-1]:.3f} ms ({states[f]})" for f in order),
              flush=True)
    base_ts = times[forms[0]]
    how = (f"{args.sustained[0]:g} s of steps untimed, then {args.sustained[1]:g} s timed, per form" if args.sustained
           else f"{args.idle:g} s idle before each form")
    print(f"\n{torch.cuda.get_device_name()}: {args.experiment}, four-branch grouped N=64K, bf16, H={H}, D={D}, "
          f"fwd+bwd of the lowering; {args.rounds} rounds, order rotated, {how}")
    print("| form | median ms | min | max | median of the rounds' ratios lowering/form | rounds the form is faster |"
          " rounds |")
    print("|---|---|---|---|---|---|---|")
    for f in forms:
        ts = times[f]
        ratios = [b / t for b, t in zip(base_ts, ts)]
        faster = sum(r > 1 for r in ratios)
        print(f"| [{forms.index(f)}] {f} | {statistics.median(ts):.3f} | {min(ts):.3f} | {max(ts):.3f} | "
              f"{statistics.median(ratios):.4f}x | {faster} of {len(ts)} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
