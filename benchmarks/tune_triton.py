"""Time the Triton kernels' variants one pass at a time, on one GPU, in one run (for choosing tile configs and
kernel paths; bench_triton.py measures what users get).

Per pass (forward, dk/dv, dq) of the four-branch grouped pattern at N = 64K, and the forward of a dense 16K
segment (bf16, 16 heads, head_dim 128): kernel time for each tile config, with tensor descriptors (TMA) or
with pointer loads (TileConfig.tma). Each variant's output is checked against the default variant's before it
is timed. Prints one table, best first per pass.

``--float32``: float32 instead, at D = 64 and 128 (four-branch grouped, N = 8K): float32's own tile lists
(``autotune.candidates``: small tiles over 8 warps) against the first config of the 16-bit list of twice the head_dim,
which float32 took before stop 37. Exact float32 products run on the FMA units with their operands in registers;
those 16-bit tiles spill 4,000 to 60,000 instructions at float32, and on an H100 (stop 37) ran 4.7-8.7x slower
in the forward and dk/dv and 5.6x in dq at D = 128 (at D = 64 dq's was 5% faster).

``--float32 [D ...] --dot ieee tf32``: float32's exact products (their first config) against TF32 products
(where torch's setting allows TF32; their list and TF32_SWEEP), errors relative to the exact products' default,
at D = 64, 128 and 256.

    PYTHONPATH=. python benchmarks/tune_triton.py [--quick | --float32 [D ...] [--dot ieee tf32]]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from triton.testing import do_bench

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton.autotune import TileConfig, _c, candidates

H, D = 16, 128
FOUR = ((2048, 1), (4096, 2), (8192, 4), (16384, 8))

# variants timed per pass (each with tensor descriptors, "tma", or pointer loads, "ptr"). Earlier runs on an H100
# also timed (slower, dropped): fwd 128x64/w8/s3/tma, 256x64/w16/s3, 64x128/w4/s3, 128x128/w4/s3, 256x128/w16/s2
# (128x128/w8/s4 and 256x128/w16/s3 do not fit in shared memory), warp specialisation of the forward key loop
# (no change); dkdv 128x64/w8/s2-3, 64x16/w4/s4, 128x16/w8/s4, 32x32/w4/s4, 64x64/w8/s3, 32x64/w4/s3,
# 64x32/w8/s4, 32x32/w2/s4, 128x32/w4/s3-5; dq 128x64/w8/s2, 64x64/w4/s3-4, 256x64/w16/s2, 128x32/w4/s4-5.
# Register caps for two programs per SM (TileConfig.maxnreg; results file): fwd 128x64/w8/s2 at 128 registers
# 1.105 ms (no spills) against 1.049 for 128x128/w8/s3, pointer loads 1.121 ms; capped dkdv 64x32/r168 and
# 128x32/w8/r128 and dq 128x64/w8/s2/r128 spill and run 1.9-7.7x slower; fwd 64x64/w4/s2 and 128x128/w8/s2 slower.
# On Hopper with triton 3.6 the module's grouped non-causal forward runs the Gluon kernel instead
# (benchmarks/experiments/gluon_zero_fill_experiment.py times that one); these are the tl kernels.
FWD = [_c(128, 128, 8, 3), _c(128, 64, 8, 3, "ptr"), _c(64, 64, 4, 3), _c(128, 64, 8, 2, "tma", 128)]
DKDV = [_c(64, 32, 4, 3), _c(64, 32, 4, 2), _c(64, 32, 4, 3, "ptr"), _c(64, 32, 4, 4), _c(128, 32, 8, 3),
        _c(64, 64, 4, 2)]
DQ = [_c(128, 64, 8, 3, "ptr"), _c(128, 64, 8, 3), _c(128, 32, 8, 3, "ptr"), _c(128, 128, 8, 2, "ptr"),
      _c(64, 64, 4, 3, "ptr")]
# float32 on the TF32 tensor cores: more tile configs timed besides the list's (sm_90a compiles on this
# project's CPU machine: few spill instructions or none, shared memory that fits)
TF32_SWEEP = {
    ("fwd", 64): [_c(128, 128, 8, 2), _c(128, 64, 8, 2, "ptr")],
    ("fwd", 128): [_c(128, 32, 8, 2), _c(64, 64, 4, 2)],
    ("dq", 64): [_c(64, 64, 4, 2)],
    ("dq", 128): [_c(64, 64, 4, 2)],
    ("dkdv", 64): [_c(64, 64, 4, 2)],
    ("dkdv", 128): [_c(128, 32, 8, 2)],
    # D = 256 (sm_90a compiles: fwd 64x16/w4 3 spill instructions among a step's products; dk/dv 64x16/w4 is
    # serialised by ptxas for want of registers; dq 32x16/w8/ptr none)
    ("fwd", 256): [_c(64, 16, 8, 2)],
    ("dq", 256): [_c(32, 16, 8, 2, "ptr")],
    ("dkdv", 256): [_c(64, 16, 4, 2)],
}
DENSE_FWD = [_c(128, 128, 8, 3), _c(128, 64, 8, 3, "ptr"), _c(128, 64, 8, 2, "tma", 128)]

# Hopper: 64K registers, 228 KB of shared memory (1 KB of it reserved per program) and 64 warps per SM
SM_REGS, SM_SHARED, SM_WARPS = 65536, 233472, 64


def resources(kernel, warps: int) -> str:
    """Registers per thread, spills, shared memory and how many programs fit on one SM."""
    if kernel is None or not hasattr(kernel, "n_regs"):
        return "-"
    regs, shared = kernel.n_regs, kernel.metadata.shared
    per_warp = -(-regs * 32 // 256) * 256
    fit = min(SM_WARPS // warps, SM_REGS // max(1, per_warp * warps), SM_SHARED // (shared + 1024))
    return f"{regs} regs, {kernel.n_spills} spills, {shared // 1024} KB, {fit}/SM"


DEVICE = "cuda"


def bench(fn) -> float:
    if DEVICE == "cpu":  # --smoke under TRITON_INTERPRET=1: one call, to check the script itself
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(name, spec, N, rows, quick, passes=("fwd", "dkdv", "dq"), dtype=torch.bfloat16, configs=None,
             dot=None):
    """Each pass's variants (``configs``: pass -> tile configs, else the lists above) timed on ``spec`` at N.
    ``dot``: float32's product precision for the variants (the results they are checked against are the
    default's)."""
    plan = build_plan(spec, N, H, D)
    ref_low = tl_lowering.TritonLowering(plan, torch.device(DEVICE), dtype)
    low = tl_lowering.TritonLowering(plan, torch.device(DEVICE), dtype, float32_dot=dot)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device=DEVICE, dtype=dtype, generator=g) for _ in range(4))
    kpm = torch.zeros(1, dtype=torch.uint8, device=DEVICE)
    flops_f, flops_b = float(plan.flops), float(plan.flops_backward)
    # reference results: the default forward / backward (autotuned as users get them)
    out, lse, aux = ref_low.forward(q, k, v)
    ref_dq, ref_dk, ref_dv = ref_low.backward(dout, None, q, k, v, out, lse, aux)
    delta = (out.float() * dout.float()).sum(-1).permute(0, 2, 1).contiguous()
    if configs is None:
        configs = {"fwd": FWD[:3] if quick else FWD, "dkdv": DKDV[:3] if quick else DKDV,
                   "dq": DQ[:3] if quick else DQ}
        if name.startswith("dense"):
            configs["fwd"] = DENSE_FWD
    configs = {p: c for p, c in configs.items() if p in passes}
    for pass_name, cfgs in configs.items():
        for cfg in cfgs:
            for _ in (1,):
                label = str(cfg) + (f" {low.dot_precision}" if dtype == torch.float32 else "")
                try:
                    if pass_name == "fwd":
                        o = torch.zeros_like(q)
                        ls = torch.full_like(lse, float("-inf"))
                        run = lambda: low._launch_fwd(cfg, q, k, v, kpm, False, o, ls)  # noqa: E731
                        kern = run()
                        err = max(rel_err(o, out), rel_err(ls, lse))
                        flops = flops_f
                    elif pass_name == "dkdv":
                        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
                        run = lambda: low._launch_dkdv(cfg, q, k, v, kpm, False, dout, lse, delta,  # noqa: E731
                                                       dk, dv, False)
                        kern = run()
                        err = max(rel_err(dk, ref_dk), rel_err(dv, ref_dv))
                        flops = flops_b * 4 / 5    # of the five backward matmuls, dk/dv's pass does four
                    else:
                        dq = torch.zeros_like(q)
                        dl = delta.clone()  # rows no tile selects keep their value
                        run = lambda: low._launch_dq(cfg, q, k, v, kpm, False, dout, out, None, lse,  # noqa: E731
                                                     dl, dq, False)
                        kern = run()
                        err = max(rel_err(dq, ref_dq), rel_err(dl, delta))
                        flops = flops_b * 3 / 5    # (and delta of its rows)
                    ms = bench(run)
                    rows.append((name, pass_name, label, ms, flops / ms / 1e9, err, resources(kern, cfg.num_warps)))
                except Exception as e:  # a config that does not fit: report it, go on
                    rows.append((name, pass_name, label, float("nan"), float("nan"),
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}", "-"))
                print(rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--dot", nargs="+", choices=tl_lowering.FLOAT32_DOTS,
                    help="with --float32: these product precisions, each with its tile list (exact products, "
                         "'ieee': the list's first config; 'tf32': the list and TF32_SWEEP)")
    ap.add_argument("--float32", type=int, nargs="*", choices=(64, 128, 256), metavar="D",
                    help="float32's tile lists against the 16-bit ones it took before, at these head_dims "
                         "(64 128 if none)")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    dtypes = "bf16"   # for the table's heading
    global DEVICE, H, D
    if args.smoke:
        DEVICE, H, D = "cpu", 2, 16
        spec = AttentionSpec((Branch(32, 1), Branch(64, 2)))
        for cfgs in (FWD, DKDV, DQ):
            cfgs[:] = [TileConfig(16, 16, 1, 1)]
        dtypes = "fp16, float32"   # the interpreter computes bf16 products wrongly
        run_case("smoke fp16", spec, 128, rows, False, dtype=torch.float16)
        run_case("smoke float32", spec, 128, rows, False, dtype=torch.float32)
    elif args.float32 is not None:
        dtypes = "float32"
        four = AttentionSpec(tuple(Branch(w, r) for w, r in FOUR))
        for D in args.float32 or (64, 128):
            if not args.dot:
                configs = {p: candidates(p, D, 4) + candidates(p, 2 * D, 2)[:1] for p in ("fwd", "dkdv", "dq")}
                run_case(f"float32 D={D} 8K", four, 8192, rows, False, dtype=torch.float32, configs=configs)
                continue
            for dot in args.dot:
                # exact products: their list's first config; tensor-core products: their list and TF32_SWEEP
                configs = {p: candidates(p, D, 4, dot)[:1] if dot == "ieee" else
                           list(dict.fromkeys(candidates(p, D, 4, dot) + TF32_SWEEP.get((p, D), [])))
                           for p in ("fwd", "dkdv", "dq")}
                run_case(f"float32 D={D} 8K", four, 8192, rows, False, dtype=torch.float32, configs=configs,
                         dot=dot)
    else:
        four = AttentionSpec(tuple(Branch(w, r) for w, r in FOUR))
        run_case("four-branch 64K", four, 65536, rows, args.quick)
        run_case("dense 16K", AttentionSpec((Branch(16384, 1),)), 16384, rows, False, passes=("fwd",))
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "interpreter"
    dims = ", ".join(map(str, args.float32 or (64, 128))) if args.float32 is not None else D
    print(f"\n{where}, {dtypes}, {H} heads, D={dims}; kernel times (median), useful TFLOP/s of the pass; "
          f"err = relative difference to the default variant ({time.time() - t0:.0f} s)")
    print("| case | pass | variant | ms | TFLOP/s | err | resources |\n|---|---|---|---|---|---|---|")
    for case in dict.fromkeys(r[0] for r in rows):
        for p in ("fwd", "dkdv", "dq"):
            sel = sorted((r for r in rows if r[0] == case and r[1] == p), key=lambda r: (math.isnan(r[3]), r[3]))
            for r in sel:
                err = r[5] if isinstance(r[5], str) else f"{r[5]:.1e}"
                print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.0f} | {err} | {r[6]} |")


if __name__ == "__main__":
    main()
