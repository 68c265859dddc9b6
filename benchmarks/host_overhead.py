"""Host (CPU) time per call of the compiled module: how long Python takes to enqueue one forward and one
fwd+bwd step, measured where the GPU work is small, and where that time goes (cProfile).

At small N the step is bound by this time rather than by the kernels, so it sets the floor of what
``bench_triton.py`` can measure there.

    PYTHONPATH=. python benchmarks/host_overhead.py [--N 16384] [--calls 200]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402


def host_ms(fn, calls):
    """Mean wall time per call with the GPU queue kept short (a synchronize every 10 calls), after 3 calls not
    timed (a first call's one-time costs, such as the custom op's first dispatch importing torch._dynamo)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    total = 0.0
    for i in range(calls):
        t = time.perf_counter()
        fn()
        total += time.perf_counter() - t
        if i % 10 == 9:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return total / calls * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    attn, q, k, v, dout, step = bt.module_step(args.N)

    def fwd():
        with torch.no_grad():
            attn(q, k, v)
    for _ in range(5):
        fwd()
        step()
    print(f"{torch.cuda.get_device_name()}: host time per call, four-branch grouped N={args.N}, H=16, D=128, bf16")
    print(f"forward: {host_ms(fwd, args.calls):.3f} ms; fwd+bwd: {host_ms(step, args.calls):.3f} ms")
    # the pieces, each timed alone (host time per call)
    from dilated_compiler.runtime.cache import lowered
    low = lowered(attn.spec_key, "triton", q.shape, 16, q.dtype, q.device)
    out, lse, aux = low.forward(q, k, v)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    ld = torch.empty((2, *lse.shape), dtype=torch.float32, device="cuda")
    pieces = {
        "torch.zeros(1, uint8)": lambda: torch.zeros(1, dtype=torch.uint8, device="cuda"),
        "torch.empty_like(q)": lambda: torch.empty_like(q),
        "lowering.forward": lambda: low.forward(q, k, v),
        "lowering.backward": lambda: low.backward(dout, None, q, k, v, out, lse, aux),
        "op attention (custom op, no autograd)": lambda: torch.ops.dilated_compiler.attention(
            q.detach(), k.detach(), v.detach(), None, attn.spec_key, "triton"),
        "op attention_backward (custom op)": lambda: torch.ops.dilated_compiler.attention_backward(
            dout, None, q.detach(), k.detach(), v.detach(), out, lse, aux, None, attn.spec_key, "triton"),
        "launch gluon_fwd": lambda: low._launch_gluon_fwd(q, k, v, out, lse, True),
        "launch gluon_bwd_dq": lambda: low._launch_gluon_dq(q, k, v, dout, out, dq, ld[0], ld[1], None, True),
        "launch gluon_bwd_dkdv": lambda: low._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True),
    }
    for name, fn in pieces.items():
        print(f"  {name}: {host_ms(fn, args.calls):.3f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
