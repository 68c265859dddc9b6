"""The issue's main case, measured over several rounds: four-branch grouped N = 64K (bf16, 16 heads, D = 128,
batch 1), fwd and fwd+bwd of this project, the naive gather + SDPA + scatter, and SDPA over pre-gathered segments,
the three taken in turn within every round (bench_triton.py's timing functions), so that each round's ratios
compare measurements made a few seconds apart.

Why: one bench_triton run gives one number per case, and on the H100 the same fwd+bwd read 3.56 and 3.81 ms in one
run (benchmarks/results/H100-triton.md, stop 12); the target is 3.55 ms. This prints every round and the median.

    PYTHONPATH=. python benchmarks/target_rounds.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402

from dilated_compiler import build_plan, compile_attention  # noqa: E402

N, D = 65536, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    spec = bt.spec_for(bt.FOUR, "grouped", False)
    plan = build_plan(spec, N, bt.H, D)
    flops = {"fwd": float(plan.flops), "fwd+bwd": float(plan.flops + plan.flops_backward)}
    attn = compile_attention(spec, backend="triton")
    forms = {
        "triton": lambda: bt.time_module(attn, N, D, torch.bfloat16),
        "naive": lambda: bt.time_naive(spec, N, D, torch.bfloat16),
        "pregathered": lambda: bt.time_pregathered(spec, N, D, torch.bfloat16),
    }
    times = {(f, p): [] for f in forms for p in flops}
    for i in range(args.rounds):
        row = {}
        for form, fn in forms.items():
            fwd, fb = fn()
            times[(form, "fwd")].append(fwd)
            times[(form, "fwd+bwd")].append(fb)
            row[form] = (fwd, fb)
            torch.cuda.empty_cache()
        t = row["triton"]
        print(f"round {i}: " + "; ".join(f"{f} {a:.3f} / {b:.3f} ms" for f, (a, b) in row.items())
              + f"; fwd+bwd naive/triton {row['naive'][1] / t[1]:.2f}x, pregathered/triton "
              f"{row['pregathered'][1] / t[1]:.2f}x", flush=True)
    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N=64K, bf16, H={bt.H}, D={D}; {args.rounds} rounds, "
          "the three forms in turn within each")
    print("| pass | form | median ms | min | max | TFLOP/s (median) | median ratio form/triton | rounds |")
    print("|---|---|---|---|---|---|---|---|")
    for p in flops:
        tri = times[("triton", p)]
        for form in forms:
            ts = times[(form, p)]
            med = statistics.median(ts)
            rat = statistics.median(a / b for a, b in zip(ts, tri))
            print(f"| {p} | {form} | {med:.3f} | {min(ts):.3f} | {max(ts):.3f} | {flops[p] / med / 1e9:.0f} | "
                  f"{rat:.3f}x | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
