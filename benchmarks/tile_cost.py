"""Where the forward's cost per query tile comes from: 64K specs that differ in key steps per tile (segment length)
or in row stride (dilation), this project against SDPA over pre-gathered segments in one run, and (``--power``)
the SM clock and power each forward runs at (GPU; bench_triton.py's `run_case`, power_check.py's `sample`).

Why: the four-branch 64K forward runs at about 593 useful TFLOP/s and one dense 16K segment at 721 on the same
kernel (H100, stop 32), which fits a cost of about 5 us per query tile of 16 key steps. Stop 33
(`experiments/gluon_q2_experiment.py`) found it is neither the next tile's Q copy nor the zero fill. The cases:

    w = 65536, 16384, 2048 at r = 1     key steps per tile 512, 128, 16; rows contiguous
    w = 4096 r = 2, w = 16384 r = 8     16 key steps per tile, as w = 2048 r = 1; rows strided by r
    the four-branch pattern             16 key steps per tile; r = 1, 2, 4, 8

If w = 2048 r = 1 runs at the long segments' rate, the cost comes with dilation's strided rows; if at the
four-branch rate, with short segments (pre-gathered SDPA shows how cuDNN fares on the same segments). Short
segments also mean more HBM traffic per product (Q and out once per 16 key steps); every step runs at the GPU's
power limit, so ``--power`` samples the clock: the same TFLOP/s per GHz across the cases means the difference is
energy (the clock), a lower one means the kernel's schedule. ``--kernels`` profiles each case's fwd+bwd step and
prints each Gluon kernel's time and rate per matrix product, so the backward kernels' cost per tile shows too.

    PYTHONPATH=. DILATED_COMPILER_AUTOTUNE=0 python benchmarks/tile_cost.py [--power 4] [--kernels 10]
    PYTHONPATH=. python benchmarks/tile_cost.py --list      # the cases' tiles and FLOPs, no GPU needed
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_triton as bt  # noqa: E402
import wave_model  # noqa: E402

from dilated_compiler import build_plan, compile_attention  # noqa: E402
from dilated_compiler.lowering.triton.gluon_hopper import BLOCK_M, BLOCK_N  # noqa: E402

N, D = 65536, 128
CASES = (((65536, 1),), ((16384, 1),), ((2048, 1),), ((4096, 2),), ((16384, 8),), bt.FOUR)


def label(pairs) -> str:
    return "four-branch" if tuple(pairs) == tuple(bt.FOUR) else " + ".join(f"w={w} r={r}" for w, r in pairs)


def describe(pairs, sms: int = 132) -> str:
    """The case's query tiles, key steps per tile and the forward's busy fraction on ``sms`` SMs (from the tables
    the lowering builds: wave_model.busy_fraction), and its useful forward FLOPs (from the plan)."""
    spec = bt.spec_for(pairs, "grouped", False)
    plan = build_plan(spec, N, bt.H, D)
    tiles, busy = wave_model.busy_fraction(spec, N, bt.H, D, "q", BLOCK_M, BLOCK_N, sms)
    steps = "/".join(str(s) for s in sorted({w // r // BLOCK_N for w, r in pairs}))
    return (f"{label(pairs)}: {tiles} query tiles of {steps} key steps, busy fraction {busy:.3f} on {sms} SMs, "
            f"{float(plan.flops) / 1e12:.3f} TFLOP fwd")


def power(seconds: float) -> None:
    """Each case's forward back to back for ``seconds``: ms, useful TFLOP/s, SM clock, power, TFLOP/s per GHz."""
    import power_check
    bt.emit("\n| case | fwd ms | TFLOP/s | SM clock MHz (median, min) | power W (median, max) | TFLOP/s per GHz |")
    bt.emit("|---|---|---|---|---|---|")
    for pairs in CASES:
        spec = bt.spec_for(pairs, "grouped", False)
        flops = float(build_plan(spec, N, bt.H, D).flops)
        attn = compile_attention(spec, backend="triton")
        q, k, v = bt.inputs(N, D, torch.bfloat16, grad=False)
        with torch.no_grad():
            attn(q, k, v)
            torch.cuda.synchronize()
            n, dt, clocks, watts = power_check.sample(lambda: attn(q, k, v), seconds)
        ms = dt / n * 1e3
        tf = flops / (ms * 1e-3) / 1e12
        clock = statistics.median(clocks)
        bt.emit(f"| {label(pairs)} | {ms:.3f} | {tf:.0f} | {clock:.0f}, {min(clocks):.0f} | "
                f"{statistics.median(watts):.0f}, {max(watts):.0f} | {tf / (clock / 1e3):.0f} |")
        del q, k, v
        torch.cuda.empty_cache()


# matrix products per block pair in each Gluon kernel (S and P V; S, dP and dS K; S^T, dP^T, P^T dO and dS^T Q)
PRODUCTS = {"gluon_fwd": 2, "gluon_bwd_dq": 3, "gluon_bwd_dkdv": 4}


def kernels(steps: int) -> None:
    """Each case's fwd+bwd kernels from torch.profiler, median over ``steps`` steps: us and TFLOP/s per product
    (the products each kernel runs, useful or recomputed), so each backward kernel's cost per tile shows."""
    from torch.profiler import ProfilerActivity, profile
    bt.emit("\n| case | kernel | us (median) | products | TFLOP/s of products |")
    bt.emit("|---|---|---|---|---|")
    for pairs in CASES:
        spec = bt.spec_for(pairs, "grouped", False)
        product = float(build_plan(spec, N, bt.H, D).flops) / 2   # one (rows x keys x D) product's FLOPs
        attn, q, k, v, dout, step = bt.module_step(N, pairs=pairs)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        times: dict[str, list[float]] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                name = next((n for n in PRODUCTS if e.name.startswith(n)), None)
                if name is not None:
                    times.setdefault(name, []).append(e.time_range.elapsed_us())
        for name, n in PRODUCTS.items():
            if name not in times:
                bt.emit(f"| {label(pairs)} | {name} | not launched | {n} | - |")
                continue
            us = statistics.median(times[name])
            bt.emit(f"| {label(pairs)} | {name} | {us:.1f} | {n} | {n * product / (us * 1e-6) / 1e12:.0f} |")
        del attn, q, k, v, dout, step
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--list", action="store_true", help="print the cases (no GPU)")
    ap.add_argument("--power", type=float, default=0.0, metavar="SECONDS",
                    help="also run each case's forward back to back this long, sampling clock and power")
    ap.add_argument("--kernels", type=int, default=0, metavar="STEPS",
                    help="first profile this many fwd+bwd steps per case: each Gluon kernel's time and product rate")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
    for pairs in CASES:
        print(describe(pairs, sms), flush=True)
    if args.list:
        return
    if not torch.cuda.is_available():
        raise SystemExit("tile_cost.py times kernels on a CUDA GPU; --list runs anywhere")
    bt.emit(f"\n{torch.cuda.get_device_name()}: grouped N=64K, bf16, H={bt.H}, D={D}")
    if args.kernels > 0:   # first: the shortest part, and the one that covers the backward kernels
        kernels(args.kernels)
    bt.emit("\ncells: time (useful TFLOP/s)\n| case | mode | N | D | dtype | pass | results | ratios |")
    bt.emit("|---|---|---|---|---|---|---|---|")
    for pairs in CASES:
        bt.run_case(label(pairs), pairs, "grouped", False, N, D, torch.bfloat16, others=("pregathered",))
    if args.power > 0:
        power(args.power)


if __name__ == "__main__":
    main()
