"""Experiment: does the dk/dv launch gain from starting on the SMs that the dq launch's last wave leaves idle?

Why: the Gluon kernels are persistent, one program per SM walking tiles of equal work, so a pass whose tile count is
not a multiple of the SM count ends in a partial wave. At the main case (four-branch grouped, 64K, 16 heads) each
pass has 3840 tiles: 29.09 waves on 132 SMs, so for the last of the 30 tile times 120 SMs idle while 12 finish
(``benchmarks/wave_model.py``: 97% busy; at 16K, 960 tiles, 7.27 waves, 91%). In grouped mode the backward is two
launches, dq then dk/dv, and dk/dv needs only dq's delta, which a dq tile writes before its key loop. With
programmatic dependent launch (``launch_pdl``; [Note: overlap] in ``gluon_hopper``) the dk/dv programs start as dq's
programs end: dq signals ``griddepcontrol.launch_dependents`` as it starts, each dq consumer arrives on a counter once
it has written its last tile's delta, and each dk/dv program waits for all arrivals before its warps start, and for
dq's whole grid (``griddepcontrol.wait``) before it ends. The dq tail (about one dq tile time, some 40 us of 1.2 ms at
64K) then runs beside dk/dv's first tiles. Estimate: about 1% of the 64K fwd+bwd step, 3% at 16K.

Forms: [0] the lowering (``gluon_hopper.BWD_OVERLAP`` on), [1] the two launches one after the other (off). Same
kernels and arithmetic: dq, dk and dv must be bitwise equal, which the script checks first (outputs poisoned with
NaN) for each case. Then it times the lowering's backward and forward + backward (``TritonLowering.forward`` /
``backward``, no autograd) per case, the forms alternating over ROUNDS rounds (do_bench medians), and prints each
form's median and the median of the rounds' ratios serial / lowering (above 1: the overlap is faster).

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/bwd_overlap_experiment.py [--rounds 7]

``power_ab.py --experiment bwd_overlap_experiment --forms 0,1`` times the forms' 64K step as the target rounds do
(from a cool GPU, or ``--sustained``).

Answer (stop 49, H100, 4 rounds; benchmarks/results/H100-triton.md): yes, adopted (``BWD_OVERLAP`` on). The gradients
were bitwise equal in all four cases, and the overlapped backward was faster in every round of every case:

| N | causal | bwd: overlapped | serial | ratio | fwd+bwd: overlapped | serial | ratio |
|---|---|---|---|---|---|---|---|
| 16384 | no | 0.753 ms | 0.804 | 1.068x | 1.017 ms | 1.058 | 1.034x |
| 16384 | yes | 0.471 | 0.496 | 1.052x | 0.641 | 0.668 | 1.039x |
| 65536 | no | 2.824 | 2.906 | 1.027x | 3.734 | 3.983 | 1.057x |
| 65536 | yes | 1.711 | 1.733 | 1.008x | 2.295 | 2.339 | 1.019x |

The 64K fwd+bwd ratio is the noisiest (the serial form's rounds spread 3.78-4.25 ms). The 64K backward's 82 us is
about twice the estimate of one dq tile time (41 us); where the rest comes from was not measured.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

FORMS = ["lowering: dk/dv overlaps dq's last wave", "serial: BWD_OVERLAP off"]
H, D = 16, 128
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))


@contextlib.contextmanager
def overlap(on: bool):
    saved = gluon_hopper.BWD_OVERLAP
    gluon_hopper.BWD_OVERLAP = on
    try:
        yield
    finally:
        gluon_hopper.BWD_OVERLAP = saved


class _Serial:
    """A lowering whose backward runs dq and dk/dv one after the other."""

    def __init__(self, low):
        self._low = low

    def __getattr__(self, name):
        return getattr(self._low, name)

    def backward(self, *args, **kwargs):
        with overlap(False):
            return self._low.backward(*args, **kwargs)


def variant(low, form: str):
    """``low`` as form ``form`` of FORMS runs it (power_ab.py's hook)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {FORMS}")
    return low if form == FORMS[0] else _Serial(low)


def run_case(N: int, causal: bool, rounds: int) -> None:
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    spec = AttentionSpec(FOUR, causal=causal)
    low = tl_lowering.TritonLowering(build_plan(spec, N, H, D), dev, torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    assert low.gluon_unsupported(q, k, v, False) is None
    out, lse, aux = low.forward(q, k, v)
    forms = {f: variant(low, f) for f in FORMS}
    # poisoned outputs: a row either form leaves unwritten reads NaN and fails the comparison
    real = tl_lowering._uninitialized
    tl_lowering._uninitialized = lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                         device=device)
    try:
        grads = {f: form.backward(dout, None, q, k, v, out, lse, aux) for f, form in forms.items()}
    finally:
        tl_lowering._uninitialized = real
    equal = all(torch.equal(a, b) for a, b in zip(*grads.values()))
    print(f"N={N} causal={causal}: dq, dk, dv bitwise equal between the forms: {equal}", flush=True)
    if not equal:
        raise SystemExit("the forms compute different gradients; not timed")

    def bwd(form):
        return lambda: form.backward(dout, None, q, k, v, out, lse, aux)

    def step(form):
        def run():
            o, l_, a = form.forward(q, k, v)
            form.backward(dout, None, q, k, v, o, l_, a)
        return run
    for what, make in (("bwd", bwd), ("fwd+bwd", step)):
        fns = {f: make(form) for f, form in forms.items()}
        for fn in fns.values():
            fn()
        times = {f: [] for f in FORMS}
        for i in range(rounds):
            for f in (FORMS if i % 2 == 0 else FORMS[::-1]):
                times[f].append(do_bench(fns[f], warmup=10, rep=60, return_mode="median"))
        ratios = [s / o for o, s in zip(*times.values())]
        print(f"| {N} | {causal} | {what} | {statistics.median(times[FORMS[0]]):.3f} | "
              f"{statistics.median(times[FORMS[1]]):.3f} | {statistics.median(ratios):.4f}x | "
              f"{sum(r > 1 for r in ratios)} of {rounds} | {', '.join(f'{t:.3f}' for t in times[FORMS[0]])} | "
              f"{', '.join(f'{t:.3f}' for t in times[FORMS[1]])} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}: four-branch grouped, bf16, H={H}, D={D}, batch 1; the lowering's "
          f"passes (no autograd), forms alternating over {args.rounds} rounds (do_bench medians, ms)")
    print("| N | causal | pass | overlapped | serial | median ratio serial/overlapped | rounds overlapped faster |"
          " overlapped rounds | serial rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for N in args.seq_lens:
        for causal in args.causal:
            run_case(N, bool(causal), args.rounds)


if __name__ == "__main__":
    main()
