"""``compile_attention``: a spec in, an ``nn.Module`` out."""

from __future__ import annotations

import torch
from torch import nn

from ..inputs import check_inputs
from ..lowering import BackendError, lowerings
from ..planner import build_plan
from ..spec import AttentionSpec, load_spec
from . import op as _op
from .cache import lowered, register_spec

__all__ = ["CompiledAttention", "compile_attention", "BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "torch", "triton")


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
    (batch, heads, seq) float32 in natural log (float64 inputs are computed in float64, their gradients included;
    only this lse is rounded to float32)."""

    def __init__(self, spec: AttentionSpec, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; allowed: {list(BACKENDS)}")
        if backend != "auto":
            resolve_backend(backend, torch.device("cpu"))  # raises now if the backend cannot exist here
        self.spec = spec
        self.backend = backend
        self.spec_key = register_spec(spec)

    def __setstate__(self, state):
        # unpickled (torch.load, a spawned worker): the spec registry is per process, so register the spec here too
        super().__setstate__(state)
        self.spec_key = register_spec(self.spec)

    def extra_repr(self) -> str:
        return f"spec={self.spec}, backend={self.backend!r}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask=None,
                return_lse: bool = False):
        check_inputs(self.spec, q, k, v, key_padding_mask)
        backend = resolve_backend(self.backend, q.device)
        if _op.eager_ok(q, k, v, key_padding_mask):
            out, lse, _ = _op.EagerAttention.apply(q, k, v, key_padding_mask, self.spec_key, backend)
        else:
            out, lse, _ = _op.attention(q, k, v, key_padding_mask, self.spec_key, backend)
        return (out, lse) if return_lse else out

    # ---- for people --------------------------------------------------------------------------------------
    def plan(self, seq_len=None, heads=None, head_dim=None, *, batch=1, kv_heads=None):
        """The plan at these shapes (None = symbolic)."""
        return build_plan(self.spec, seq_len, heads, head_dim, batch=batch, kv_heads=kv_heads)

    def kernel_source(self, seq_len: int, heads: int, head_dim: int, *, batch: int = 1, kv_heads=None,
                      dtype: torch.dtype = torch.float16, device="cpu") -> str:
        """What the backend generates for these shapes (Triton: kernel source; torch: the lowered plan)."""
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: got {dtype!r}; allowed: a torch.dtype (torch.float16, torch.bfloat16, "
                            "torch.float32, torch.float64)")
        device = torch.device(device)
        backend = resolve_backend(self.backend, device)
        shape = (batch, seq_len, heads, head_dim)
        return lowered(self.spec_key, backend, shape, heads if kv_heads is None else kv_heads, dtype,
                       device).source()


def compile_attention(spec_or_source, *, backend: str = "auto") -> CompiledAttention:
    """Compile a spec (AttentionSpec, dict, YAML text or path) into an attention module.

    backend: "auto" (Triton on CUDA when available, torch elsewhere), "torch" or "triton".
    Plans are compiled per (spec, shapes, dtype, device, backend) on first call and cached.
    """
    return CompiledAttention(load_spec(spec_or_source), backend=backend)
