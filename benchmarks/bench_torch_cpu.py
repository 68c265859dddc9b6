"""CPU benchmark of the torch lowering against the naive gather + SDPA + scatter a user would write by hand,
and of the runtime's per-call overhead on a cache hit.

    python benchmarks/bench_torch_cpu.py [--quick]

Prints median times and the ratios. On a shared machine wall-clock time swings with other processes, so by
default the benchmark runs torch on one thread and measures that thread's CPU time (time.thread_time), with
the two sides interleaved; --wall measures wall-clock time with all threads instead.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dilated_compiler import AttentionSpec, Branch, build_plan, compile_attention, runtime


def naive(q, k, v, spec):
    """What a user writes by hand (grouped mode, N divisible by every segment length)."""
    B, N, H, D = q.shape
    out = torch.zeros_like(q)
    start = 0
    for i, b in enumerate(spec.branches):
        size = H // len(spec.branches) + (1 if i < H % len(spec.branches) else 0)
        w, r = b.segment_length, b.dilation
        off = i % r
        hs = slice(start, start + size)
        start += size

        def gather(x):
            return x[:, :, hs].reshape(B, N // w, w, size, D)[:, :, off::r].reshape(B * (N // w), -1, size, D).transpose(1, 2)

        y = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), is_causal=spec.causal)
        L = y.shape[2]
        out.view(B, N // w, w, H, D)[:, :, off::r, hs] = y.transpose(1, 2).reshape(B, N // w, L, size, D)
    return out


CLOCK = time.thread_time


def interleaved(fns, repeats, warmup=2):
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[name].append(CLOCK() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_case(label, spec, B, N, H, D, dtype, repeats):
    attn = compile_attention(spec, backend="torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
    torch.testing.assert_close(attn(q, k, v), naive(q, k, v, spec))  # same computation
    dout = torch.randn_like(q)

    def fwd(f):
        def run():
            with torch.no_grad():
                f(q, k, v)
        return run

    def fwd_bwd(f):
        def run():
            torch.autograd.grad(f(q, k, v), (q, k, v), dout)
        return run

    ours = lambda q, k, v: attn(q, k, v)  # noqa: E731
    theirs = lambda q, k, v: naive(q, k, v, spec)  # noqa: E731
    plan = build_plan(spec, N, H, D, batch=B)
    f = interleaved({"dilated-compiler": fwd(ours), "naive": fwd(theirs)}, repeats)
    fb = interleaved({"dilated-compiler": fwd_bwd(ours), "naive": fwd_bwd(theirs)}, repeats)
    flops_f, flops_fb = float(plan.flops), float(plan.flops + plan.flops_backward)
    print(f"\n{label}: B={B} N={N} H={H} D={D} {dtype}")
    print(f"  {'':18} {'fwd ms':>9} {'GFLOP/s':>9} {'fwd+bwd ms':>11} {'GFLOP/s':>9}")
    for name in f:
        print(f"  {name:18} {f[name]*1e3:9.2f} {flops_f/f[name]/1e9:9.1f} {fb[name]*1e3:11.2f} "
              f"{flops_fb/fb[name]/1e9:9.1f}")
    print(f"  speed-up vs naive: fwd {f['naive']/f['dilated-compiler']:.2f}x, "
          f"fwd+bwd {fb['naive']/fb['dilated-compiler']:.2f}x")
    return f["naive"] / f["dilated-compiler"], fb["naive"] / fb["dilated-compiler"]


def bench_overhead(repeats):
    """Per-call cost of the module + custom op + cache hit, against calling the lowered plan directly."""
    spec = AttentionSpec((Branch(16, 1), Branch(32, 2)))
    attn = compile_attention(spec, backend="torch")
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    attn(q, k, v)
    from dilated_compiler.runtime.cache import lowered
    direct = lowered(attn.spec_key, "torch", q.shape, 2, q.dtype, q.device)
    with torch.no_grad():
        t = interleaved({"module (cache hit)": lambda: attn(q, k, v),
                         "lowered plan directly": lambda: direct.forward(q, k, v)}, repeats * 20, warmup=20)
    over = (t["module (cache hit)"] - t["lowered plan directly"]) * 1e6
    print(f"\nper-call overhead (tiny shape 1x64x2x16, no grad): module {t['module (cache hit)']*1e6:.1f} us, "
          f"lowered plan directly {t['lowered plan directly']*1e6:.1f} us, overhead {over:.1f} us per call")
    print(f"cache: {runtime.cache_info()}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--wall", action="store_true", help="wall-clock time with torch's default thread count")
    args = p.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    else:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    repeats = args.repeats or (5 if args.quick else 15)
    n = 4096 if args.quick else 16384
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock: "
          f"{'wall' if args.wall else 'CPU time of the calling thread'}")
    old_default = AttentionSpec((Branch(n // 8, 1), Branch(n // 4, 2), Branch(n // 2, 4)), name="old-default/scaled")
    four = AttentionSpec((Branch(n // 16, 1), Branch(n // 8, 2), Branch(n // 4, 4), Branch(n // 2, 8)),
                         name="four-branch/scaled")
    causal = AttentionSpec(four.branches, causal=True, name="four-branch causal/scaled")
    results = [
        bench_case(old_default.name, old_default, 1, n, 8, 64, torch.float32, repeats),
        bench_case(four.name, four, 1, n, 8, 64, torch.float32, repeats),
        bench_case(causal.name, causal, 1, n, 8, 64, torch.float32, repeats),
        bench_case(four.name + " bf16", four, 1, n, 8, 64, torch.bfloat16, repeats),
    ]
    bench_overhead(repeats)
    worst_f = min(r[0] for r in results)
    worst_fb = min(r[1] for r in results)
    print(f"\nworst speed-up vs naive over all cases: fwd {worst_f:.2f}x, fwd+bwd {worst_fb:.2f}x (>= 1 means at "
          "least as fast)")


if __name__ == "__main__":
    main()
