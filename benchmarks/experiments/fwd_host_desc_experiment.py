"""Experiment: does the forward get faster with tensor descriptors built once on the host, instead of in the
kernel per program?

dilated_fwd makes four descriptors per program (q, k, v, out over its segment's selected rows); each one is
written to global scratch and fenced (tensormap.cp_fenceproxy, fence.proxy.tensormap acquire, bar.sync) before
the first copy. With 2048-key segments a program runs only 16 key tiles, so a fixed cost per program weighs.

A host descriptor can cover a whole branch: view x (B, N, H, D) as (B, r*H, N/r, D) with strides
(N*H*D, D, r*H*D, 1): selected row j of the segment at position pos0 = s*w + o (o = the head's offset) is
[b, o*H + h, pos0 // r + j, :]. This needs N % r == 0, w % r == 0 and segments whose selected rows are a
multiple of the tile rows (tiles never cross a segment). One descriptor per branch and tensor; the kernel picks
the branch's with a uniform branch on the tile's branch id.

Variants (non-causal grouped four-branch at N = 64K, bf16, 16 heads, D = 128), each checked against the
generated kernel's output, then timed:

* generated      dilated_fwd with its default config (128x128/w8/s3, descriptors in the kernel)
* host           the same loop with per-branch host descriptors (four branches: the kernel inlines the loop
                 once per branch; one-branch specs: once)

    PYTHONPATH=. python benchmarks/experiments/fwd_host_desc_experiment.py
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import lowering as tl_lowering
from dilated_compiler.lowering.triton.autotune import TileConfig
from dilated_compiler.lowering.triton.tables import NCOLS, tile_table

LOG2E = 1.4426950408889634
NCOLS_C = tl.constexpr(NCOLS)


@triton.jit
def _tile(qd, kd, vd, od, b, combo, rbase, row0, L, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr):
    q = qd.load([b, combo, rbase + row0, 0]).reshape(BLOCK_M, HEAD_DIM)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        k = kd.load([b, combo, rbase + n0, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = vd.load([b, combo, rbase + n0, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = (acc / l_i[:, None]).to(od.dtype)
    od.store([b, combo, rbase + row0, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))
    return m_i, l_i


@triton.jit
def _fwd_host(q0, q1, q2, q3, k0, k1, k2, k3, v0, v1, v2, v3, o0, o1, o2, o3, LSE, TABLE, RB, qk_scale, H,
              stride_lb, stride_lh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ONE_BRANCH: tl.constexpr):
    row = TABLE + tl.program_id(0) * NCOLS_C
    b = tl.program_id(1)
    head = tl.load(row + 0)
    branch = tl.load(row + 1)
    pos0 = tl.load(row + 2)
    L = tl.load(row + 3)
    row0 = tl.load(row + 4)
    r = tl.load(RB + branch)
    combo = (pos0 % r) * H + head
    rbase = pos0 // r
    if ONE_BRANCH:
        m_i, l_i = _tile(q0, k0, v0, o0, b, combo, rbase, row0, L, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N)
    elif branch == 0:
        m_i, l_i = _tile(q0, k0, v0, o0, b, combo, rbase, row0, L, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N)
    elif branch == 1:
        m_i, l_i = _tile(q1, k1, v1, o1, b, combo, rbase, row0, L, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N)
    elif branch == 2:
        m_i, l_i = _tile(q2, k2, v2, o2, b, combo, rbase, row0, L, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N)
    else:
        m_i, l_i = _tile(q3, k3, v3, o3, b, combo, rbase, row0, L, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N)
    rows = row0 + tl.arange(0, BLOCK_M)
    tl.store(LSE + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + pos0 + rows * r,
             (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=rows < L)


def branch_descriptors(x: torch.Tensor, dilations, rows: int):
    """One descriptor per branch over x (B, N, H, D) viewed as (B, r*H, N/r, D)."""
    B, N, H, D = x.shape
    out = []
    for r in dilations:
        assert N % r == 0
        view = x.as_strided((B, r * H, N // r, D), (N * H * D, D, r * H * D, 1))
        out.append(TensorDescriptor.from_tensor(view, [1, 1, rows, D]))
    return out


def run_case(label, pairs, rows):
    H, D, N = 16, 128, 65536
    spec = AttentionSpec(tuple(Branch(w, r) for w, r in pairs))
    plan = build_plan(spec, N, H, D)
    low = tl_lowering.TritonLowering(plan, torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    kpm = torch.zeros(1, dtype=torch.uint8, device="cuda")
    dil = [b.dilation for b in spec.branches]
    one = len(dil) == 1
    dil4 = dil * 4 if one else dil
    rb = torch.tensor(dil, dtype=torch.int32, device="cuda")
    flops = float(plan.flops)
    cfg = TileConfig(128, 128, 8, 3)
    ref_o, ref_l = torch.zeros_like(q), torch.full((1, H, N), float("-inf"), device="cuda")
    low._launch_fwd(cfg, q, k, v, kpm, False, ref_o, ref_l)
    ms = do_bench(lambda: low._launch_fwd(cfg, q, k, v, kpm, False, ref_o, ref_l), warmup=10, rep=50,
                  return_mode="median")
    rows.append((label, "generated 128x128/w8/s3", ms, flops / ms / 1e9, 0.0, "-"))
    for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3)):
        name = f"host {bm}x{bn}/w{warps}/s{stages}"
        try:
            table = tile_table(plan, "q", bm, bn).cuda()
            o = torch.zeros_like(q)
            lse = torch.full_like(ref_l, float("-inf"))

            def run():
                descs = (branch_descriptors(q, dil4, bm) + branch_descriptors(k, dil4, bn)
                         + branch_descriptors(v, dil4, bn) + branch_descriptors(o, dil4, bm))
                return _fwd_host[(table.shape[0], 1)](
                    *descs, lse, table, rb, low.scale * LOG2E, H, lse.stride(0), lse.stride(1),
                    HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, ONE_BRANCH=one, num_warps=warps, num_stages=stages)
            kern = run()
            err = float((o.float() - ref_o.float()).norm() / ref_o.float().norm())
            fin = torch.isfinite(ref_l)
            err = max(err, float((lse - ref_l)[fin].abs().max()))
            res = f"{kern.n_regs} regs, {kern.n_spills} spills, {kern.metadata.shared // 1024} KB"
            ms = do_bench(run, warmup=10, rep=50, return_mode="median")
            rows.append((label, name, ms, flops / ms / 1e9, err, res))
        except Exception as e:
            rows.append((label, name, math.nan, math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}", "-"))
        print(rows[-1], flush=True)


def main():
    rows = []
    run_case("four-branch", ((2048, 1), (4096, 2), (8192, 4), (16384, 8)), rows)
    run_case("one branch w=2048 r=1", ((2048, 1),), rows)
    run_case("one branch w=16384 r=8", ((16384, 8),), rows)
    print(f"\n{torch.cuda.get_device_name()}: forward kernel, grouped, N=64K, bf16, 16 heads, D=128")
    print("| case | variant | ms | TFLOP/s | err | resources |\n|---|---|---|---|---|---|")
    for case, name, ms, tf, err, res in rows:
        print(f"| {case} | {name} | {ms:.3f} | {tf:.0f} | {err if isinstance(err, str) else f'{err:.1e}'} | {res} |")


if __name__ == "__main__":
    main()
