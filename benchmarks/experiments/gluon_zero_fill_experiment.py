"""Experiment: what the Gluon forward's zero fill (dilated_compiler/lowering/triton/gluon_hopper.py) costs, and
how the register split between its warpgroups matters. The producer warpgroup writes the zeros of the positions
a head's branch does not select as TMA stores of a zero tile; without it (zero fill off) the output needs a
memset. The consumer register count sets the producer's (512 - 2 * it).

The kernel also had two other places for the zero fill, measured with this script at commit 85e176f (H100):
by the consumers after their epilogue 0.832-0.853 ms, by the producer with plain stores 0.818-0.825 ms, against
0.781 ms with TMA stores and 0.769-0.788 ms with none; only the TMA stores were kept.

Four-branch grouped pattern at N = 64K, bf16, 16 heads, D = 128. Every variant's output starts as NaN and is
compared with the generated tl kernel's (zeros included).

    PYTHONPATH=. python benchmarks/experiments/gluon_zero_fill_experiment.py
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton.autotune import TileConfig


def main():
    H, D, N = 16, 128, 65536
    spec = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))))
    plan = build_plan(spec, N, H, D)
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    kpm = torch.zeros(1, dtype=torch.uint8, device="cuda")
    flops = float(plan.flops)
    ref_o, ref_l = torch.zeros_like(q), torch.full((1, H, N), float("-inf"), device="cuda")
    low._launch_fwd(TileConfig(128, 128, 8, 3), q, k, v, kpm, False, ref_o, ref_l)
    assert low.gluon_unsupported(q, k, v, False) is None, low.gluon_unsupported(q, k, v, False)
    rows = []
    for zfill, regs in ((False, 232), (True, 232), (True, 240)):
        out = torch.full_like(q, float("nan")) if zfill else torch.zeros_like(q)
        lse = torch.full_like(ref_l, float("-inf"))

        def run():
            low._launch_gluon_fwd(q, k, v, out, lse, zfill, regs)
        run()
        err = float((out.float() - ref_o.float()).norm() / ref_o.float().norm())
        fin = torch.isfinite(ref_l)
        err = max(err, float((lse - ref_l)[fin].abs().max()))
        ms = do_bench(run, warmup=10, rep=50, return_mode="median")
        rows.append((zfill, regs, ms, err))
        print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: gluon_fwd kernel, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| zero fill | consumer regs | ms | TFLOP/s | err (NaN: positions left unwritten) |")
    print("|---|---|---|---|---|")
    for zfill, regs, ms, err in rows:
        who = "producer, TMA stores" if zfill else "none (needs a memset)"
        print(f"| {who} | {regs} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err:.1e} |")


if __name__ == "__main__":
    main()
