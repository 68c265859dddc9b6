"""Experiment: grouped-query attention's backward on the Gluon kernels (dq reading kv head h // (H // Hkv); dk/dv
walking each kv head's key tiles over the query heads that read them, ``tables.kv_tile_table``) against the tl
backward that ran it before (dq, then dk/dv adding each query head's share into float32 buffers with atomics).

Why: until stop 30 a call with fewer kv heads than query heads ran the Gluon forward (stop 29) but the tl backward,
which on the main case is about 1.5x slower than the Gluon one (benchmarks/results/H100-triton.md, stop 29: Hkv 4
of 16, fwd+bwd 5.189 ms against 3.720 without grouped-query attention).

Four-branch grouped N = 64K (bf16, 16 query heads, D = 128, batch 1): Hkv = 16 (no grouped-query attention), 8, 4
(GQA 2, 4: each branch's 4 heads are whole groups of the query heads sharing a kv head), 2 and 1 (GQA 8, 16: a kv
head's query heads span two or four branches, so the Gluon dk/dv runs a phase per branch into float32: SPLIT,
``gluon_hopper.SPLIT_BACKWARD``, which this script sets per form),
causal or not: the module's forward + backward
with the Gluon backward on and off (``TritonLowering.gluon_unsupported`` patched to refuse it; the forward is
Gluon's in both), alternating over --rounds rounds, and the largest differences between the two forms' gradients (the GPU
tests check each against the float64 reference).

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_gqa_bwd_experiment.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan, compile_attention
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton.lowering import TritonLowering
from dilated_compiler.lowering.triton.tables import whole_groups_reason

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))
_unsupported = TritonLowering.gluon_unsupported


def _tl_backward(self, q, k, v, has_kpm, *more):
    """gluon_unsupported with the Gluon backward refused under grouped-query attention (the tl form)."""
    if more and self.gqa > 1:
        return "refused by the experiment (the tl backward)"
    return _unsupported(self, q, k, v, has_kpm, *more)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-heads", default="16,8,4,2,1")
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
            attn = compile_attention(spec, backend="triton")
            forms = {"gluon": attn, "tl": attn}
            grads, times = {}, {f: [] for f in forms}

            def use(form):
                TritonLowering.gluon_unsupported = _unsupported if form == "gluon" else _tl_backward
                gluon_hopper.SPLIT_BACKWARD = form == "gluon"

            for form, attn in forms.items():
                use(form)
                attn(qg, kg, vg).backward(dout)
                grads[form] = [t.grad.float() for t in (qg, kg, vg)]
                qg.grad = kg.grad = vg.grad = None
            for _ in range(args.rounds):
                for form, attn in forms.items():
                    use(form)

                    def step():
                        attn(qg, kg, vg).backward(dout)
                        qg.grad = kg.grad = vg.grad = None
                    times[form].append(do_bench(step, warmup=5, rep=100, return_mode="median"))
            use("gluon")
            diffs = [(a - b).abs().max().item() for a, b in zip(grads["gluon"], grads["tl"])]
            g_ms, t_ms = (statistics.median(times[f]) for f in ("gluon", "tl"))
            split = whole_groups_reason(build_plan(spec, N, H, D, kv_heads=hkv), H // hkv) is not None
            form = "no GQA" if hkv == H else "phase per branch (SPLIT)" if split else "one launch"
            rows.append((causal, hkv, form, g_ms, t_ms, diffs, times["gluon"], times["tl"]))
            print(rows[-1], flush=True)
            del q, k, v, dout, qg, kg, vg, grads, forms, attn
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N=64K, bf16, H={H}, D={D}; fwd+bwd, median of "
          f"{args.rounds} alternating rounds; Gluon forward in both forms")
    print("| causal | kv heads | Gluon dk/dv | with it ms | tl backward ms | tl / Gluon | max abs diff dq, dk, dv "
          "| rounds (Gluon; tl) |")
    print("|---|---|---|---|---|---|---|---|")
    for causal, hkv, form, g_ms, t_ms, diffs, gs, ts in rows:
        print(f"| {causal} | {hkv} | {form} | {g_ms:.3f} | {t_ms:.3f} | {t_ms / g_ms:.2f}x | "
              f"{', '.join(f'{d:.1e}' for d in diffs)} | {', '.join(f'{t:.3f}' for t in gs)}; "
              f"{', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
