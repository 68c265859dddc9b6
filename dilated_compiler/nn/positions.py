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
    The frequencies and cos/sin tables are computed per call in float32 (cheap next to attention; no buffers, so
    casting the module to another dtype leaves positions as they were, and no size-dependent cache, so
    torch.compile sees no mutable state). XPOS in float16 is refused where its scales pass 2**10 (a ValueError
    naming the length): they grow as (7/2) ** (N / 2 / xpos_scale_base).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, xpos_scale_base: float | None = None):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim: got {head_dim!r}; rotary embedding needs an even integer >= 2")
        self.head_dim = head_dim
        self.base = float(base)
        self.xpos_scale_base = None if xpos_scale_base is None else float(xpos_scale_base)

    def _check_float16_range(self, N: int, offset: int) -> None:
        """XPOS scales q and k by zeta ** (+-(n - N // 2) / scale_base), up to (7/2) ** that for the lowest
        frequency: past float16's range at a few thousand positions."""
        reach = max(N // 2 - offset, offset + N - 1 - N // 2) / self.xpos_scale_base
        largest = 3.5 ** reach
        if largest > 2.0 ** 10:
            raise ValueError(
                f"XPOS in float16: at N={N} (offset {offset}) with xpos_scale_base={self.xpos_scale_base:g} it "
                f"scales q and k by up to {largest:.3g}, so an entry above {65504 / largest:.3g} overflows "
                "float16 (the limit checked: scales up to 2**10). Use bfloat16 or float32, or a larger "
                "xpos_scale_base")

    def extra_repr(self) -> str:
        kind = "rotary" if self.xpos_scale_base is None else f"xpos(scale_base={self.xpos_scale_base:g})"
        return f"head_dim={self.head_dim}, base={self.base:g}, {kind}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0):
        N, D = q.shape[1], self.head_dim
        if self.xpos_scale_base is not None and torch.float16 in (q.dtype, k.dtype):
            self._check_float16_range(N, offset)
        pos = torch.arange(offset, offset + N, device=q.device, dtype=torch.float32)
        f = torch.arange(0, D, 2, device=q.device, dtype=torch.float32)  # float32 whatever the module's dtype
        inv_freq = 1.0 / (self.base ** (f / D))
        angles = pos[:, None] * inv_freq[None, :]  # (N, D/2)
        angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]  # (1, N, 1, D)
        cos, sin = angles.cos(), angles.sin()
        if self.xpos_scale_base is None:
            q_scale = k_scale = 1.0
        else:
            power = ((pos - N // 2) / self.xpos_scale_base)[:, None]
            zeta = (f + 0.4 * D) / (1.4 * D)
            scale = zeta[None, :] ** power
            scale = torch.cat((scale, scale), dim=-1)[None, :, None, :]
            q_scale, k_scale = scale, 1.0 / scale
        qf, kf = q.float(), k.float()
        q_out = (qf * cos + _rotate_half(qf) * sin) * q_scale
        k_out = (kf * cos + _rotate_half(kf) * sin) * k_scale
        return q_out.to(q.dtype), k_out.to(k.dtype)
