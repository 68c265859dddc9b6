"""The torch lowering: the default that runs anywhere torch does (CPU and CUDA).

Each attend op of the plan becomes: a strided *view* of the rows its branch selects (no gather copy where the
layout allows), one fused SDPA kernel that also returns the log-sum-exp, and a write of the result into its rows
(grouped mode) or a log-sum-exp merge into them (all mode). Backward calls the matching fused SDPA backward per
attend op.

[Note: gradient of lse, and the all-mode merge]
A fused attention backward computes dS = P * (dP - delta) with delta_i = rowsum(dO_i * O_i). When the
result's lse also receives a gradient g, the exact rule is dS = P * (dP - (delta - g)). For a branch b merged in
all mode with weight w_b = exp(lse_b - lse), its own out receives w_b * dO and its lse receives
w_b * (dO . (O_b - O) + g); substituting gives delta_b - g_b = w_b * (dO . O - g), O the *merged* out. So each
branch's backward is called with grad_out = w_b * dO and out = O (merged), and a nonzero g is carried by one
extra zero-padded feature column: out gets -g there and grad_out gets w_b, so the kernel's own rowsum produces
w_b * (dO . O - g). q, k, v get zero columns there, which change no score.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..planner import Plan
from .base import BackendError, aux_dtype, aux_shape, register_lowering, softmax_scale

__all__ = ["TorchLowering"]

_PAD = 8  # extra feature columns for the lse gradient (8 keeps 16-byte alignment for fp16/bf16)


@dataclasses.dataclass(frozen=True)
class _Task:
    branch: int
    w: int
    r: int
    offset: int
    heads: slice
    region: str
    start: int
    segments: int
    rows: int

    @property
    def code(self) -> str:
        h = self.heads
        heads = f"{h.start}:{h.stop}" + (f":{h.step}" if h.step != 1 else "")
        if self.region == "full":
            return (f"x[:, :{self.segments * self.w}].unflatten(1, ({self.segments}, {self.w}))"
                    f"[:, :, {self.offset}::{self.r}, {heads}]")
        return f"x[:, {self.start + self.offset}::{self.r}, {heads}].unsqueeze(1)"


def _positions(x: torch.Tensor, t: _Task) -> torch.Tensor:
    """View of x (B, N, ...) at the task's selected positions: (B, S, L, ...). No copy."""
    if t.region == "full":
        return x[:, : t.segments * t.w].unflatten(1, (t.segments, t.w))[:, :, t.offset :: t.r]
    return x[:, t.start + t.offset :: t.r].unsqueeze(1)


def _rows(x: torch.Tensor, t: _Task) -> torch.Tensor:
    """View of x (B, N, H, ...) at the task's selected rows and heads: (B, S, L, Hg, ...). No copy."""
    return _positions(x, t)[:, :, :, t.heads]


def _key_mask(key_padding_mask: torch.Tensor | None, t: _Task, causal: bool, dtype: torch.dtype):
    """For a task: the additive key mask (B*S, 1, 1, L) and which rows keep at least one key (B, S, L, 1)."""
    if key_padding_mask is None:
        return None, None
    keep = ~_positions(key_padding_mask, t)  # (B, S, L)
    B, S, L = keep.shape
    additive = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
    has_key = keep.cummax(dim=-1).values if causal else keep.any(dim=-1, keepdim=True).expand(B, S, L)
    return additive.reshape(B * S, 1, 1, L), has_key[..., None]


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride along its last dimension (a copy only where it has another): the fused SDPA kernels
    below read head_dim as if it were contiguous, whatever stride they are given (public SDPA checks this and
    takes another kernel; the private entry points here do not)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _to_kernel(x5: torch.Tensor) -> torch.Tensor:
    """(B, S, L, Hg, D) -> (B*S, Hg, L, D), a view whenever strides allow."""
    B, S, L, Hg = x5.shape[:4]
    return x5.reshape(B * S, L, Hg, *x5.shape[4:]).transpose(1, 2)


def _from_kernel(y: torch.Tensor, B: int) -> torch.Tensor:
    """(B*S, Hg, L, ...) -> (B, S, L, Hg, ...) view."""
    return y.transpose(1, 2).unflatten(0, (B, -1))


# ---- fused SDPA kernels with lse, per device ------------------------------------------------------------------


def _cpu_forward(q, k, v, mask, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                      scale=scale)


def _cpu_backward(g, q, k, v, o, lse, mask, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, k, v, o, lse, 0.0, causal, attn_mask=mask, scale=scale)


def _cuda_bias(mask, q):
    # memory-efficient attention wants a bias broadcastable to (B, H, Lq, Lk) whose batch stride is a multiple
    # of 16 elements: pad the key dimension in memory, then view the first Lk columns
    if mask is None:
        return None
    L = mask.shape[-1]
    if L % 16:
        mask = F.pad(mask, (0, 16 - L % 16))[..., :L]
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], L)


def _cuda_forward(q, k, v, mask, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, _cuda_bias(mask, q), True, 0.0,
                                                                      causal, scale=scale)[:2]
    return out, lse[..., : q.shape[-2]]


def _cuda_backward(g, q, k, v, o, lse, mask, causal, scale):
    L = q.shape[-2]
    padded = -(-L // 32) * 32
    lse = F.pad(lse, (0, padded - L)) if padded != L else lse
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        g, q, k, v, _cuda_bias(mask, q), o, lse.contiguous(), zero, zero, 0.0, [True, True, True, False], causal,
        scale=scale)
    return dq, dk, dv


_KERNELS = {"cpu": (_cpu_forward, _cpu_backward), "cuda": (_cuda_forward, _cuda_backward)}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TorchLowering:
    """A plan lowered to plain torch ops. See the module docstring."""

    name = "torch"

    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype):
        if not plan.is_concrete:
            raise ValueError("the torch lowering needs a plan with concrete shapes")
        if device.type not in _KERNELS:
            raise BackendError(f"backend 'torch' runs on devices {sorted(_KERNELS)}; got {device.type!r}")
        if dtype not in _DTYPES:
            raise BackendError(f"backend 'torch' supports dtypes {[str(d) for d in _DTYPES]}; got {dtype}")
        if device.type == "cuda" and dtype == torch.float64:
            raise BackendError("backend 'torch' on CUDA supports float16, bfloat16 and float32; got float64 "
                               "(float64 runs on CPU)")
        self.plan = plan
        self.scale = softmax_scale(plan)
        self.causal = plan.spec.causal
        self.merge = plan.spec.head_assignment == "all"
        self._fwd, self._bwd = _KERNELS[device.type]
        self.tasks = [
            _Task(a.branch, a.segment_length, a.dilation, a.offset,
                  slice(int(a.head_start), int(a.head_start) + (int(a.head_count) - 1) * a.head_step + 1, a.head_step),
                  a.region, int(a.start), int(a.num_segments), int(a.rows))
            for a in plan.attend_ops
        ]
        # under GQA (query head h reads kv head h // (H // Hkv)), per task: the kv head of each of its query heads,
        # and the runs (kv head, first, count) of its query heads that share one; None without GQA
        H, kv_heads = int(plan.heads), int(plan.kv_heads)
        self._kv = [None if kv_heads == H else self._kv_map(t, H // kv_heads, device) for t in self.tasks]

    # ---- helpers --------------------------------------------------------------------------------------------
    @staticmethod
    def _kv_map(t: _Task, group: int, device: torch.device):
        kv_of = [h // group for h in range(t.heads.stop)[t.heads]]
        runs = [(j, kv_of.index(j), kv_of.count(j)) for j in sorted(set(kv_of))]  # heads ascend: one run each
        return torch.tensor(kv_of, device=device), runs

    def _kv_rows(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x (B, N, Hkv, ...) at task i's rows, for its query heads: (B, S, L, Hg, ...). Without GQA a view; with
        it, a copy of the task's rows only (never all N rows of all H heads)."""
        t = self.tasks[i]
        if self._kv[i] is None:
            return _rows(x, t)
        index = self._kv[i][0]
        return _positions(x, t).index_select(3, index if index.device == x.device else index.to(x.device))

    def _add_kv_rows(self, dx: torch.Tensor, i: int, d5: torch.Tensor) -> None:
        """Adds task i's gradient d5 (B, S, L, Hg, D) for its query heads into dx (B, N, Hkv, D): each query
        head's share goes to the kv head it read (the sum over a kv head's query heads, in head order)."""
        t = self.tasks[i]
        if self._kv[i] is None:
            _rows(dx, t).add_(d5)
            return
        rows = _positions(dx, t)
        for j, first, count in self._kv[i][1]:
            rows[:, :, :, j].add_(d5[:, :, :, first : first + count].sum(3))

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, q, k, v, key_padding_mask=None):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        B, N, H, D = q.shape
        # lse is computed in aux's dtype (float64 for float64 inputs, whose merge and backward need it) and
        # returned in float32; grouped float64 keeps the float64 lse as aux
        wide = aux_dtype(q.dtype)
        aux = torch.full(aux_shape(self.plan.spec, B, H, N, q.dtype), float("-inf"), dtype=wide, device=q.device)
        lse = aux[0] if not self.merge and wide == torch.float64 else torch.full((B, H, N), float("-inf"),
                                                                                  dtype=wide, device=q.device)
        acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) and self.merge else q.dtype
        out = torch.zeros((B, N, H, D), dtype=acc_dtype, device=q.device)
        lse_rows = lse.transpose(1, 2)  # (B, N, H) view
        for i, t in enumerate(self.tasks):
            mask, has_key = _key_mask(key_padding_mask, t, self.causal, q.dtype)
            o, l = self._fwd(_to_kernel(_rows(q, t)), _to_kernel(self._kv_rows(k, i)),
                             _to_kernel(self._kv_rows(v, i)), mask, self.causal, self.scale)
            o5 = _from_kernel(o, B)  # (B, S, L, Hg, D)
            l4 = _from_kernel(l, B)  # (B, S, L, Hg)
            if has_key is not None:  # rows whose keys are all padding: out 0, lse -inf
                o5 = torch.where(has_key[..., None], o5, 0.0)
                l4 = torch.where(has_key, l4, float("-inf"))
            if not self.merge:
                _rows(out, t).copy_(o5)
                _rows(lse_rows, t).copy_(l4)
                continue
            _rows(aux[t.branch].transpose(1, 2), t).copy_(l4)
            cur_l, cur_o = _rows(lse_rows, t), _rows(out, t)
            new_l = torch.logaddexp(cur_l, l4)
            keep = torch.where(torch.isinf(cur_l), 0.0, torch.exp(cur_l - new_l))
            take = torch.where(torch.isinf(l4), 0.0, torch.exp(l4 - new_l))
            cur_o.copy_(cur_o * keep[..., None] + o5.to(acc_dtype) * take[..., None])
            cur_l.copy_(new_l)
        return out.to(q.dtype), lse.to(torch.float32), aux

    # ---- backward -------------------------------------------------------------------------------------------
    def backward(self, dout, dlse, q, k, v, out, lse, aux, key_padding_mask=None):
        q, k, v, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
        B, N, H, D = q.shape
        # half-precision gradients are summed in float32 where a row gets more than one share: every row in "all"
        # mode (one per branch), and k and v's rows under GQA (one per query head of a kv head); in grouped mode
        # each row of dq (and of dk, dv without GQA) is written once, so those buffers keep q's dtype
        wide = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        dq = torch.zeros((B, N, H, D), dtype=wide if self.merge else q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=wide if self.merge or k.shape[2] != H else q.dtype, device=q.device)
        dv = torch.zeros_like(dk)
        dout = _unit_last(dout.to(q.dtype))
        lse_dtype = aux_dtype(q.dtype)  # what the kernels expect
        if lse_dtype == torch.float64:  # the float64 lse, not the float32 one returned (see forward)
            lse = torch.logsumexp(aux, dim=0) if self.merge else aux[0]
        lse_rows = lse.transpose(1, 2)
        dlse_rows = dlse.transpose(1, 2) if dlse is not None else None
        for i, t in enumerate(self.tasks):
            k5, v5 = self._kv_rows(k, i), self._kv_rows(v, i)
            qk, kk, vk = _to_kernel(_rows(q, t)), _to_kernel(k5), _to_kernel(v5)
            g5 = _rows(dout, t)
            if self.merge:
                l_b = _rows(aux[t.branch].transpose(1, 2), t)
                l_all = _rows(lse_rows, t)
                weight = torch.where(torch.isinf(l_b), 0.0, torch.exp(l_b - l_all))  # (B, S, L, Hg)
                g5 = (g5 * weight[..., None]).to(q.dtype)
            else:
                l_b = _rows(lse_rows, t)
                weight = None
            o5 = _rows(out, t)
            mask, _ = _key_mask(key_padding_mask, t, self.causal, q.dtype)
            # rows with no key (lse -inf) carry no gradient; any finite lse keeps the kernel's exp() at 0 there
            lk = _to_kernel(torch.where(torch.isinf(l_b), 0.0, l_b)).to(lse_dtype).contiguous()
            if dlse_rows is None:
                dqi, dki, dvi = self._bwd(_to_kernel(g5), qk, kk, vk, _to_kernel(o5), lk, mask, self.causal,
                                          self.scale)
            else:
                g_lse = torch.where(torch.isinf(l_b), 0.0, _rows(dlse_rows, t))
                o_aug = F.pad(o5, (0, _PAD))
                o_aug[..., D] = -g_lse
                g_aug = F.pad(g5, (0, _PAD))
                g_aug[..., D] = 1.0 if weight is None else weight
                pad = [_to_kernel(F.pad(x5, (0, _PAD))) for x5 in (_rows(q, t), k5, v5)]
                dqi, dki, dvi = (x[..., :D] for x in self._bwd(_to_kernel(g_aug), *pad, _to_kernel(o_aug), lk,
                                                               mask, self.causal, self.scale))
            _rows(dq, t).add_(_from_kernel(dqi, B))
            self._add_kv_rows(dk, i, _from_kernel(dki, B))
            self._add_kv_rows(dv, i, _from_kernel(dvi, B))
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)

    # ---- for people --------------------------------------------------------------------------------------
    def source(self) -> str:
        lines = [self.plan.explain(), "", "# torch lowering: per attend op, x in {q, k, v, out, lse}",
                 f"# kernel: fused SDPA with lse, causal={self.causal}, scale={self.scale:.6g}"]
        for t, a in zip(self.tasks, self.plan.attend_ops):
            lines.append(f"{a.name}: rows = {t.code}  # (B, {t.segments}, {t.rows}, heads, D)")
        lines.append("combine: " + ("log-sum-exp merge into out/lse (fp32)" if self.merge
                                    else "copy into out; unselected rows stay 0, lse -inf"))
        return "\n".join(lines)


@register_lowering("torch")
def lower_torch(plan: Plan, device: torch.device, dtype: torch.dtype) -> TorchLowering:
    return TorchLowering(plan, device, dtype)
