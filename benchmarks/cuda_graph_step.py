"""A fwd+bwd step of the compiled module, eager against replayed from a CUDA graph (captured after a warm-up),
four-branch grouped, bf16, 16 heads, D = 128, with SDPA over pre-gathered segments (eager, as bench_triton.py
times it) beside them.

Why: at 16K the eager step is bound by host time (benchmarks/host_overhead.py: about 1 ms of Python per step),
so bench_triton.py's 16K rows measure the host as much as the kernels. A graph replay leaves only the GPU's time.

    PYTHONPATH=. python benchmarks/cuda_graph_step.py [--N 16384 65536]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402


def graph_of(step):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, nargs="+", default=[16384, 65536])
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}: fwd+bwd step, four-branch grouped, bf16, H={bt.H}, D=128; do_bench median")
    print("| N | eager ms | CUDA graph ms | eager / graph | pre-gathered (eager) ms | pre-gathered / graph |")
    print("|---|---|---|---|---|---|")
    for N in args.N:
        attn, q, k, v, dout, _ = bt.module_step(N)

        def step():
            out = attn(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)
        eager = do_bench(step, warmup=10, rep=200, return_mode="median")
        graph = graph_of(step)
        replay = do_bench(graph.replay, warmup=10, rep=200, return_mode="median")
        del graph
        _, pre = bt.time_pregathered(bt.spec_for(bt.FOUR, "grouped", False), N, 128, torch.bfloat16)
        print(f"| {N} | {eager:.3f} | {replay:.3f} | {eager / replay:.2f}x | {pre:.3f} | {pre / replay:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
