"""Does one fwd+bwd step of the compiled module make the host wait for the GPU? Runs a step under
torch.cuda.set_sync_debug_mode("warn") (which reports synchronizing calls with their stack) and lists the CUDA
runtime calls of a few steps from torch.profiler (synchronize, malloc, free) with their host time.

    PYTHONPATH=. python benchmarks/host_sync_check.py [--N 16384]
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from dilated_compiler import AttentionSpec, Branch, compile_attention

FOUR = ((2048, 1), (4096, 2), (8192, 4), (16384, 8))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=16384)
    args = ap.parse_args()
    attn = compile_attention(AttentionSpec(tuple(Branch(w, r) for w, r in FOUR)), backend="triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, args.N, 16, 128, device="cuda", dtype=torch.bfloat16,
                           generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn_like(q)

    def step():
        attn(q, k, v).backward(dout)
        for t in (q, k, v):
            t.grad = None
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
