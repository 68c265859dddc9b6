"""Experiment: the Gluon backward with its last band cut into chunks (gluon_hopper.SPLIT_TAIL) against whole tiles,
four-branch grouped (bf16, 16 heads, D = 128, batch 1), causal and not.

Why: the persistent backward kernels run program p on table rows p, p + G, ... At N = 64K a pass has 3840 tiles
of equal work (non-causal) on G = 132 programs: 29 full bands, then a band of 12 tiles during which 120 programs
wait, 30 tile-times where 29.09 would do (about 3% of each pass). With SPLIT, each of the last band's tiles is cut
into k chunks of its partner walk (tables.split_tail: k = 11 at 64K), the chunks write fp32 partial sums, and
dilated_tail_reduce adds them (one small launch per pass).

The check: dq, dk, dv of both forms from the same forward (sums in another order: expect differences of a
rounding step, most elements equal); times of each pass (dq, dk/dv, each with its reduce), of the lowering's
backward, and of the module's forward + backward through autograd (what bench_triton.py times), alternating the
two forms over --rounds rounds. If it wins, set gluon_hopper.SPLIT_TAIL = True (test_gpu_gluon_split_tail checks
it against the reference).

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/split_tail_experiment.py [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan, compile_attention
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

H, D = 16, 128
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))


def main():
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="65536")
    ap.add_argument("--causal", default="0,1")
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    forms = {"whole tiles": False, "split tail": True}
    rows = []
    for N in (int(s) for s in args.sizes.split(",")):
        for causal in (bool(int(c)) for c in args.causal.split(",")):
            spec = AttentionSpec(FOUR, causal=causal)
            plan = build_plan(spec, N, H, D)
            low = tl_lowering.TritonLowering(plan, dev, torch.bfloat16)
            attn = compile_attention(spec, backend="triton")
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g)
                             for _ in range(4))
            out, lse, aux = low.forward(q, k, v)
            grads = {}
            for form, on in forms.items():
                gluon_hopper.SPLIT_TAIL = on
                grads[form] = low.backward(dout, None, q, k, v, out, lse, aux)
                torch.cuda.synchronize()
            ref = grads["whole tiles"]
            diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                       for a, b in zip(grads["split tail"], ref))
            equal = sum(int((a.view(torch.int16) == b.view(torch.int16)).sum()) for a, b in zip(grads["split tail"], ref))
            total = sum(t.numel() for t in ref)
            tails = {kind: low._gluon_tail(kind, tl_lowering._GLUON_BWD_TILES, q, None, True) for kind in "qk"}
            print(f"N={N} causal={causal}: split tiles / chunks: "
                  f"{ {k_: (t[0].shape[0], t[1]) if t else None for k_, t in tails.items()} }; max rel. difference "
                  f"{diff:.1e}, bitwise equal {equal / total:.4%}", flush=True)
            ld = torch.empty((2, 1, H, N), dtype=torch.float32, device=dev)
            ld[0].copy_(lse)
            dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            passes = {
                "dq (+ reduce)": lambda: low._launch_gluon_dq(q, k, v, dout, out, dq, ld[0], ld[1], None, True),
                "dk/dv (+ reduce)": lambda: low._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, True),
                "lowering backward": lambda: low.backward(dout, None, q, k, v, out, lse, aux),
                "module fwd+bwd": lambda: attn(qg, kg, vg).backward(dout),
            }
            times = {(f, p): [] for f in forms for p in passes}
            for _ in range(args.rounds):
                for form, on in forms.items():
                    gluon_hopper.SPLIT_TAIL = on
                    for p, fn in passes.items():
                        times[(form, p)].append(do_bench(fn, warmup=10, rep=200, return_mode="median",
                                                         grad_to_none=[qg, kg, vg]))
            gluon_hopper.SPLIT_TAIL = False
            for (form, p), ts in times.items():
                rows.append((N, causal, p, form, min(ts), ts))
                print(rows[-1], flush=True)
            del q, k, v, dout, out, lse, aux, grads, ref, low, attn, qg, kg, vg, dq, dk, dv, ld
            torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped, bf16, H={H}, D={D}, batch 1; best of "
          f"{args.rounds} alternating rounds")
    print("| N | causal | pass | whole tiles | split tail | ratio | rounds (whole / split) |")
    print("|---|---|---|---|---|---|---|")
    by = {(n, c, p, f): (ms, ts) for n, c, p, f, ms, ts in rows}
    for (n, c, p, f), (ms, ts) in by.items():
        if f != "whole tiles":
            continue
        ms2, ts2 = by[(n, c, p, "split tail")]
        print(f"| {n // 1024}K | {c} | {p} | {ms:.3f} | {ms2:.3f} | {ms / ms2:.3f}x | "
              f"{', '.join(f'{t:.3f}' for t in ts)} / {', '.join(f'{t:.3f}' for t in ts2)} |")


if __name__ == "__main__":
    main()
