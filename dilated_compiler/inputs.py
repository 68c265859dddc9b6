"""The checks on q, k, v and the key padding mask that every entry point runs (the compiled module and the
reference), so that bad input gets one clear error naming what was wrong and what is allowed."""

from __future__ import annotations

import torch

from .spec import AttentionSpec

__all__ = ["FLOAT_DTYPES", "check_inputs", "check_key_padding_mask"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(spec: AttentionSpec, q, k, v, key_padding_mask=None) -> None:
    """q (B, N, H, D); k, v (B, N, Hkv, D) with Hkv dividing H; one floating dtype and one device; in grouped mode
    at least as many heads as branches; ``key_padding_mask`` None or a (B, N) bool tensor on q's device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim); got {t.dim()} dims "
                             f"{tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: {[str(d) for d in FLOAT_DTYPES]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    B, N, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != N or k.shape[3] != D:
        raise ValueError(f"k, v must match q in batch, seq and head_dim; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if min(B, N, H, D, k.shape[2]) < 1:
        raise ValueError(f"every dimension must be >= 1; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if H % k.shape[2] != 0:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide heads ({H})")
    G = spec.num_branches
    if spec.head_assignment == "grouped" and H < G:
        raise ValueError(f"grouped mode needs heads >= number of branches; got heads={H}, branches={G}. "
                         "Use more heads, fewer branches, or head_assignment: all")
    if key_padding_mask is not None:
        check_key_padding_mask(key_padding_mask, B, N, q.device)


def check_key_padding_mask(mask, batch: int, keys: int, device: torch.device, keys_name: str = "seq") -> None:
    """A (batch, keys) bool tensor on ``device``, True = ignore that key."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, keys):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor of shape (batch, {keys_name}) = {(batch, keys)}, "
                         f"True = ignore that key; got {got}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device}, the inputs on {device}")
