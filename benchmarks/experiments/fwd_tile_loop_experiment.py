"""Experiment: does a forward program that computes several query tiles of one segment run faster than one
program per tile? (One segment of the four-branch pattern has only 2048 keys: 16 key tiles of 128, so the
per-program prologue and epilogue weigh on a short loop.)

Variants, non-causal grouped four-branch at N = 64K, bf16, 16 heads, D = 128, tensor descriptors throughout:

* one      one query tile per program (what the generated dilated_fwd does)
* outer T  T consecutive query tiles per program, one after the other (descriptors made once)
* flat T   T query tiles per program in one key loop of T * (L / BLOCK_N) steps: a new tile starts by
           resetting the running max inside the loop, so the key/value loads stay software-pipelined across
           tiles

Each variant is checked against the generated kernel's output, then timed.

    PYTHONPATH=. python benchmarks/experiments/fwd_tile_loop_experiment.py
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton.autotune import TileConfig
from dilated_compiler.lowering.triton.tables import NCOLS, tile_table

LOG2E = 1.4426950408889634
NCOLS_C = tl.constexpr(NCOLS)


@triton.jit
def _fwd_multi(Q, K, V, OUT, LSE, TABLE, RB, qk_scale, stride_qb, stride_qn, stride_qh, stride_lb, stride_lh,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TPP: tl.constexpr,
               FLAT: tl.constexpr):
    row = TABLE + tl.program_id(0) * NCOLS_C
    b = tl.program_id(1).to(tl.int64)
    head = tl.load(row + 0)
    branch = tl.load(row + 1)
    pos0 = tl.load(row + 2)
    L = tl.load(row + 3)
    row0 = tl.load(row + 4)
    r = tl.load(RB + branch)
    base = b * stride_qb + head.to(tl.int64) * stride_qh + pos0.to(tl.int64) * stride_qn
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[L, HEAD_DIM], strides=[r * stride_qn, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[L, HEAD_DIM], strides=[r * stride_qn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[L, HEAD_DIM], strides=[r * stride_qn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(OUT + base, shape=[L, HEAD_DIM], strides=[r * stride_qn, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    l_base = LSE + b * stride_lb + head.to(tl.int64) * stride_lh + pos0
    n_k = L // BLOCK_N
    n_sub = tl.minimum(TPP, tl.cdiv(L - row0, BLOCK_M))
    if FLAT:
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        q = q_desc.load([row0, 0])
        for it in range(0, n_sub * n_k):
            j = it % n_k
            t = it // n_k
            if j == 0:
                q = q_desc.load([row0 + t * BLOCK_M, 0])
            k = k_desc.load([j * BLOCK_N, 0])
            v = v_desc.load([j * BLOCK_N, 0])
            s = tl.dot(q, tl.trans(k))
            m_prev = tl.where(j == 0, float("-inf"), m_i)
            m_new = tl.maximum(m_prev, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_prev - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
            if j == n_k - 1:
                o_desc.store([row0 + t * BLOCK_M, 0], (acc / l_i[:, None]).to(OUT.dtype.element_ty))
                rows = row0 + t * BLOCK_M + tl.arange(0, BLOCK_M)
                tl.store(l_base + rows * r, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=rows < L)
    else:
        for t in range(0, n_sub):
            q = q_desc.load([row0 + t * BLOCK_M, 0])
            acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
            m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            for j in range(0, n_k):
                k = k_desc.load([j * BLOCK_N, 0])
                v = v_desc.load([j * BLOCK_N, 0])
                s = tl.dot(q, tl.trans(k))
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                p = tl.math.exp2(s * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new
            o_desc.store([row0 + t * BLOCK_M, 0], (acc / l_i[:, None]).to(OUT.dtype.element_ty))
            rows = row0 + t * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(l_base + rows * r, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=rows < L)


def main():
    H, D, N = 16, 128, 65536
    spec = AttentionSpec(tuple(Branch(w, r) for w, r in ((2048, 1), (4096, 2), (8192, 4), (16384, 8))))
    plan = build_plan(spec, N, H, D)
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    kpm = torch.zeros(1, dtype=torch.uint8, device="cuda")
    rb = torch.tensor([b.dilation for b in spec.branches], dtype=torch.int32, device="cuda")
    flops = float(plan.flops)
    cfg = TileConfig(128, 128, 8, 3)
    ref_o, ref_l = torch.zeros_like(q), torch.full((1, H, N), float("-inf"), device="cuda")
    low._launch_fwd(cfg, q, k, v, kpm, False, ref_o, ref_l)
    rows = [("one (generated)", do_bench(lambda: low._launch_fwd(cfg, q, k, v, kpm, False, ref_o, ref_l),
                                         warmup=10, rep=50, return_mode="median"), 0.0)]
    tl_lowering._ensure_allocator()
    for flat in (False, True):
        for tpp in (1, 2, 4, 16):
            for bn, warps, stages in ((128, 8, 3), (64, 8, 3)):
                name = f"{'flat' if flat else 'outer'} {tpp} 128x{bn}/w{warps}/s{stages}"
                try:
                    table = tile_table(plan, "q", 128 * tpp, bn).cuda()
                    o = torch.zeros_like(q)
                    lse = torch.full_like(ref_l, float("-inf"))

                    def run():
                        _fwd_multi[(table.shape[0], 1)](
                            q, k, v, o, lse, table, rb, low.scale * LOG2E, q.stride(0), q.stride(1), q.stride(2),
                            lse.stride(0), lse.stride(1), HEAD_DIM=D, BLOCK_M=128, BLOCK_N=bn, TPP=tpp,
                            FLAT=flat, num_warps=warps, num_stages=stages)
                    run()
                    err = float((o.float() - ref_o.float()).norm() / ref_o.float().norm())
                    fin = torch.isfinite(ref_l)
                    err = max(err, float((lse - ref_l)[fin].abs().max()))
                    rows.append((name, do_bench(run, warmup=10, rep=50, return_mode="median"), err))
                except Exception as e:
                    rows.append((name, math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"))
                print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: forward kernel, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| variant | ms | TFLOP/s | err |\n|---|---|---|---|")
    for name, ms, err in sorted(rows, key=lambda r: (math.isnan(r[1]), r[1])):
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err if isinstance(err, str) else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
