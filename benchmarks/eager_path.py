"""The module's plain eager path (runtime.op.EagerAttention) against the custom op ``dilated_compiler::attention``
forced (``runtime.op.eager_ok`` patched to refuse), with SDPA over pre-gathered segments beside them: four-branch
grouped, bf16, 16 heads, D = 128. Per N: do_bench medians of forward and fwd+bwd over alternating rounds, and the
host time per call (benchmarks/host_overhead.py's host_ms).

Why: both paths launch the same kernels, but the custom op's dispatch and autograd wrapping cost host time, and
below about 16K tokens a step is as long as its host time.

    PYTHONPATH=. python benchmarks/eager_path.py [--N 8192 16384 65536] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402
from host_overhead import host_ms  # noqa: E402

from dilated_compiler.runtime import op as rt_op  # noqa: E402

FORMS = ("eager", "custom op", "pregathered")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, nargs="+", default=[8192, 16384, 65536])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    eager_ok = rt_op.eager_ok
    spec = bt.spec_for(bt.FOUR, "grouped", False)
    print(f"{torch.cuda.get_device_name()}: four-branch grouped, bf16, H=16, D=128; ms, median of {args.rounds} "
          f"alternating rounds (do_bench medians); host: Python's time per call")
    print("| N | form | fwd | fwd+bwd | host fwd | host fwd+bwd | fwd+bwd / eager |\n|---|---|---|---|---|---|---|")
    for N in args.N:
        attn, q, k, v, dout, step = bt.module_step(N)

        def fwd():
            with torch.no_grad():
                attn(q, k, v)
        tensors, douts = bt.pregathered_inputs(spec, N, 128, torch.bfloat16)
        sdpa = bt.pregathered_forward(tensors)

        def sdpa_fwd():
            with torch.no_grad():
                sdpa()
        fns = {"eager": (fwd, step), "custom op": (fwd, step),
               "pregathered": (sdpa_fwd, bt.fwd_bwd(sdpa, [x for t in tensors for x in t], douts))}
        times = {form: [] for form in FORMS}
        host = {}
        try:
            for r in range(args.rounds + 1):    # the last round: host time
                for form in FORMS:
                    rt_op.eager_ok = (lambda *t: False) if form == "custom op" else eager_ok
                    f, s = fns[form]
                    if r < args.rounds:
                        times[form].append((bt.bench(f), bt.bench(s)))
                    else:
                        host[form] = (host_ms(f, 200), host_ms(s, 200))
        finally:
            rt_op.eager_ok = eager_ok
        med = {form: [sorted(x[i] for x in times[form])[len(times[form]) // 2] for i in (0, 1)] for form in FORMS}
        for form in FORMS:
            (f, s), (hf, hs) = med[form], host[form]
            print(f"| {N} | {form} | {f:.3f} | {s:.3f} | {hf:.3f} | {hs:.3f} | {s / med['eager'][1]:.2f}x |")
        del attn, q, k, v, dout, tensors, douts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
