"""Experiment (prepared, not yet run on a GPU): a Gluon forward pipelined across tiles, against the lowering's
gluon_fwd, on the four-branch grouped pattern at N = 64K (bf16, 16 heads), D = 128 and 64, causal and not.

Why: in gluon_fwd each consumer starts a tile with S_0 = Q K_0^T and its softmax with no product of its own in
flight, and ends it with the last P V and the epilogue, again alone; both consumers reach these points together
(they share the K/V ring), so the tensor cores wait at every tile change. A causal tile walks 1 to 16 key blocks,
so the causal forward pays this most: 0.850 ms, slower than the naive path (0.798 ms) and than cuDNN over
pre-gathered segments (0.554 ms) (benchmarks/results/H100-triton.md, stop 10).

gluon_fwd_xt (in dilated_compiler/lowering/triton/gluon_hopper.py; the lowering runs it where
gluon_hopper.FWD_XTILE is set, off until this experiment shows it correct and faster) continues the in-tile
order across tiles: at the end of tile i it issues S_0 of tile i+1 before
the last P V of tile i, and runs the next tile's first softmax while that product runs. For that, tile i+1's Q
must be in shared memory before tile i's is free, so Q has two buffers (q_ready / q_empty per buffer, tile i in
buffer i % 2), paid for with the 32 KB of the O staging buffers: out leaves by pointer stores from the
accumulator's registers (lse does already). Each consumer frees a Q buffer as soon as its tile's last S completes
(as EARLY_RELEASE does in gluon_fwd). Same arithmetic, tile for tile, so out and lse must be bitwise equal to
gluon_fwd's.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/gluon_fwd_xtile_experiment.py [--check-compile]

--check-compile compiles it for sm_90a without a GPU (needs triton 3.6) and counts spill instructions: none
among a step's matrix instructions in the four cases; causal at D = 128 has 24 elsewhere (the tile change).
"""

from __future__ import annotations

import argparse
import math

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, N = 16, 65536
FOUR = ((2048, 1), (4096, 2), (8192, 4), (16384, 8))

CASES = [(128, False), (128, True), (64, False), (64, True)]


def _consts(head_dim, causal, regs=gluon_hopper.CONSUMER_REGS):
    return dict(HEAD_DIM=head_dim, BLOCK_M=gluon_hopper.BLOCK_M, BLOCK_N=gluon_hopper.BLOCK_N,
                STAGES=gluon_hopper.FWD_STAGES[head_dim], ZFILL=True, CAUSAL=causal, CONSUMER_REGS=regs,
                num_warps=4)


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, summarize
    for head_dim, causal in CASES:
        spec = AttentionSpec(tuple(Branch(w, r) for w, r in FOUR), causal=causal)
        fn = tl_lowering.TritonLowering(build_plan(spec, N, H, head_dim), torch.device("cpu"),
                                        torch.bfloat16).gluon_kernels.gluon_fwd_xt
        label = f"gluon_fwd_xt D={head_dim} causal={causal}"
        try:
            print(f"{label}: {summarize(compile_sm90(fn, _consts(head_dim, causal)))}")
        except Exception as e:
            print(f"{label}: {type(e).__name__}: {str(e)[:2000]}")


def main():
    from triton.testing import do_bench
    rows = []
    for head_dim, causal in CASES:
        spec = AttentionSpec(tuple(Branch(w, r) for w, r in FOUR), causal=causal)
        plan = build_plan(spec, N, H, head_dim)
        low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, N, H, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        out, lse = torch.empty_like(q), torch.full((1, H, N), -math.inf, device="cuda")
        low._launch_gluon_fwd(q, k, v, out, lse, True, xtile=False)
        torch.cuda.synchronize()
        out_x, lse_x = torch.full_like(q, math.nan), torch.full_like(lse, -math.inf)

        def xt():
            low._launch_gluon_fwd(q, k, v, out_x, lse_x, True, xtile=True)
        case = f"D={head_dim} causal={causal}"
        try:
            xt()
            torch.cuda.synchronize()
            same = torch.equal(out_x, out) and torch.equal(lse_x, lse)
            if not same:
                same = (f"no: out max diff {float((out_x.float() - out.float()).abs().nan_to_num(1e9).max()):.2e}, "
                        f"lse equal {torch.equal(lse_x, lse)}")
        except Exception as e:
            same = f"{type(e).__name__}: {str(e)[:150]}"
        times = {"gluon_fwd": [], "gluon_fwd_xt": []}
        for _ in range(2):  # alternating, so drift falls on both
            times["gluon_fwd"].append(do_bench(lambda: low._launch_gluon_fwd(q, k, v, out, lse, True, xtile=False),
                                               warmup=10,
                                               rep=60, return_mode="median"))
            if same is True:
                times["gluon_fwd_xt"].append(do_bench(xt, warmup=10, rep=60, return_mode="median"))
        for name, ts in times.items():
            ms = min(ts) if ts else math.nan
            rows.append((case, name, ms, float(plan.flops) / ms / 1e9, same if name == "gluon_fwd_xt" else "-", ts))
            print(rows[-1], flush=True)
        del q, k, v, out, lse, out_x, lse_x
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N=64K, bf16, H={H}; best of 2 alternating rounds")
    print("| case | kernel | ms | TFLOP/s (useful) | bitwise equal to gluon_fwd | rounds |")
    print("|---|---|---|---|---|---|")
    for case, name, ms, tflops, same, ts in rows:
        print(f"| {case} | {name} | {ms:.3f} | {tflops:.0f} | {same} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-compile", action="store_true")
    if ap.parse_args().check_compile:
        check_compile()
    else:
        main()
