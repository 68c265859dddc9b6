"""Run each pass once for a profiler to read: the Triton lowering's forward and backward of the four-branch
grouped pattern (N = 64K, bf16, 16 heads, D = 128), then cuDNN SDPA forward and backward over the same segments
gathered beforehand (what the speed targets are set against).

    DILATED_COMPILER_AUTOTUNE=0 ncu -k regex:'dilated|gluon|cudnn|sm90' --section SpeedOfLight ... \
        python benchmarks/profile_kernels.py
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilated_compiler import AttentionSpec, Branch, compile_attention

FOUR = ((2048, 1), (4096, 2), (8192, 4), (16384, 8))
N, H, D = 65536, 16, 128


def main():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    attn = compile_attention(AttentionSpec(tuple(Branch(w, r) for w, r in FOUR)), backend="triton")
    attn(q, k, v).backward(torch.randn_like(q))
    torch.cuda.synchronize()
    # cuDNN over pre-gathered segments: one branch's share, (segments, heads, 2048, D) with 4 heads
    qs, ks, vs = (torch.randn(N // 2048, H // 4, 2048, D, device="cuda", dtype=torch.bfloat16,
                              generator=g).requires_grad_() for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(qs, ks, vs).backward(torch.randn_like(qs))
    torch.cuda.synchronize()
    print("profiled: the lowering's forward and backward (on Hopper: gluon_fwd, gluon_bwd_dq, gluon_bwd_dkdv); "
          "cuDNN fwd/bwd on (32, 4, 2048, 128)")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py: needs a CUDA GPU (it runs the passes for a profiler to read)")
    main()
