"""Does one fwd+bwd step of the compiled module make the host wait for the GPU? Runs a step under
torch.cuda.set_sync_debug_mode("warn") (which reports synchronizing calls with their stack) and lists the CUDA
runtime calls of a few steps from torch.profiler (synchronize, malloc, free) with their host time.

    PYTHONPATH=. python benchmarks/host_sync_check.py [--N 16384]
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=16384)
    args = ap.parse_args()
    *_, step = bt.module_step(args.N)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    torch.cuda.set_sync_debug_mode(0)
    print(f"synchronizing calls reported in one step: {len(caught)}")
    for w in caught[:5]:
        print("  ", str(w.message)[:300])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    calls = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.name.startswith("cuda") or e.name.startswith("cu"):
            calls[e.name][0] += 1
            calls[e.name][1] += e.cpu_time_total
    print("CUDA runtime calls over 5 steps (count, host ms):")
    for name, (n, us) in sorted(calls.items(), key=lambda x: -x[1][1]):
        print(f"  {name}: {n}, {us / 1e3:.3f}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
