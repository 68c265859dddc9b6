"""The GPU work of one fwd+bwd step of the compiled module, kernel by kernel, from torch.profiler: each kernel's
start (relative to the step's first), duration and the idle gap before it, so that time spent outside the
attention kernels (copies, memsets, launch gaps) shows up.

    PYTHONPATH=. python benchmarks/trace_step.py [--N 65536] [--causal] [--mode grouped|all] [--steps 5] [--hot 3]

Prints the last step's kernels and, over all steps, the step span against the sum of kernel times. ``--hot``
then runs the step back to back for that many seconds, as a benchmark's repetitions do (the GPU at its power
limit lowers its SM clock), sampling clock and power (`power_check.py`), and traces again, steps back to back
and then synchronised apart: the same kernels' times hot against cold tell the clock's share of a step's time from
the work outside the kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402


def trace(step, n: int, first: str | None = None):
    """``n`` steps under torch.profiler: each step's GPU activities in start order. Without ``first`` the steps
    run synchronised apart and split at gaps longer than 50 us; with it they run back to back (as a benchmark's
    repetitions do) and a step begins at each kernel of that name."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
            if first is None:
                torch.cuda.synchronize()  # steps apart, so each one's span is its own
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    steps, cur = [], []
    for e in kernels:
        if cur and (e.name == first if first else e.time_range.start - cur[-1].time_range.end > 50):
            steps.append(cur)
            cur = []
        cur.append(e)
    steps.append(cur)
    return steps


def report(steps) -> None:
    last = steps[-1]
    t0 = last[0].time_range.start
    print("| kernel | start us | us | gap before us |")
    print("|---|---|---|---|")
    prev_end = t0
    for e in last:
        print(f"| {e.name[:70]} | {e.time_range.start - t0:.1f} | {e.time_range.elapsed_us():.1f} | "
              f"{max(0, e.time_range.start - prev_end):.1f} |")
        prev_end = max(prev_end, e.time_range.end)
    for i, s in enumerate(steps):
        span = s[-1].time_range.end - s[0].time_range.start
        busy = sum(e.time_range.elapsed_us() for e in s)
        print(f"step {i}: span {span / 1e3:.3f} ms, kernels {busy / 1e3:.3f} ms, {len(s)} kernels", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--mode", choices=("grouped", "all"), default="grouped")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--hot", type=float, default=0.0, metavar="SECONDS",
                    help="then run the step back to back this long and trace again")
    args = ap.parse_args()
    *_, step = bt.module_step(args.N, args.heads, args.causal, args.mode)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    steps = trace(step, args.steps)
    print(f"{torch.cuda.get_device_name()}: fwd+bwd step, four-branch {args.mode}{' causal' if args.causal else ''}, "
          f"N={args.N}, H={args.heads}, D=128, bf16; {len(steps)} steps found")
    report(steps)
    if args.hot > 0:
        import power_check
        first = steps[-1][0].name
        n, dt, clocks, watts = power_check.sample(step, args.hot)
        hot = trace(step, 4 * args.steps, first=first)[1:-1]   # the first and last may be cut
        apart = trace(step, args.steps)
        print(f"\nhot: after {n} steps back to back in {dt:.1f} s ({dt / n * 1e3:.3f} ms per step; SM clock median "
              f"{statistics.median(clocks):.0f} MHz, min {min(clocks):.0f}; power median "
              f"{statistics.median(watts):.0f} W, max {max(watts):.0f}); then {len(hot)} steps back to back (a step "
              f"begins at each {first}):")
        report(hot)
        print("\nthen steps synchronised apart:")
        report(apart)


if __name__ == "__main__":
    main()
