"""Experiment: the order of the generated tl kernels' tile tables on causal patterns (four-branch, N = 64K, bf16,
16 heads, D = 128): "all" mode, and grouped mode with the Gluon kernels turned off.

Why: the Gluon kernels' causal passes were bound by memory bandwidth because tile_table orders tiles heaviest
first, and in a causal table tiles of equal work come from different segments, so tiles running at the same time
read different segments' keys (benchmarks/experiments/gluon_order_experiment.py: persistent_order took the causal Gluon
forward from 0.851 to 0.525 ms). The tl kernels launch one program per table row, and the GPU starts programs
about in row order, so the same should hold for them ("all causal" fwd+bwd ran at 0.41x cuDNN over pre-gathered
segments).

Forms:
- "heaviest first": tile_table's order before this experiment (single tiles heaviest first).
- "segments": the tiles of one (segment, head) adjacent, heaviest first within it; the (segment, head) groups
  heaviest first overall (stable, so in plan order among equals). Its partners stay in L2 while the group runs,
  and the light tiles still come last. (tile_table's order since this experiment; the script rebuilds the old
  order from it.)

Same tiles, so outputs must be equal (the backward's atomics in "all" mode add in another order: compared with a
tolerance there). Times alternate between the forms over --rounds rounds.

Result (H100, best of 3 alternating rounds; benchmarks/results/H100-triton.md): "all causal" fwd 3.813 -> 3.092
ms, fwd+bwd 21.083 -> 17.673; grouped causal on the tl kernels fwd 0.971 -> 0.765, fwd+bwd 3.970 -> 3.114. Outputs
equal in grouped mode; in "all" mode within 3.1e-4 relative (the backward's fp32 atomics add in another order).

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/tl_order_experiment.py [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton import tables

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))


def heaviest_first(plan, kind, block, partner_block):
    """The order tile_table had before this experiment: single tiles heaviest first, then plan order."""
    t = tables.tile_table(plan, kind, block, partner_block)
    x = t.to(torch.int64)
    order = torch.arange(t.shape[0])
    # least significant first: row0, head, segment start, branch, work (desc)
    for key, desc in ((x[:, 4], False), (x[:, 0], False), (x[:, 2], False), (x[:, 1], False),
                      (x[:, 8] - x[:, 5], True)):
        order = order[torch.sort(key[order], descending=desc, stable=True).indices]
    return t[order].contiguous()


segments_first = tables.tile_table  # tile_table's order since this experiment


def main():
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tl_lowering.USE_GLUON = False
    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for label, spec in (("all causal", AttentionSpec(FOUR, head_assignment="all", causal=True)),
                        ("grouped causal, tl", AttentionSpec(FOUR, causal=True))):
        plan = build_plan(spec, N, H, D)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        lows = {}
        for form, fn in (("heaviest first", heaviest_first), ("segments", segments_first)):
            tl_lowering.tile_table = fn
            low = tl_lowering.TritonLowering(plan, dev, torch.bfloat16)
            out, lse, aux = low.forward(q, k, v)  # builds and caches its tables with this order
            grads = low.backward(dout, None, q, k, v, out, lse, aux)
            torch.cuda.synchronize()
            lows[form] = (low, (out, lse) + tuple(grads))
        tl_lowering.tile_table = tables.tile_table
        ref = lows["heaviest first"][1]
        for form, (low, res) in lows.items():
            diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))
                       for a, b in zip(res, ref) if b.isfinite().all())
            lows[form] = (low, diff)
        times = {(f, p): [] for f in lows for p in ("fwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for form, (low, _) in lows.items():
                def fwd(low=low):
                    return low.forward(q, k, v)

                def step(low=low):
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(form, "fwd")].append(do_bench(fwd, warmup=5, rep=100, return_mode="median"))
                times[(form, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (form, p), ts in times.items():
            flops = plan.flops + (plan.flops_backward if p == "fwd+bwd" else 0)
            ms = min(ts)
            rows.append((label, p, form, ms, float(flops) / ms / 1e9, lows[form][1], ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, lows, ref
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: four-branch N=64K, bf16, H={H}, D={D}, tl kernels; best of "
          f"{args.rounds} alternating rounds")
    print("| case | pass | table order | ms | TFLOP/s (useful) | max rel. difference to heaviest first | rounds |")
    print("|---|---|---|---|---|---|---|")
    for case, p, form, ms, tflops, diff, ts in rows:
        print(f"| {case} | {p} | {form} | {ms:.3f} | {tflops:.0f} | {diff:.1e} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
