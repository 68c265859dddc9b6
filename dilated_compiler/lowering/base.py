"""What every lowering provides, and the registry of lowerings by backend name.

A lowering turns a concrete :class:`~dilated_compiler.planner.Plan` into callables the runtime's custom op
invokes:

* ``forward(q, k, v, key_padding_mask=None) -> (out, lse, aux)``: out like q; lse (B, H, N) float32; aux
  holds what backward needs beyond out and lse, in ``aux_dtype`` (all mode: per-branch lse (G, B, H, N);
  grouped mode: an empty tensor, or for float64 inputs lse itself in float64, (1, B, H, N): the backward of
  float64 inputs reads its lse there, not in the float32 lse, so that their gradients keep float64 precision).
  k, v may have fewer heads than q (grouped-query attention: q head h reads kv head h // (H // Hkv)).
  key_padding_mask: (B, N) bool, True = that key is ignored.
* ``backward(dout, dlse, q, k, v, out, lse, aux, key_padding_mask=None) -> (dq, dk, dv)``; ``dlse`` may be
  None (no gradient flows into lse).
* ``source() -> str``: what the lowering generated, for people to read.
* optionally ``dot_precision``: the float32 products' precision a lowering fixed when it compiled (see
  :func:`float32_products`); the runtime's cache files the plan under it.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..planner import Plan

__all__ = ["LoweredPlan", "BackendError", "register_lowering", "get_lowering", "lowerings", "aux_shape", "aux_dtype",
           "float32_products"]


class BackendError(ValueError):
    """A backend that cannot run the request (unknown name, unsupported device or dtype, not installed)."""


class LoweredPlan(Protocol):
    plan: Plan

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask=None): ...

    def backward(self, dout, dlse, q, k, v, out, lse, aux, key_padding_mask=None): ...

    def source(self) -> str: ...


# name -> factory(plan, device: torch.device, dtype) -> LoweredPlan
_LOWERINGS: dict[str, Callable[..., LoweredPlan]] = {}


def register_lowering(name: str):
    def deco(factory):
        _LOWERINGS[name] = factory
        return factory
    return deco


def lowerings() -> tuple[str, ...]:
    return tuple(_LOWERINGS)


def get_lowering(name: str) -> Callable[..., LoweredPlan]:
    if name not in _LOWERINGS:
        raise BackendError(f"unknown backend {name!r}; available: {sorted(_LOWERINGS)}")
    return _LOWERINGS[name]


def float32_products() -> str:
    """How float32 matrix products run where a backend chooses: ``"tf32"`` (TensorFloat-32 tensor cores) where
    torch's setting for float32 matmuls on CUDA allows it (``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
    which ``torch.set_float32_matmul_precision("high")`` and ``allow_tf32 = True`` also set; the rule
    torch.compile's generated kernels follow), else ``"ieee"`` (exact; torch's default)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # a torch without the per-backend setting
        return "tf32" if matmul.allow_tf32 else "ieee"
    return "tf32" if precision == "tf32" else "ieee"


def aux_shape(plan_spec, batch: int, heads: int, seq_len: int, dtype: torch.dtype | None = None) -> tuple[int, ...]:
    """The shape of a lowering's aux output for inputs of ``dtype``: see the module docstring."""
    if plan_spec.head_assignment == "all":
        return (plan_spec.num_branches, batch, heads, seq_len)
    return (1, batch, heads, seq_len) if dtype == torch.float64 else (0,)


def aux_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of aux (and of the lse a lowering computes in) for inputs of ``dtype``: float64 for float64
    inputs, float32 otherwise. The lse the op returns is float32 whatever the inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_scale(plan: Plan) -> float:
    return plan.spec.softmax_scale(int(plan.head_dim))
