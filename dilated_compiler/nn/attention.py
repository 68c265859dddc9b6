"""Attention layers: :class:`DilatedMultiheadAttention` (dilated self-attention from a spec) and
:class:`MultiheadCrossAttention` (dense attention for encoder-decoder cross attention).

Both follow ``nn.MultiheadAttention``'s calling convention (``forward(query, key, value, key_padding_mask=None,
need_weights=False, attn_mask=None, average_attn_weights=True, is_causal=False)`` returning ``(out, None)``) and
the MAGNETO layout (arXiv 2210.06423): xavier_normal projections, gain ``gamma_init`` on the value and output
projections and 1 on query and key, and a sub-LayerNorm on the attention output before the output projection.

Masks follow ``nn.MultiheadAttention``: ``key_padding_mask`` is (batch, seq) bool, True = ignore that key. A
query left with no key to attend to outputs 0 (before the output projection), never NaN.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import check_key_padding_mask
from ..spec import AttentionSpec, load_spec

__all__ = ["DilatedMultiheadAttention", "MultiheadCrossAttention", "is_causal_mask"]


def is_causal_mask(attn_mask: torch.Tensor, seq_len: int) -> bool:
    """True when ``attn_mask`` is exactly the standard (seq_len, seq_len) causal mask: bool with True (= not
    allowed) strictly above the diagonal, or float with -inf strictly above the diagonal and 0 elsewhere (what
    ``nn.Transformer.generate_square_subsequent_mask`` returns). Reads the mask's values (a host sync)."""
    match = _matches_causal(attn_mask, seq_len)
    return match is not None and bool(match)


def _matches_causal(attn_mask: torch.Tensor, seq_len: int):
    """None where its shape or dtype rules ``attn_mask`` out as the standard causal mask; else a 0-dim bool tensor
    saying whether its values are those of it (not read here: no host sync)."""
    if attn_mask.dim() != 2 or tuple(attn_mask.shape) != (seq_len, seq_len):
        return None
    upper = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        return (attn_mask == upper).all()
    if attn_mask.is_floating_point():
        return (torch.isneginf(attn_mask) == upper).all() & (attn_mask.masked_fill(upper, 0) == 0).all()
    return None


def _require(valid: torch.Tensor, msg: str) -> None:
    """Raise ValueError(msg) unless the 0-dim bool tensor ``valid`` holds. Under torch.compile reading it would be
    a data-dependent branch (a graph break), so the check goes into the graph (``torch._assert_async``) and fails
    where the graph runs: a RuntimeError with ``msg`` on the CPU, a device-side assertion on CUDA."""
    if torch.compiler.is_compiling():
        torch._assert_async(valid, msg)
    elif not bool(valid):
        raise ValueError(msg)


def _bool_key_padding_mask(mask, owner: str):
    """A float key_padding_mask (0 = keep, -inf = ignore; what nn.TransformerEncoder passes on) as bool; other
    float values cannot be honoured and raise. Reads the mask's values (a host sync) for float masks only."""
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        ignore = torch.isneginf(mask)
        _require(((mask == 0) | ignore).all(), f"{owner}: a float key_padding_mask may hold only 0 (keep) and -inf "
                 "(ignore); use a bool mask (True = ignore)")
        return ignore
    return mask


def _check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"dropout: got {p!r}; allowed: a number with 0 <= dropout < 1")
    return float(p)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: got {value!r}; allowed: an integer >= 1")
    return value


def _check_gamma_init(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"gamma_init: got {value!r}; allowed: a finite number > 0")
    return float(value)


class _ProjectedAttention(nn.Module):
    """Projections, sub-LayerNorm and MAGNETO init shared by the attention layers."""

    def __init__(self, embed_dim, num_heads, *, bias, dropout, batch_first, kdim, vdim, num_kv_heads,
                 sub_layernorm, gamma_init, device, dtype):
        super().__init__()
        embed_dim = _check_positive_int("embed_dim", embed_dim)
        num_heads = _check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        num_kv_heads = num_heads if num_kv_heads is None else _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads}) "
                             "(grouped-query attention: query head h reads kv head h // (num_heads // num_kv_heads))")
        kdim = embed_dim if kdim is None else _check_positive_int("kdim", kdim)
        vdim = embed_dim if vdim is None else _check_positive_int("vdim", vdim)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim, vdim
        self.dropout = _check_dropout(dropout)
        self.batch_first = bool(batch_first)
        self.gamma_init = _check_gamma_init(gamma_init)
        factory = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim, kv_dim, bias=bias, **factory)
        self.sub_ln = nn.LayerNorm(embed_dim, **factory) if sub_layernorm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAGNETO init: xavier_normal, gain 1 on q and k, ``gamma_init`` on v and out; biases 0."""
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gamma_init),
                           (self.out_proj, self.gamma_init)):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.sub_ln is not None:
            self.sub_ln.reset_parameters()

    # ---- shared steps ----------------------------------------------------------------------------------------
    def _check_common(self, query, key, value, need_weights):
        if need_weights:
            raise ValueError(f"{type(self).__name__}: need_weights=True is not supported (the attention "
                             "weights are never formed); call with need_weights=False")
        if self.dropout > 0 and self.training and self._attention_dropout_unsupported:
            raise RuntimeError(
                f"{type(self).__name__}: attention dropout ({self.dropout}) in training mode is not supported: "
                "no backend (torch, triton) fuses dropout of attention weights. Use dropout=0.0 (apply dropout "
                "to the layer output instead), or call .eval(); in eval mode dropout is a no-op")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
            if t.dim() != 3:
                layout = "(batch, seq, features)" if self.batch_first else "(seq, batch, features)"
                raise ValueError(f"{name} must have shape {layout}; got {tuple(t.shape)}")
            if t.shape[-1] != dim:
                raise ValueError(f"{name} has {t.shape[-1]} features; this layer expects {dim}")
        if self.batch_first:
            batches = (query.shape[0], key.shape[0], value.shape[0])
        else:
            batches = (query.shape[1], key.shape[1], value.shape[1])
        if len(set(batches)) != 1:
            raise ValueError(f"query, key, value must share the batch size; got {batches}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must share batch and sequence length; got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")

    def _project(self, query, key, value):
        """(B, Nq, E), (B, Nk, kdim), (B, Nk, vdim) -> q (B, Nq, H, D), k, v (B, Nk, Hkv, D)."""
        B, Nq, _ = query.shape
        Nk = key.shape[1]
        q = self.q_proj(query).view(B, Nq, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(B, Nk, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(B, Nk, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _output(self, o):
        """(B, N, H, D) attention output -> (B, N, E) after sub-LN and the output projection."""
        o = o.reshape(o.shape[0], o.shape[1], self.embed_dim)
        if self.sub_ln is not None:
            o = self.sub_ln(o)
        return self.out_proj(o)

    _attention_dropout_unsupported = True


class DilatedMultiheadAttention(_ProjectedAttention):
    """Multi-head dilated attention with the calling convention of ``nn.MultiheadAttention``.

    Args:
        embed_dim, num_heads: as ``nn.MultiheadAttention``; num_heads divides embed_dim.
        spec: the dilated pattern: anything :func:`dilated_compiler.load_spec` accepts (AttentionSpec, dict,
            YAML text, path to a .yaml file). Its ``scale`` (None = 1/sqrt(head_dim)) and ``causal`` apply.
        bias: biases on the four projections.
        dropout: attention-weight dropout. No backend fuses it, so a value > 0 raises at forward time in
            training mode (never silently skipped); in eval mode it is a no-op.
        batch_first: True: inputs (batch, seq, feature); False: (seq, batch, feature).
        kdim, vdim: key / value feature sizes (default embed_dim).
        num_kv_heads: grouped-query attention: key/value heads (dividing num_heads); default num_heads.
        sub_layernorm: MAGNETO sub-LayerNorm on the attention output before ``out_proj``.
        gamma_init: xavier_normal gain of ``v_proj`` and ``out_proj`` (``q_proj``, ``k_proj``: gain 1).
        device, dtype: of the parameters.
        backend: "auto" | "torch" | "triton", passed to :func:`dilated_compiler.compile_attention`.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` (``nn.MultiheadAttention``'s order; ``average_attn_weights``
    has nothing to act on, as no weights are returned) returns ``(out, None)``. Dilated attention pairs query
    and key *positions*, so key and value must have the query's sequence length (for attention between
    sequences of different lengths use :class:`MultiheadCrossAttention`).

    * ``key_padding_mask`` (batch, seq) bool, True = ignore that key: honoured by every backend; padded keys get
      no weight; a query left with no key outputs 0 (before the sub-LN and output projection). A float mask
      of 0 / -inf (as ``nn.TransformerEncoder`` passes on) is read as -inf = ignore; other floats raise.
    * Causality is the *or* of ``spec.causal``, ``is_causal`` and ``attn_mask``: ``is_causal=True`` with a
      non-causal spec runs the causal variant of the spec (``dataclasses.replace(spec, causal=True)``: within
      every segment a query attends only to keys at positions <= its own). ``is_causal=False`` never turns a
      causal spec off.
    * ``attn_mask``: the only masks a dilated pattern can honour are None and the standard (seq, seq) causal
      mask (bool, True above the diagonal, or float -inf above the diagonal), which means ``is_causal=True``.
      Any other mask raises. Checking the mask reads its values (not free; prefer ``is_causal=True``).
    * Under ``torch.compile(fullgraph=True)`` both masks' values are checked in the graph, with no graph break:
      a mask that fails the check raises where the graph runs (a RuntimeError with the same message on the CPU,
      a device-side assertion on CUDA).
    * ``need_weights=True`` raises: the attention weights are never formed.

    ``rotary``: an optional module called as ``q, k = rotary(q, k)`` on the projected (batch, seq, heads,
    head_dim) tensors before attention (LongNetLM sets a :class:`~dilated_compiler.nn.RotaryEmbedding`).
    """

    def __init__(self, embed_dim, num_heads, spec, *, bias=True, dropout=0.0, batch_first=True, kdim=None,
                 vdim=None, num_kv_heads=None, sub_layernorm=True, gamma_init=1.0, device=None, dtype=None,
                 backend="auto"):
        from ..runtime import compile_attention  # the runtime registers torch.library ops; load on use

        super().__init__(embed_dim, num_heads, bias=bias, dropout=dropout, batch_first=batch_first, kdim=kdim,
                         vdim=vdim, num_kv_heads=num_kv_heads, sub_layernorm=sub_layernorm, gamma_init=gamma_init,
                         device=device, dtype=dtype)
        self.spec: AttentionSpec = load_spec(spec)
        G = self.spec.num_branches
        if self.spec.head_assignment == "grouped" and num_heads < G:
            raise ValueError(f"spec {self.spec} has {G} branches in grouped mode, which needs num_heads >= {G}; "
                             f"got num_heads={num_heads}. Use more heads, fewer branches, or head_assignment: all")
        self.backend = backend
        self.attention = compile_attention(self.spec, backend=backend)
        self.causal_attention = (self.attention if self.spec.causal
                                 else compile_attention(dataclasses.replace(self.spec, causal=True), backend=backend))
        self.register_module("rotary", None)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}, spec={self.spec}")

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self._check_common(query, key, value, need_weights)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, N, _ = query.shape
        if key.shape[1] != N:
            raise ValueError(f"{type(self).__name__}: key/value length ({key.shape[1]}) must equal the query "
                             f"length ({N}): dilated attention pairs query and key positions. For attention "
                             "between sequences of different lengths use MultiheadCrossAttention")
        causal = bool(is_causal)
        if attn_mask is not None:
            match = _matches_causal(attn_mask, N) if isinstance(attn_mask, torch.Tensor) else None
            got = (f"{attn_mask.dtype} {tuple(attn_mask.shape)}" if isinstance(attn_mask, torch.Tensor)
                   else type(attn_mask).__name__)
            msg = (f"{type(self).__name__}: cannot honour this attn_mask ({got}); a dilated pattern supports "
                   f"attn_mask=None or the standard ({N}, {N}) causal mask (bool True above the diagonal, or "
                   "float -inf above it). Use is_causal=True for causal attention and key_padding_mask for "
                   "padding; other patterns belong in the spec")
            if match is None:
                raise ValueError(msg)
            _require(match, msg)  # any other mask raises, so a mask that passes means causal
            causal = True
        key_padding_mask = _bool_key_padding_mask(key_padding_mask, type(self).__name__)
        q, k, v = self._project(query, key, value)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        attn = self.causal_attention if causal else self.attention
        o = attn(q, k, v, key_padding_mask=key_padding_mask)
        out = self._output(o)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class MultiheadCrossAttention(_ProjectedAttention):
    """Dense multi-head attention (torch SDPA) with the same projections, sub-LayerNorm, MAGNETO init and GQA
    as :class:`DilatedMultiheadAttention`; query and key may have different lengths. Used for the decoder's
    cross attention over encoder memory.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` (``nn.MultiheadAttention``'s order; ``average_attn_weights``
    has nothing to act on, as no weights are returned) returns ``(out, None)``. ``attn_mask``: (Nq, Nk) or
    (batch * num_heads, Nq, Nk), bool (True = not allowed) or float (added to the scores), as
    ``nn.MultiheadAttention``. ``key_padding_mask`` (batch, Nk)
    bool, True = ignore. A query with no allowed key outputs 0. ``dropout`` is applied to attention weights in
    training mode (SDPA supports it). ``is_causal``: query i attends keys j <= i (top-left aligned).
    """

    _attention_dropout_unsupported = False

    def __init__(self, embed_dim, num_heads, *, bias=True, dropout=0.0, batch_first=True, kdim=None, vdim=None,
                 num_kv_heads=None, sub_layernorm=True, gamma_init=1.0, scale=None, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, bias=bias, dropout=dropout, batch_first=batch_first, kdim=kdim,
                         vdim=vdim, num_kv_heads=num_kv_heads, sub_layernorm=sub_layernorm, gamma_init=gamma_init,
                         device=device, dtype=dtype)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"scale: got {scale!r}; allowed: a finite number > 0, or None for 1/sqrt(head_dim)")
        self.scale = scale

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")

    def _allowed(self, key_padding_mask, attn_mask, is_causal, B, Nq, Nk, device, dtype):
        """Additive mask (B, H or 1, Nq, Nk) in ``dtype`` or None, and (B, H or 1, Nq, 1) 'has a key' or None."""
        if key_padding_mask is None and attn_mask is None and not is_causal:
            return None, None
        H = self.num_heads
        add = torch.zeros(B, 1, Nq, Nk, dtype=dtype, device=device)
        if key_padding_mask is not None:
            check_key_padding_mask(key_padding_mask, B, Nk, device, "key_seq")
            add = add.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor):
                raise TypeError(f"attn_mask must be a tensor; got {type(attn_mask).__name__}")
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (Nq, Nk):
                am = attn_mask[None, None]
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (B * H, Nq, Nk):
                am = attn_mask.view(B, H, Nq, Nk)
            else:
                raise ValueError(f"attn_mask must have shape ({Nq}, {Nk}) or ({B * H}, {Nq}, {Nk}); "
                                 f"got {tuple(attn_mask.shape)}")
            if am.dtype == torch.bool:
                add = add.masked_fill(am, float("-inf"))
            elif am.is_floating_point():
                add = add + am.to(dtype)
            else:
                raise TypeError(f"attn_mask must be bool (True = not allowed) or float (added); got {am.dtype}")
        if is_causal:
            upper = torch.ones(Nq, Nk, dtype=torch.bool, device=device).triu(1)
            add = add.masked_fill(upper, float("-inf"))
        has_key = (add > float("-inf")).any(dim=-1, keepdim=True)
        # a row with no allowed key would give NaN (and NaN gradients for k, v): let it attend freely and zero
        # its output instead
        add = torch.where(has_key, add, 0.0)
        return add, has_key

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        self._check_common(query, key, value, need_weights)
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, Nq, _ = query.shape
        Nk = key.shape[1]
        key_padding_mask = _bool_key_padding_mask(key_padding_mask, type(self).__name__)
        q, k, v = self._project(query, key, value)
        mask, has_key = self._allowed(key_padding_mask, attn_mask, is_causal, B, Nq, Nk, q.device, q.dtype)
        group = self.num_heads // self.num_kv_heads
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           scale=self.scale)
        if has_key is not None:
            o = torch.where(has_key, o, 0.0)
        out = self._output(o.transpose(1, 2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None
