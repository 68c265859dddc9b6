"""The 16K fwd+bwd step read several times in a row, eager and from a CUDA graph, with pre-gathered cuDNN beside it,
and the host's time per step: does the eager reading move from run to run, and is the host the cause?

Why: the four-branch grouped 16K fwd+bwd reading moved between 1.058 and 1.359 ms across runs on H200s while
pre-gathered cuDNN stayed within 2% (benchmarks/results/H200-triton.md, stop 24).

    PYTHONPATH=. python benchmarks/step_variance.py [--N 16384] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402
from cuda_graph_step import graph_of  # noqa: E402
from host_overhead import host_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    attn, q, k, v, dout, step = bt.module_step(args.N)
    for _ in range(5):
        step()
    graph = graph_of(step)
    spec = bt.spec_for(bt.FOUR, "grouped", False)
    print(f"{torch.cuda.get_device_name()}: four-branch grouped N={args.N}, bf16, H={bt.H}, D=128; ms per fwd+bwd step")
    print("| round | eager (do_bench) | CUDA graph (do_bench) | pre-gathered (bench_triton) | host ms per eager step "
          "| eager, back to back (no L2 flush) |")
    print("|---|---|---|---|---|---|")
    for i in range(args.rounds):
        eager = do_bench(step, warmup=10, rep=60, return_mode="median")
        replay = do_bench(graph.replay, warmup=10, rep=60, return_mode="median")
        pre = bt.time_pregathered(spec, args.N, 128, torch.bfloat16)[1]
        host = host_ms(step, 100)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(100):
            step()
        torch.cuda.synchronize()
        loop = (time.perf_counter() - t) * 10
        print(f"| {i} | {eager:.3f} | {replay:.3f} | {pre:.3f} | {host:.3f} | {loop:.3f} |", flush=True)


if __name__ == "__main__":
    main()
