"""Experiment: grouped-query attention's forward on the Gluon kernel (query head h reading kv head h // (H // Hkv))
against the tl forward that ran it before.

Why: until stop 29 any call with fewer kv heads than query heads ran the generated tl kernels, which on the main
case's forward are about a third slower than ``gluon_fwd`` (benchmarks/results/H100-triton.md). The forward needs
only K's and V's descriptors over Hkv heads and the kv head of each tile; the backward stays on the tl kernels
(dk and dv of a kv head add over its query heads, which the Gluon dk/dv kernel's tiles do not own).

Four-branch grouped N = 64K (bf16, 16 query heads, D = 128, batch 1), Hkv = 16 (no GQA), 4 and 1, causal and not:
the module's forward and forward + backward with the Gluon kernels on and off (``lowering.USE_GLUON``, what
``DILATED_COMPILER_GLUON=0`` sets), alternating over --rounds rounds, and the largest difference between the two
forms' outputs (the GPU tests check each against the float64 reference).

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_gqa_fwd_experiment.py [--rounds 3]

Outcome (H100, stop 29, one call, 2 alternating rounds, not causal, Hkv 16 and 4 only: the device time ran
short), median ms, Gluon / tl: Hkv = 4 forward 0.827 / 1.102 (1.33x), fwd+bwd 5.189 / 5.433 (1.05x: the
backward is the tl kernels' in both); Hkv = 16 forward 0.831 / 1.164, fwd+bwd 3.720 / 5.023. The two forms' outputs
were bitwise equal in each case (the kernels do the same arithmetic per tile). Adopted: ``gluon_fwd`` takes
grouped-query calls. The GPU tests (``test_gpu_gluon_gqa_forward``: grouped and "all" mode, causal, fp16 and bf16,
D = 64 and 128, Hkv = 1, 2, 4 of 8 query heads) passed against the float64 reference.

Since stop 30 the Gluon form runs the Gluon backward too where each branch's heads are whole groups of the query heads
sharing a kv head (Hkv = 4 here, not 1): ``gluon_gqa_bwd_experiment.py`` times that backward.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dilated_compiler import AttentionSpec, Branch, compile_attention
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-heads", default="16,4,1")
    ap.add_argument("--causal", choices=("no", "yes", "both"), default="both")
    args = ap.parse_args()
    from triton.testing import do_bench
    rows = []
    for causal in {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]:
        spec = AttentionSpec(FOUR, causal=causal)
        for hkv in map(int, args.kv_heads.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(1, N, hkv, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            dout = torch.randn_like(q)
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            outs, times = {}, {("gluon", "fwd"): [], ("gluon", "fwd+bwd"): [], ("tl", "fwd"): [],
                               ("tl", "fwd+bwd"): []}
            attn = compile_attention(spec, backend="triton")
            for form in ("gluon", "tl"):
                tl_lowering.USE_GLUON = form == "gluon"
                with torch.no_grad():
                    outs[form] = attn(q, k, v)
            for _ in range(args.rounds):
                for form in ("gluon", "tl"):
                    tl_lowering.USE_GLUON = form == "gluon"

                    def step():
                        attn(qg, kg, vg).backward(dout)
                        qg.grad = kg.grad = vg.grad = None
                    with torch.no_grad():
                        times[(form, "fwd")].append(do_bench(lambda: attn(q, k, v), warmup=5, rep=100,
                                                             return_mode="median"))
                    times[(form, "fwd+bwd")].append(do_bench(step, warmup=5, rep=100, return_mode="median"))
            tl_lowering.USE_GLUON = True
            diff = (outs["gluon"].float() - outs["tl"].float()).abs().max().item()
            for p in ("fwd", "fwd+bwd"):
                g_ms, t_ms = (statistics.median(times[(f, p)]) for f in ("gluon", "tl"))
                rows.append((causal, hkv, p, g_ms, t_ms, diff, times[("gluon", p)], times[("tl", p)]))
                print(rows[-1], flush=True)
            del q, k, v, dout, qg, kg, vg, outs, attn
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N=64K, bf16, H={H}, D={D}; median of {args.rounds} "
          "alternating rounds; Gluon forward (tl backward where Hkv < H) against the tl kernels throughout")
    print("| causal | kv heads | pass | Gluon ms | tl ms | tl / Gluon | max abs out difference | rounds (Gluon; tl) |")
    print("|---|---|---|---|---|---|---|---|")
    for causal, hkv, p, g_ms, t_ms, diff, gs, ts in rows:
        print(f"| {causal} | {hkv} | {p} | {g_ms:.3f} | {t_ms:.3f} | {t_ms / g_ms:.2f}x | {diff:.2e} | "
              f"{', '.join(f'{t:.3f}' for t in gs)}; {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
