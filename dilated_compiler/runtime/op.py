"""The registered torch custom ops: ``dilated_compiler::attention`` and its backward.

One op for every spec and backend: the spec travels as its key (a string), so torch.compile sees a single
opaque op with a fake implementation and autograd, traced with no graph break.

Plain eager calls (:func:`eager_ok`) take :class:`EagerAttention` instead: the same lowered plan, forward and
backward, through a ``torch.autograd.Function`` with no custom-op dispatch. On an H100's host (four-branch grouped,
bf16, benchmarks/eager_path.py; benchmarks/results/H100-triton.md, stop 39) the custom op's dispatch and autograd
wrapping cost a fwd+bwd step 0.13-0.28 ms of Python (0.94-1.07 ms against 0.74-0.83), and where the host bounds
the step, the step: 8K 0.887 -> 0.553 ms. Whatever sees operators (torch.compile and export, tracing, dispatch
modes such as FakeTensorMode, functorch transforms, tensor subclasses) gets the custom op, as before.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..lowering.base import aux_dtype, aux_shape, float32_products
from .cache import lowered, spec_for

__all__ = ["attention", "attention_backward", "EagerAttention", "eager_ok"]


@torch.library.custom_op("dilated_compiler::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
              spec_key: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dilated attention per the spec registered under ``spec_key``. Returns (out, lse, aux)."""
    out, lse, aux = _plan(q, k, spec_key, backend).forward(q, k, v, key_padding_mask)
    return out, lse, aux


def _plan(q, k, spec_key, backend):
    return lowered(spec_key, backend, q.shape, k.shape[2], q.dtype, q.device)


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
    dq, dk, dv = _plan(q, k, spec_key, backend).backward(dout, dlse, q, k, v, out, lse, aux, key_padding_mask)
    return dq, dk, dv


@attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, k, v, out, lse, aux, key_padding_mask, spec_key, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output, plan=None):
    """``plan``: EagerAttention's, whose backward runs it directly."""
    q, k, v, key_padding_mask, spec_key, backend = inputs
    out, lse, aux = output
    ctx.save_for_backward(q, k, v, out, lse, aux, key_padding_mask)
    ctx.spec_key, ctx.backend, ctx.plan = spec_key, backend, plan
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, daux):
    q, k, v, out, lse, aux, key_padding_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    plan = ctx.plan
    precision = getattr(plan, "dot_precision", None)   # None: no float32 products (or no plan)
    if precision is not None and precision != float32_products():
        # torch's float32 setting changed since the forward: the backward follows the setting it runs under, as
        # torch's own matmuls and the custom op's backward do, so it takes the plan compiled for that setting
        plan = None
    if plan is not None and not torch.is_grad_enabled():
        # EagerAttention's first-order backward: its forward's plan itself. Under create_graph the custom op runs,
        # so that a gradient of the gradients meets _double_backward's error
        dq, dk, dv = plan.backward(dout, dlse, q, k, v, out, lse, aux, key_padding_mask)
    else:
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


class EagerAttention(torch.autograd.Function):
    """:func:`attention` for plain eager calls (see the module docstring): the same plan, forward and backward, as a
    ``torch.autograd.Function``. ``EagerAttention.apply(q, k, v, key_padding_mask, spec_key, backend)`` returns
    (out, lse, aux) as the op does. Its backward reuses its forward's plan unless torch's float32 matmul setting
    changed in between; then, like the op's backward, it takes the plan for the setting it runs under."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, spec_key, backend):
        # forward(ctx, ...), not forward + setup_context: with setup_context, Function.apply binds the arguments
        # through inspect.signature on every call (host time); functorch, which needs setup_context, takes the op
        plan = _plan(q, k, spec_key, backend)
        output = plan.forward(q, k, v, key_padding_mask)
        _setup_context(ctx, (q, k, v, key_padding_mask, spec_key, backend), output, plan)
        return output

    @staticmethod
    def backward(ctx, dout, dlse, daux):
        return _backward(ctx, dout, dlse, daux)


def eager_ok(*tensors) -> bool:
    """Whether a call with these tensors (None allowed) may take :class:`EagerAttention`: not under torch.compile,
    export or tracing, no dispatch mode or functorch transform active, and every tensor a plain ``torch.Tensor``."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)
