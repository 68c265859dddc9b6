"""Experiment: "all" mode's Gluon backward adding its rows by reductions instead of loads and stores.

Why: in "all" mode each tile of a phase after the first adds its dq (or dk, dv) rows into float32 buffers
(`_add_rows` in gluon_hopper.py) by pointer loads, an add and stores. The loads are on the consumer's path: it
waits a global load round trip per tile before its next tile's products. Stop 12 measured the phase that stores
instead of adding (ACC 2) 2 ms faster at 64K (H100; benchmarks/results/H100-triton.md). A reduction (PTX
`red.global.add`) needs no round trip and no result register: the consumer issues it and goes on.

Forms of the adding path (the storing first phase is the same in all):
- "load+store": the lowering's kernels as they are;
- "red": one `red.global.add.f32` per element (inline PTX);
- "red.v2": one `red.global.add.v2.f32` per two adjacent columns (each thread's accumulator holds pairs).
Every row gets the same additions in the same order in every form (one per phase, phases in order), so the
gradients should be bitwise equal; `red.add.f32` flushes subnormal results to zero, which at these magnitudes
changes nothing.

Four-branch "all" mode N = 64K, bf16, 16 heads, D = 128, causal and not: the lowering's backward alone and
forward + backward, the forms alternating over --rounds rounds.

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/gluon_red_experiment.py [--rounds 3]

``--check-compile`` compiles each form's "all"-mode dq and dk/dv kernels for sm_90a without a GPU (triton 3.6).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton import lowering as tl_lowering

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gluon_variants import patch_gluon  # noqa: E402

H, D, N = 16, 128, 65536
FOUR = tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8)))

OLD = ("        gl.store(base + offs, gl.load(base + offs) + lo)\n"
       "        gl.store(base + HEAD_DIM // 2 + offs, gl.load(base + HEAD_DIM // 2 + offs) + hi)\n")
NEW = {
    "red": ("        _red_add(base + offs, lo)\n"
            "        _red_add(base + HEAD_DIM // 2 + offs, hi)\n"),
    "red.v2": ("        _red_add2(base + offs, lo)\n"
               "        _red_add2(base + HEAD_DIM // 2 + offs, hi)\n"),
}
HELPERS = '''

@gluon.jit
def _red_add(ptrs, val):
    gl.inline_asm_elementwise("red.global.add.f32 [$1], $2; mov.b32 $0, 0;", "=r,l,f",
                              [ptrs.to(gl.int64, bitcast=True), val], gl.int32, is_pure=False, pack=1)


@gluon.jit
def _red_add2(ptrs, val):
    gl.inline_asm_elementwise("red.global.add.v2.f32 [$2], {$4, $5}; mov.b32 $0, 0; mov.b32 $1, 0;",
                              "=r,=r,l,l,f,f", [ptrs.to(gl.int64, bitcast=True), val], gl.int32, is_pure=False,
                              pack=2)
'''
ANCHOR = "\n\n@gluon.jit\ndef _phase(PHASES"


def variant(low, form: str):
    """``low`` with its Gluon module replaced by the form's."""
    if form == "load+store":
        return low
    return patch_gluon(low, form, [(OLD, NEW[form]), (ANCHOR, HELPERS + ANCHOR)])


def check_compile():
    from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, summarize
    g = gluon_hopper
    plan = build_plan(AttentionSpec(FOUR, head_assignment="all"), 65536, H, D)
    for form in ("load+store", "red", "red.v2"):
        kernels = variant(tl_lowering.TritonLowering(plan, torch.device("cpu"), torch.bfloat16), form).gluon_kernels
        common = dict(HEAD_DIM=D, ZFILL=False, CAUSAL=False, num_warps=4, ACC=1, PHASED=True)
        dq = compile_sm90(kernels.gluon_bwd_dq, dict(common, BLOCK_M=g.BWD_BLOCK, BLOCK_N=g.BWD_STEP,
                                                     STAGES=g.DQ_STAGES[D], HAS_DLSE=False,
                                                     CONSUMER_REGS=g.DQ_CONSUMER_REGS), "bf16", {"DQ": "*fp32"})
        dkdv = compile_sm90(kernels.gluon_bwd_dkdv, dict(common, BLOCK_N=g.BWD_BLOCK, BLOCK_M=g.BWD_STEP,
                                                         STAGES=g.DKDV_STAGES[D], CONSUMER_REGS=g.DKDV_CONSUMER_REGS),
                            "bf16", {"DK": "*fp32", "DV": "*fp32"})
        for name, k in (("gluon_bwd_dq", dq), ("gluon_bwd_dkdv", dkdv)):
            print(f"{form}, {name}: {summarize(k)}, red.global in PTX: {k.asm['ptx'].count('red.global.add')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-compile", action="store_true")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile()
    from triton.testing import do_bench
    dev = torch.device("cuda", torch.cuda.current_device())
    forms = ("load+store", "red", "red.v2")
    rows = []
    for causal in (False, True):
        spec = AttentionSpec(FOUR, head_assignment="all", causal=causal)
        plan = build_plan(spec, N, H, D)
        lows = {f: variant(tl_lowering.TritonLowering(plan, dev, torch.bfloat16), f) for f in forms}
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        base = lows["load+store"]
        assert base.gluon_unsupported(q, k, v, False) is None
        out, lse, aux = base.forward(q, k, v)
        grads = {f: lows[f].backward(dout, None, q, k, v, out, lse, aux) for f in forms}
        torch.cuda.synchronize()
        ref = grads["load+store"]
        diff = {f: max(float((a.float() - b.float()).abs().max()) for a, b in zip(gs, ref)) for f, gs in grads.items()}
        print("max abs difference to load+store:", diff, flush=True)
        times = {(f, p): [] for f in forms for p in ("bwd", "fwd+bwd")}
        for _ in range(args.rounds):
            for f in forms:
                low = lows[f]

                def bwd():
                    low.backward(dout, None, q, k, v, out, lse, aux)

                def step():
                    o, l_, a = low.forward(q, k, v)
                    low.backward(dout, None, q, k, v, o, l_, a)
                times[(f, "bwd")].append(do_bench(bwd, warmup=5, rep=200, return_mode="median"))
                times[(f, "fwd+bwd")].append(do_bench(step, warmup=5, rep=200, return_mode="median"))
        for (f, p), ts in times.items():
            flops = plan.flops_backward + (plan.flops if p == "fwd+bwd" else 0)
            ms = sorted(ts)[len(ts) // 2]
            rows.append((f"causal={causal}", p, f, ms, float(flops) / ms / 1e9, diff[f], ts))
            print(rows[-1], flush=True)
        del q, k, v, dout, out, lse, aux, grads, ref, lows, base
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}: four-branch all mode N=64K, bf16, H={H}, D={D}; the lowering's "
          f"backward (and forward + backward), no autograd; median of {args.rounds} alternating rounds")
    print("| case | pass | adding by | ms | TFLOP/s (useful) | max abs difference to load+store | rounds |")
    print("|---|---|---|---|---|---|---|")
    for case, p, f, ms, tflops, d, ts in rows:
        print(f"| {case} | {p} | {f} | {ms:.3f} | {tflops:.0f} | {d:.1e} | {', '.join(f'{t:.3f}' for t in ts)} |")


if __name__ == "__main__":
    main()
