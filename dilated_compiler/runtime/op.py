"""The registered torch custom ops: ``dilated_compiler::attention`` and its backward.

One op for every spec and backend: the spec travels as its key (a string), so torch.compile sees a single
opaque op with a fake implementation and autograd, traced with no graph break.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..lowering.base import aux_dtype, aux_shape
from .cache import lowered, spec_for

__all__ = ["attention", "attention_backward"]


@torch.library.custom_op("dilated_compiler::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
              spec_key: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dilated attention per the spec registered under ``spec_key``. Returns (out, lse, aux)."""
    plan = lowered(spec_key, backend, q.shape, k.shape[2], q.dtype, q.device)
    out, lse, aux = plan.forward(q, k, v, key_padding_mask)
    return out, lse, aux


@attention.register_fake
def _attention_fake(q, k, v, key_padding_mask, spec_key, backend):
    B, N, H, D = q.shape
    # every lowering returns contiguous results, whatever the inputs' strides: so do the fakes (not empty_like)
    return (q.new_empty(q.shape), q.new_empty((B, H, N), dtype=torch.float32),
            q.new_empty(aux_shape(spec_for(spec_key), B, H, N, q.dtype), dtype=aux_dtype(q.dtype)))


@torch.library.custom_op("dilated_compiler::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, aux: torch.Tensor,
                       key_padding_mask: Optional[torch.Tensor], spec_key: str,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = lowered(spec_key, backend, q.shape, k.shape[2], q.dtype, q.device)
    dq, dk, dv = plan.backward(dout, dlse, q, k, v, out, lse, aux, key_padding_mask)
    return dq, dk, dv


@attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, out, lse, aux, key_padding_mask, spec_key, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, spec_key, backend = inputs
    out, lse, aux = output
    ctx.save_for_backward(q, k, v, out, lse, aux, key_padding_mask)
    ctx.spec_key, ctx.backend = spec_key, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, daux):
    q, k, v, out, lse, aux, key_padding_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_backward(dout, dlse, q, k, v, out, lse, aux, key_padding_mask, ctx.spec_key,
                                    ctx.backend)
    return dq, dk, dv, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def _double_backward(ctx, ddq, ddk, ddv):
    raise RuntimeError(
        "dilated_compiler attention has no double backward: the gradients of its gradients (e.g. "
        "torch.autograd.grad(..., create_graph=True) followed by another backward, as in a gradient penalty) are "
        "not implemented by any backend. For second-order terms on small inputs, use "
        "dilated_compiler.reference.attention (float64, plain torch autograd).")


attention_backward.register_autograd(_double_backward)
