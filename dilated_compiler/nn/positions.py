"""Rotary position embedding (RoPE, arXiv 2104.09864) and its XPOS variant (arXiv 2212.10554), applied to q
and k before the attention op. Both are relative: the score of (i, j) depends on i - j only, so they compose
with any dilated pattern (the pattern decides *which* pairs meet, the rotation *how* they score)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotaryEmbedding"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """``q, k = rotary(q, k)`` for q (B, N, H, D), k (B, N, Hkv, D) with D even; position of row n is
    ``offset + n``.

    xpos_scale_base: None for plain rotary; a number (torchscale uses 512) for XPOS, which additionally scales
    q by zeta^(n / base) and k by zeta^(-n / base) per frequency (zeta in (0, 1], decaying with frequency) so
    that scores decay with distance. XPOS is meant for causal attention (the decay is one-sided).
    The cos/sin tables are computed per call in float32 (cheap next to attention; no size-dependent cache, so
    torch.compile sees no mutable state).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, xpos_scale_base: float | None = None):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim: got {head_dim!r}; rotary embedding needs an even integer >= 2")
        self.head_dim = head_dim
        self.base = float(base)
        self.xpos_scale_base = None if xpos_scale_base is None else float(xpos_scale_base)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        zeta = (torch.arange(0, head_dim, 2, dtype=torch.float32) + 0.4 * head_dim) / (1.4 * head_dim)
        self.register_buffer("zeta", zeta, persistent=False)

    def extra_repr(self) -> str:
        kind = "rotary" if self.xpos_scale_base is None else f"xpos(scale_base={self.xpos_scale_base:g})"
        return f"head_dim={self.head_dim}, base={self.base:g}, {kind}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        N = q.shape[1]
        pos = torch.arange(offset, offset + N, device=q.device, dtype=torch.float32)
        angles = pos[:, None] * self.inv_freq.to(q.device)[None, :]  # (N, D/2)
        angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # (1, N, 1, D)
        cos, sin = angles.cos(), angles.sin()
        if self.xpos_scale_base is None:
            q_scale = k_scale = 1.0
        else:
            power = ((pos - N // 2) / self.xpos_scale_base)[:, None]
            scale = self.zeta.to(q.device)[None, :] ** power
            scale = torch.cat((scale, scale), dim=-1)[None, :, None, :]
            q_scale, k_scale = scale, 1.0 / scale
        qf, kf = q.float(), k.float()
        q_out = (qf * cos + _rotate_half(qf) * sin) * q_scale
        k_out = (kf * cos + _rotate_half(kf) * sin) * k_scale
        return q_out.to(q.dtype), k_out.to(k.dtype)
