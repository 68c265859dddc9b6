"""float32 inputs: exact products or the TF32 tensor cores?

The Triton lowering computes float32 with exact products (``input_precision="ieee"``), which run on the FMA units
at 5-10 useful TFLOP/s on an H100 (stop 37). Where torch's setting for float32 matmuls allows TF32
(``torch.backends.cuda.matmul.fp32_precision = "tf32"``; ``lowering.base.float32_products``) its products run on
the TF32 tensor cores instead. Per head_dim, on the four-branch grouped pattern at N = 16K (float32, 16 heads,
autotuning off: each precision's first tile config), this prints each form's forward and forward+backward time
and its errors against a float64 run of the torch lowering (on the CPU): the Triton lowering with each product
precision, the torch lowering (strided views, SDPA) and the naive gather + public SDPA + scatter
(``bench_triton.naive_attention``) in float32: public SDPA's memory-efficient kernel runs float32 as three TF32
products per product (CUTLASS's 3xTF32).

Three TF32 products per product (the operands split into a TF32 part and the rest, the last product of the two
rests left out) were tried as well (stop 38, H100, triton 3.6), not adopted:
- Triton's own ``input_precision="tf32x3"``: at D = 64 its forward with 32x16 tiles (Ampere-style products) took
  3.41 ms against 3.06 for the exact products (N = 8K), and its first config with Hopper's warpgroup products
  (64x16/w8) stopped with an illegal memory access;
- the same split written out in the generated kernels (three ``tl.dot(..., input_precision="tf32")``): fwd+bwd at
  N = 16K 13.9 ms (D = 64) and 32.4 ms (D = 128), against 8.8 and 14.8 for the naive float32 SDPA, with errors of
  1.5e-5 relative where SDPA's are 7e-7 to 1e-6; and one dk/dv tile config (64x16/w8, pointer loads) returned a
  wrong result (relative error 5.7).

    DILATED_COMPILER_AUTOTUNE=0 PYTHONPATH=. python benchmarks/experiments/float32_dot_experiment.py [D ...]
"""

from __future__ import annotations

import sys
import time

import torch
from triton.testing import do_bench

from benchmarks.bench_triton import naive_attention
from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.torch_lowering import TorchLowering
from dilated_compiler.lowering.triton.lowering import FLOAT32_DOTS, TritonLowering

FOUR = ((2048, 1), (4096, 2), (8192, 4), (16384, 8))
N, H = 16384, 16


def errors(got, ref) -> str:
    """Relative error in norm and the largest error relative to the largest reference entry, per tensor."""
    cells = []
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        a, b = a.double(), b.double()
        cells.append(f"{name} {float((a - b).norm() / b.norm()):.1e}/{float((a - b).abs().max() / b.abs().max()):.1e}")
    return ", ".join(cells)


def main():
    dims = [int(x) for x in sys.argv[1:]] or [64, 128]
    spec = AttentionSpec(tuple(Branch(w, r) for w, r in FOUR))
    rows = []
    t0 = time.time()
    for D in dims:
        plan = build_plan(spec, N, H, D)
        flops_f, flops_fb = float(plan.flops), float(plan.flops + plan.flops_backward)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(1, N, H, D, device="cuda", generator=g) for _ in range(4))
        ref = TorchLowering(plan, torch.device("cpu"), torch.float64)   # CUDA's torch lowering takes no float64
        q64, k64, v64, do64 = (t.cpu().double() for t in (q, k, v, dout))
        out, lse, aux = ref.forward(q64, k64, v64)
        want = [t.cuda() for t in (out, *ref.backward(do64, None, q64, k64, v64, out, lse, aux))]
        del aux
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def naive():
            return naive_attention(*leaves, spec)

        def naive_step():
            for t in leaves:
                t.grad = None
            o = naive()
            o.backward(dout)
            return o

        o = naive_step()
        got = (o.detach(), *(t.grad for t in leaves))
        with torch.no_grad():
            f = do_bench(naive, return_mode="median")
        fb = do_bench(naive_step, return_mode="median")
        rows.append((D, "naive SDPA float32", f, fb, flops_f / f / 1e9, flops_fb / fb / 1e9, errors(got, want)))
        print(rows[-1], flush=True)
        lowerings = [("torch lowering", TorchLowering(plan, torch.device("cuda"), torch.float32))]
        lowerings += [(f"triton {dot}", TritonLowering(plan, torch.device("cuda"), torch.float32, float32_dot=dot))
                      for dot in FLOAT32_DOTS]
        for form, low in lowerings:

            def fwd(low=low):
                return low.forward(q, k, v)

            def step(low=low):
                o, ls, ax = low.forward(q, k, v)
                return o, *low.backward(dout, None, q, k, v, o, ls, ax)

            got = step()
            torch.cuda.synchronize()
            f, fb = do_bench(fwd, return_mode="median"), do_bench(step, return_mode="median")
            rows.append((D, form, f, fb, flops_f / f / 1e9, flops_fb / fb / 1e9, errors(got, want)))
            print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}, float32, four-branch grouped, N = {N}, {H} heads "
          f"({time.time() - t0:.0f} s); errors against float64: relative in norm / largest over largest entry")
    print("| D | form | fwd ms | fwd+bwd ms | TFLOP/s fwd / fwd+bwd | errors |\n|---|---|---|---|---|---|")
    for D, form, f, fb, tf, tfb, err in rows:
        print(f"| {D} | {form} | {f:.3f} | {fb:.3f} | {tf:.0f} / {tfb:.0f} | {err} |")


if __name__ == "__main__":
    main()
