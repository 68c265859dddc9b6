"""GPU clock and power while one fwd+bwd step runs back to back for a few seconds: this project's four-branch grouped
N = 64K step (bf16, 16 heads, D = 128, batch 1) against SDPA over pre-gathered segments, in turn.

Why: over several rounds (target_rounds.py) the project's step read 3.70 ms in the first round and 3.83-3.91 ms
after, while the pre-gathered step stayed at 3.63-3.73 ms. The project's backward runs 7 matrix products per
(query, key) block (dq and dk/dv each recompute S and dP) against 5 in a fused backward, so it may be held back
by the power limit more. This samples nvidia-smi (SM clock, power) every 100 ms during each run.

    PYTHONPATH=. python benchmarks/power_check.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402

from dilated_compiler import compile_attention  # noqa: E402

N, D = 65536, 128


def steps():
    spec = bt.spec_for(bt.FOUR, "grouped", False)
    attn = compile_attention(spec, backend="triton")
    q, k, v = bt.inputs(N, D, torch.bfloat16)
    dout = torch.randn_like(q)

    def ours():
        q.grad = k.grad = v.grad = None
        attn(q, k, v).backward(dout)
    tensors, douts = bt.pregathered_inputs(spec, N, D, torch.bfloat16)
    fwd = bt.pregathered_forward(tensors)

    def pre():
        for t in tensors:
            for x in t:
                x.grad = None
        torch.autograd.backward(fwd(), douts)
    return {"triton": ours, "pregathered": pre}


def sample(fn, seconds: float):
    """``fn`` run back to back (20 calls between synchronisations) for ``seconds`` while nvidia-smi samples the SM
    clock and the power draw every 100 ms: (calls, wall seconds, clocks in MHz, power in W), the first three
    samples left out."""
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "100"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            fn()
        n += 20
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    smi.terminate()
    lines = [ln.split(",") for ln in smi.communicate()[0].splitlines() if ln.strip()]
    return n, dt, [float(a) for a, _ in lines[3:]], [float(b) for _, b in lines[3:]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--turns", type=int, default=2)
    args = ap.parse_args()
    forms = steps()
    for fn in forms.values():
        fn()
    torch.cuda.synchronize()
    print("| turn | form | steps | ms per step | SM clock MHz (median, min) | power W (median, max) |")
    print("|---|---|---|---|---|---|")
    for turn in range(args.turns):
        for name, fn in forms.items():
            n, dt, clocks, power = sample(fn, args.seconds)
            print(f"| {turn} | {name} | {n} | {dt / n * 1e3:.3f} | {statistics.median(clocks):.0f}, "
                  f"{min(clocks):.0f} | {statistics.median(power):.0f}, {max(power):.0f} |", flush=True)
            time.sleep(2)


if __name__ == "__main__":
    main()
