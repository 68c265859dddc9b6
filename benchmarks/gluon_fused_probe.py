"""Probe: where the fused backward's time goes (four-branch grouped N = 64K, bf16, 16 heads, D = 128).

Times each launch alone: bwd_delta; gluon_bwd_dq and gluon_bwd_dkdv (the split backward); gluon_bwd_fused with
its default slots, with one slot per segment (no waits), and with parts left out through its SKIP constexpr
(1: no reduce-adds, 2: no dQ write-out in the finish, 4: no dQ product, dS exchange or reduce-adds). The parts left
out make wrong gradients: timing only.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/gluon_fused_probe.py
"""

from __future__ import annotations

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))


def main():
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    gluon_hopper.FUSED_MAX_ACCUM = 1 << 30   # one slot per segment: 240 MiB here
    for causal in (False, True):
        plan = build_plan(AttentionSpec(FOUR, causal=causal), N, H, D)
        low = tl_lowering.TritonLowering(plan, dev, torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        out, lse, aux = low.forward(q, k, v)
        ld = torch.empty((2, 1, H, N), dtype=torch.float32, device=dev)
        ld[0].copy_(lse)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        zf = low._zfill("k", tl_lowering._GLUON_BWD_TILES, dev)

        def t(fn):
            return do_bench(fn, warmup=5, rep=100, return_mode="median")
        res = {"delta": t(lambda: low._launch_delta(dout, out, ld, None)),
               "dq (split)": t(lambda: low._launch_gluon_dq(q, k, v, dout, out, dq, ld[0], ld[1], None, zf)),
               "dkdv (split)": t(lambda: low._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, zf))}
        nseg = low._fused_args(q)[2]
        for name, slots, skip in (("fused", None, 0), ("fused, a slot per segment", nseg, 0),
                                  ("fused, slot/segment, no dQ write-out", nseg, 2),
                                  ("fused, slot/segment, no reduce, no write-out", nseg, 3),
                                  ("fused, slot/segment, no dQ product at all", nseg, 7),
                                  ("fused, 64 slots", 64, 0)):
            gluon_hopper.FUSED_SLOTS = slots
            low._tables.pop(("fused", 1, dev), None)
            res[name] = t(lambda: low._launch_gluon_fused(q, k, v, dout, dq, dk, dv, ld, zf, skip=skip))
            print(f"causal={causal} {name:<48} {res[name]:.3f} ms", flush=True)
        gluon_hopper.FUSED_SLOTS = None
        low._tables.pop(("fused", 1, dev), None)
        for name, ms in res.items():
            print(f"causal={causal} {name:<48} {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
