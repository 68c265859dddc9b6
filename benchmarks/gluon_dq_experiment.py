"""Experiment: the lowering's Gluon dq kernel (``gluon_bwd_dq``) with and without PIPE, against the generated tl
dq kernel, on the four-branch grouped 64K backward (bf16, 16 heads, D = 128).

PIPE: each consumer issues the next key step's S = Q K^T and dP = dO V^T right after this step's dQ += dS K,
then waits for dQ only, so its products queue back to back (FA3-style software pipelining). Compiled for sm_90a
(triton 3.6), neither form spills; PIPE has 72 HGMMA instructions against 40 (the first step is peeled).

Outputs are poisoned with NaN and compared against the tl kernel's dq and delta.

Result (H100): both correct; PIPE 1.644 ms (232 registers) and 1.656 ms (240) against 1.134-1.177 ms without
it, so the lowering leaves it off (gluon_hopper.DQ_PIPELINE). A guess at why: with two K/V stages a pipelined
consumer holds both, so the producer cannot load ahead.

Prepared next (not yet run on a GPU): O_PTR reads O's rows for delta by pointers (once per tile, issued before
the consumer waits for Q and dO), which frees O's 32 KB of shared memory for a third K/V stage; then PIPE again
with three stages. --check-compile compiles the variants for sm_90a (triton 3.6) and counts spill instructions.

    PYTHONPATH=. python benchmarks/gluon_dq_experiment.py [--check-compile]
"""

from __future__ import annotations

import argparse
import inspect
import math

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton.autotune import TileConfig

FOUR = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))))


# (PIPE, O_PTR, K/V stages, consumer registers). Run 1 (H100), the first four without the O_PTR column:
# 1.177, 1.644, 1.656, 1.134 ms
VARIANTS = [
    (False, False, 2, 232),
    (True, False, 2, 232),
    (False, True, 2, 232),
    (False, True, 3, 232),
    (True, True, 3, 232),
    (True, True, 3, 240),
    (False, False, 2, 232),
]


def check_compile():
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    tools = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/"
    low = tl_lowering.TritonLowering(build_plan(FOUR, 65536, 16, 128), torch.device("cpu"), torch.bfloat16)
    fn = low.gluon_kernels.gluon_bwd_dq
    scalars = {"T": "i32", "B": "i32", "N": "i32", "H": "i32", "qk_scale": "fp32", "sm_scale": "fp32",
               "stride_b": "i64", "stride_lb": "i32", "stride_lh": "i32", "TABLE": "*i32", "RB": "*i32",
               "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32"}
    sig = {p: scalars.get(p, "*bf16" if p in ("Q", "K", "V", "DO", "OUT", "DQ") else "constexpr")
           for p in inspect.signature(fn.fn).parameters}
    for pipe, o_ptr, stages, regs in VARIANTS[:-1]:
        consts = dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, STAGES=stages, ZFILL=True, HAS_DLSE=False, PIPE=pipe,
                      CAUSAL=False, O_PTR=o_ptr, CONSUMER_REGS=regs, num_warps=4)
        src = GluonASTSource(fn, sig, constexprs={(list(sig).index(k), ): v for k, v in consts.items()})
        label = f"PIPE={pipe}, O_PTR={o_ptr}, {stages} K/V stages, consumer regs {regs}"
        try:
            kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except Exception as e:
            print(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
            continue
        with tempfile.TemporaryDirectory() as d:
            with open(f"{d}/k.cubin", "wb") as f:
                f.write(kern.asm["cubin"])
            sass = subprocess.run([tools + "nvdisasm", "-c", f"{d}/k.cubin"], capture_output=True,
                                  text=True).stdout.splitlines()
        marks = "".join("M" if "HGMMA" in ln else "S" if ("STL" in ln or "LDL" in ln) else "B"
                        for ln in sass if "HGMMA" in ln or "STL" in ln or "LDL" in ln or "BRA" in ln)
        between = sum(run.count("S") for run in re.findall(r"M[MS]*M", marks))
        print(f"{label}: shared {kern.metadata.shared} B, HGMMA {marks.count('M')}, spill instructions among a "
              f"step's HGMMAs {between}, elsewhere {marks.count('S') - between}")


def main():
    from triton.testing import do_bench

    H, D, N = 16, 128, 65536
    plan = build_plan(FOUR, N, H, D)
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    kpm = torch.zeros(1, dtype=torch.uint8, device="cuda")
    out, lse, _ = low.forward(q, k, v)
    ref_dq, ref_delta = torch.zeros_like(q), torch.zeros_like(lse)
    low._launch_dq(TileConfig(128, 64, 8, 3, False), q, k, v, kpm, False, dout, out, None, lse, ref_delta, ref_dq,
                   False)
    flops = plan.flops_backward * 3 / 5
    rows = []

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    for pipe, o_ptr, stages, regs in VARIANTS:
        dq, delta = torch.full_like(q, math.nan), torch.full_like(lse, math.nan)
        label = f"PIPE={pipe}, O_PTR={o_ptr}, {stages} K/V stages, consumer regs {regs}"

        def fn():
            low._launch_gluon_dq(q, k, v, dout, out, dq, lse, delta, None, True, consumer_regs=regs, pipe=pipe,
                                 o_ptr=o_ptr, stages=stages)
        try:
            fn()
            torch.cuda.synchronize()
            err = max(rel(dq, ref_dq), rel(delta, ref_delta))
            rows.append((label, do_bench(fn, warmup=10, rep=60, return_mode="median"), err))
        except Exception as e:
            rows.append((label, math.nan, f"{type(e).__name__}: {str(e)[:120]}"))
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: gluon_bwd_dq, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| variant | ms | TFLOP/s of its matmuls | err against the tl kernel (NaN: unwritten) |")
    print("|---|---|---|---|")
    for name, ms, err in rows:
        print(f"| {name} | {ms:.3f} | {float(flops) / ms / 1e9:.0f} | "
              f"{err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-compile", action="store_true")
    if ap.parse_args().check_compile:
        check_compile()
    else:
        main()
