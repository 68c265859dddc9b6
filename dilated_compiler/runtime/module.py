"""``compile_attention``: a spec in, an ``nn.Module`` out."""

from __future__ import annotations

import torch
from torch import nn

from ..lowering import BackendError, lowerings
from ..planner import build_plan
from ..spec import AttentionSpec, load_spec
from . import op as _op
from .cache import lowered, register_spec

__all__ = ["CompiledAttention", "compile_attention", "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_available() -> bool:
    from .. import lowering
    return lowering.triton_available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` on ``device``. "auto" is Triton on CUDA, torch elsewhere."""
    if backend == "auto":
        if device.type == "cuda" and _triton_available():
            return "triton"
        return "torch"
    if backend not in lowerings():
        if backend == "triton":
            from .. import lowering
            raise BackendError(f"backend 'triton' is not available: {lowering.triton_unavailable_reason()}")
        raise BackendError(f"unknown backend {backend!r}; allowed: {list(BACKENDS)}")
    return backend


class CompiledAttention(nn.Module):
    """Dilated attention compiled from a spec. Call as ``attn(q, k, v, key_padding_mask=None,
    return_lse=False)`` with q of shape (batch, seq, heads, head_dim) and k, v of shape
    (batch, seq, kv_heads, head_dim), kv_heads dividing heads (grouped-query attention). key_padding_mask:
    (batch, seq) bool, True = ignore that key. Returns out (shape of q), or (out, lse) with lse
    (batch, heads, seq) float32 in natural log."""

    def __init__(self, spec: AttentionSpec, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; allowed: {list(BACKENDS)}")
        if backend != "auto":
            resolve_backend(backend, torch.device("cpu"))  # raises now if the backend cannot exist here
        self.spec = spec
        self.backend = backend
        self.spec_key = register_spec(spec)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, backend={self.backend!r}"

    # ---- checks ------------------------------------------------------------------------------------------
    def _check(self, q, k, v) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim); got {t.dim()} dims "
                                 f"{tuple(t.shape)}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{name} has dtype {t.dtype}; allowed: {[str(d) for d in _FLOAT_DTYPES]}")
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
        G = self.spec.num_branches
        if self.spec.head_assignment == "grouped" and H < G:
            raise ValueError(f"grouped mode needs heads >= number of branches; got heads={H}, branches={G}. "
                             "Use more heads, fewer branches, or head_assignment: all")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask=None,
                return_lse: bool = False):
        self._check(q, k, v)
        if key_padding_mask is not None:
            m = key_padding_mask
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != tuple(q.shape[:2]):
                got = f"{m.dtype} {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"key_padding_mask must be a bool tensor of shape (batch, seq) = "
                                 f"{tuple(q.shape[:2])}, True = ignore that key; got {got}")
            if m.device != q.device:
                raise ValueError(f"key_padding_mask is on {m.device}, q on {q.device}")
        backend = resolve_backend(self.backend, q.device)
        out, lse, _ = _op.attention(q, k, v, key_padding_mask, self.spec_key, backend)
        return (out, lse) if return_lse else out

    # ---- for people --------------------------------------------------------------------------------------
    def plan(self, seq_len=None, heads=None, head_dim=None, *, batch=1, kv_heads=None):
        """The plan at these shapes (None = symbolic)."""
        return build_plan(self.spec, seq_len, heads, head_dim, batch=batch, kv_heads=kv_heads)

    def kernel_source(self, seq_len: int, heads: int, head_dim: int, *, batch: int = 1, kv_heads=None,
                      dtype: torch.dtype = torch.float16, device="cpu") -> str:
        """What the backend generates for these shapes (Triton: kernel source; torch: the lowered plan)."""
        device = torch.device(device)
        backend = resolve_backend(self.backend, device)
        shape = (batch, seq_len, heads, head_dim)
        return lowered(self.spec_key, backend, shape, kv_heads or heads, dtype, device).source()


def compile_attention(spec_or_source, *, backend: str = "auto") -> CompiledAttention:
    """Compile a spec (AttentionSpec, dict, YAML text or path) into an attention module.

    backend: "auto" (Triton on CUDA when available, torch elsewhere), "torch" or "triton".
    Plans are compiled per (spec, shapes, dtype, device, backend) on first call and cached.
    """
    return CompiledAttention(load_spec(spec_or_source), backend=backend)
