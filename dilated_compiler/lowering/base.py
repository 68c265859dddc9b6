"""What every lowering provides, and the registry of lowerings by backend name.

A lowering turns a concrete :class:`~dilated_compiler.planner.Plan` into callables the runtime's custom op
invokes:

* ``forward(q, k, v, key_padding_mask=None) -> (out, lse, aux)``: out like q; lse (B, H, N) float32; aux
  holds what backward needs beyond out and lse (all mode: per-branch lse (G, B, H, N) float32; grouped mode:
  an empty tensor). k, v may have fewer heads than q (grouped-query attention: q head h reads kv head
  h // (H // Hkv)). key_padding_mask: (B, N) bool, True = that key is ignored.
* ``backward(dout, dlse, q, k, v, out, lse, aux, key_padding_mask=None) -> (dq, dk, dv)``; ``dlse`` may be
  None (no gradient flows into lse).
* ``source() -> str``: what the lowering generated, for people to read.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..planner import Plan

__all__ = ["LoweredPlan", "BackendError", "register_lowering", "get_lowering", "lowerings", "aux_shape"]


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


def aux_shape(plan_spec, batch: int, heads: int, seq_len: int) -> tuple[int, ...]:
    if plan_spec.head_assignment == "all":
        return (plan_spec.num_branches, batch, heads, seq_len)
    return (0,)


def softmax_scale(plan: Plan) -> float:
    return plan.spec.softmax_scale(int(plan.head_dim))
