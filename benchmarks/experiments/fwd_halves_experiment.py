"""Experiment: does splitting a forward program's 128-row query tile into two 64-row halves, with their steps
interleaved in the key loop, let the tensor cores work on one half while the other half's softmax runs?

A profile (benchmarks/profile_kernels.py under ncu, H100) showed the generated dilated_fwd keeping the tensor
pipe busy 50% of the time on the four-branch 64K pattern, against 73% for cuDNN's warp-specialised kernel on the
same segments. In one instruction stream, S_b = Q_b K^T can be issued before the softmax of S_a, and P_a V before
the softmax of S_b, so an asynchronous matmul is in flight during each softmax.

Variants (non-causal grouped four-branch at N = 64K, bf16, 16 heads, D = 128, tensor descriptors; every segment
there has 2048 selected rows, so the kernels here need no masks):

* generated   the generated dilated_fwd (128x128/w8/s3)
* whole       the same computation written here with one 128-row tile (checks that this file's kernel matches)
* halves      two 64-row halves, steps interleaved

Each variant is checked against the generated kernel's output, then timed.

    PYTHONPATH=. python benchmarks/experiments/fwd_halves_experiment.py
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
def _softmax_step(s, m_i, l_i, acc, v, qk_scale):
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _fwd_exp(Q, K, V, OUT, LSE, TABLE, RB, qk_scale, stride_qb, stride_qn, stride_qh, stride_lb, stride_lh,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HALVES: tl.constexpr):
    row = TABLE + tl.program_id(0) * NCOLS_C
    b = tl.program_id(1).to(tl.int64)
    head = tl.load(row + 0)
    branch = tl.load(row + 1)
    pos0 = tl.load(row + 2)
    L = tl.load(row + 3)
    row0 = tl.load(row + 4)
    r = tl.load(RB + branch)
    base = b * stride_qb + head.to(tl.int64) * stride_qh + pos0.to(tl.int64) * stride_qn
    PART: tl.constexpr = BLOCK_M // 2 if HALVES else BLOCK_M
    q_desc = tl.make_tensor_descriptor(Q + base, shape=[L, HEAD_DIM], strides=[r * stride_qn, 1],
                                       block_shape=[PART, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[L, HEAD_DIM], strides=[r * stride_qn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[L, HEAD_DIM], strides=[r * stride_qn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(OUT + base, shape=[L, HEAD_DIM], strides=[r * stride_qn, 1],
                                       block_shape=[PART, HEAD_DIM])
    l_base = LSE + b * stride_lb + head.to(tl.int64) * stride_lh + pos0
    qa = q_desc.load([row0, 0])
    acc_a = tl.zeros([PART, HEAD_DIM], dtype=tl.float32)
    m_a = tl.full([PART], float("-inf"), dtype=tl.float32)
    l_a = tl.zeros([PART], dtype=tl.float32)
    if HALVES:
        qb = q_desc.load([row0 + PART, 0])
        acc_b = tl.zeros([PART, HEAD_DIM], dtype=tl.float32)
        m_b = tl.full([PART], float("-inf"), dtype=tl.float32)
        l_b = tl.zeros([PART], dtype=tl.float32)
        for n0 in range(0, L, BLOCK_N):
            k = k_desc.load([n0, 0])
            v = v_desc.load([n0, 0])
            s_a = tl.dot(qa, tl.trans(k))
            s_b = tl.dot(qb, tl.trans(k))
            m_a, l_a, acc_a = _softmax_step(s_a, m_a, l_a, acc_a, v, qk_scale)
            m_b, l_b, acc_b = _softmax_step(s_b, m_b, l_b, acc_b, v, qk_scale)
        o_desc.store([row0 + PART, 0], (acc_b / l_b[:, None]).to(OUT.dtype.element_ty))
        rows_b = row0 + PART + tl.arange(0, PART)
        tl.store(l_base + rows_b * r, (m_b + tl.math.log2(l_b)) * 0.6931471805599453)
    else:
        for n0 in range(0, L, BLOCK_N):
            k = k_desc.load([n0, 0])
            v = v_desc.load([n0, 0])
            s_a = tl.dot(qa, tl.trans(k))
            m_a, l_a, acc_a = _softmax_step(s_a, m_a, l_a, acc_a, v, qk_scale)
    o_desc.store([row0, 0], (acc_a / l_a[:, None]).to(OUT.dtype.element_ty))
    rows_a = row0 + tl.arange(0, PART)
    tl.store(l_base + rows_a * r, (m_a + tl.math.log2(l_a)) * 0.6931471805599453)


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
    rows = [("generated 128x128/w8/s3", do_bench(lambda: low._launch_fwd(cfg, q, k, v, kpm, False, ref_o, ref_l),
                                                 warmup=10, rep=50, return_mode="median"), 0.0)]
    tl_lowering._ensure_allocator()
    table = tile_table(plan, "q", 128, 128).cuda()
    for halves in (False, True):
        for bn, warps, stages in ((128, 8, 3), (128, 8, 2), (64, 8, 3), (64, 8, 4)):
            name = f"{'halves' if halves else 'whole'} 128x{bn}/w{warps}/s{stages}"
            try:
                o = torch.zeros_like(q)
                lse = torch.full_like(ref_l, float("-inf"))

                def run():
                    return _fwd_exp[(table.shape[0], 1)](
                        q, k, v, o, lse, table, rb, low.scale * LOG2E, q.stride(0), q.stride(1), q.stride(2),
                        lse.stride(0), lse.stride(1), HEAD_DIM=D, BLOCK_M=128, BLOCK_N=bn, HALVES=halves,
                        num_warps=warps, num_stages=stages)
                kern = run()
                err = float((o.float() - ref_o.float()).norm() / ref_o.float().norm())
                fin = torch.isfinite(ref_l)
                err = max(err, float((lse - ref_l)[fin].abs().max()))
                res = f"{kern.n_regs} regs, {kern.n_spills} spills, {kern.metadata.shared // 1024} KB"
                rows.append((name, do_bench(run, warmup=10, rep=50, return_mode="median"), err, res))
            except Exception as e:
                rows.append((name, math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:70]}", "-"))
            print(rows[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name()}: forward kernel, four-branch grouped N=64K, bf16, H={H}, D={D}")
    print("| variant | ms | TFLOP/s | err | resources |\n|---|---|---|---|---|")
    for name, ms, err, *res in sorted(rows, key=lambda r: (math.isnan(r[1]), r[1])):
        print(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.0f} | {err if isinstance(err, str) else f'{err:.1e}'} | "
              f"{res[0] if res else '-'} |")


if __name__ == "__main__":
    main()
