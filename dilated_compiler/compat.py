"""Drop-in replacements for the public names of dilated-attention-pytorch, as thin spec builders.

Each class turns the old constructor arguments into an :class:`~dilated_compiler.AttentionSpec` and runs the
compiled op, so it computes what the old classes were documented to compute -- exactly, on every backend:

* :class:`DilatedAttention` (``segment_lengths, dilation_rates, softmax_scale=None, attention_dropout=0.0``;
  ``forward(query, key, value, is_causal=False)`` on (b, n, h, d)): heads split into ``len(segment_lengths)``
  contiguous groups (the first ``h % groups`` groups one head larger); group i attends within segments of
  ``segment_lengths[i]`` to every ``dilation_rates[i]``-th position starting at offset ``i % dilation_rates[i]``;
  positions a group skips output 0; the result is multiplied by ``1 / len(segment_lengths)``. That constant
  scale is the one place the old output differs from the spec's grouped semantics, and it is kept so that
  numbers match the old code. The spec is ``head_assignment: grouped`` with these branches.
* :class:`MultiheadDilatedAttention` (old argument order ``embed_dim, num_heads, dilation_rates,
  segment_lengths, ...``): q/k/v projections, the attention above, MAGNETO sub-LayerNorm (``layer_norm``),
  output projection; MAGNETO init.
* :class:`ImprovedDilatedAttention`, :class:`ImprovedMultiheadDilatedAttention`: the same computations
  (the old "improved" classes were meant to compute the same thing faster; here there is one implementation).
* :func:`create_dilated_attention`, :func:`create_multihead_dilated_attention`: ``kind`` in :data:`KINDS`.

Differences from dilated-attention-pytorch
------------------------------------------
Deliberate; each fixes a bug or removes a limit of the old code.

* Sequence length: the old code required ``n`` divisible by every segment length (``view`` failed otherwise;
  the old Improved class silently skipped groups with ``n < segment``). Here any ``n`` works: the last segment
  of a branch is simply shorter (the spec semantics); for divisible ``n`` the numbers are the old ones.
* ImprovedDilatedAttention / ImprovedMultiheadDilatedAttention compute the same as the standard classes. The
  old ones ran SDPA over the heads axis instead of the tokens (a different, wrong result) -- and "improved"
  was what ``kind="auto"`` picked. Here ``"auto"`` is ``"standard"``.
* ``softmax_scale`` is honoured (the old non-xFormers path ignored it and used 1/sqrt(d)).
* Attention dropout: the old code applied dropout twice (on attention weights and again on the output). No
  backend here fuses attention-weight dropout, so ``attention_dropout``/``dropout`` > 0 raises a clear error at
  forward time in training mode; in eval mode it is a no-op (as before).
* Masks: the old multihead classes accepted ``key_padding_mask`` and ``attn_mask`` and silently dropped them
  (and the old DilatedAttention ignored ``attention_mask``). Here ``key_padding_mask`` ((b, n) bool, True =
  ignore) is honoured; ``attn_mask`` / ``attention_mask`` may only be None or the standard causal mask (same
  as ``is_causal=True``); anything else raises.
* ``need_weights=True`` raises (the old code returned ``None`` for the weights). With ``need_weights=False``
  the multihead classes return the output tensor alone, as the old ones did.
* LayerNorm: the old multihead classes applied LayerNorms to q and k and reused the q LayerNorm as the
  sub-LayerNorm by accident. Here ``layer_norm=True`` means one sub-LayerNorm (``sub_ln``) before ``out_proj``,
  as in MAGNETO; nothing normalises q and k. Parameter names ``q_proj, k_proj, v_proj, out_proj`` match the
  old standard class (the old Improved class had a fused ``qkv_proj``).
* Init: both multihead classes use MAGNETO init (xavier_normal, gain ``gamma_init`` on v_proj and out_proj,
  1 on q_proj and k_proj). The old standard class put ``gamma_init`` on q and k too; the two differed.
* Performance knobs of the old code (``use_tf32``, ``op``, ``enable_memory_pool``, ``enable_profiling``,
  ``lightweight_pool``) are accepted and ignored; in particular global TF32 flags are never changed. Any other
  unknown keyword raises ``TypeError`` (the old factory silently dropped them).
* The factories' first parameter is ``kind`` (the old name ``attention_type=`` is accepted as a keyword).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import nn

from .nn.attention import DilatedMultiheadAttention, is_causal_mask
from .spec import AttentionSpec, Branch

__all__ = ["DilatedAttention", "ImprovedDilatedAttention", "MultiheadDilatedAttention",
           "ImprovedMultiheadDilatedAttention", "create_dilated_attention", "create_multihead_dilated_attention",
           "KINDS", "old_spec"]

# Keywords of the old code that only tuned its performance; accepted and ignored.
_IGNORED = ("use_tf32", "op", "enable_memory_pool", "enable_profiling", "lightweight_pool")
_OLD_DEFAULT_SEGMENTS = [2048, 4096, 8192]
_OLD_DEFAULT_DILATIONS = [1, 2, 4]


def old_spec(segment_lengths: Sequence[int], dilation_rates: Sequence[int], softmax_scale: float | None = None,
             *, owner: str = "DilatedAttention") -> AttentionSpec:
    """The grouped spec the old (segment_lengths, dilation_rates) describe; errors name the old arguments."""
    try:
        seg, dil = list(segment_lengths), list(dilation_rates)
    except TypeError:
        raise TypeError(f"{owner}: segment_lengths and dilation_rates must be sequences of integers; got "
                        f"{segment_lengths!r} and {dilation_rates!r}") from None
    if not seg or len(seg) != len(dil):
        raise ValueError(f"{owner}: segment_lengths ({seg}) and dilation_rates ({dil}) must be non-empty and of "
                         "equal length (one dilation rate per segment length)")
    problems = []
    for i, (s, r) in enumerate(zip(seg, dil)):
        s_ok = isinstance(s, int) and not isinstance(s, bool) and s >= 1
        if not s_ok:
            problems.append(f"segment_lengths[{i}]: got {s!r}; allowed: an integer >= 1")
        if not (isinstance(r, int) and not isinstance(r, bool) and r >= 1 and (not s_ok or r <= s)):
            problems.append(f"dilation_rates[{i}]: got {r!r}; allowed: an integer with 1 <= dilation_rates[{i}] <= "
                            f"segment_lengths[{i}]")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and not isinstance(softmax_scale, bool)
                                          and math.isfinite(softmax_scale) and softmax_scale > 0):
        problems.append(f"softmax_scale: got {softmax_scale!r}; allowed: a finite number > 0 or None for "
                        "1/sqrt(head_dim)")
    if problems:
        raise ValueError(f"{owner}: " + "; ".join(problems))
    return AttentionSpec(tuple(Branch(s, r) for s, r in zip(seg, dil)), head_assignment="grouped",
                         scale=softmax_scale)


def _check_ignored(owner: str, legacy: dict, allowed: Sequence[str] = ()) -> None:
    unknown = sorted(k for k in legacy if k not in _IGNORED)
    if unknown:
        raise TypeError(f"{owner}: unexpected keyword argument(s) {unknown}; accepted: {list(allowed)}, and "
                        f"(ignored, old performance knobs) {list(_IGNORED)}")


def _check_mask_is_causal(owner: str, mask, n: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or not is_causal_mask(mask, n):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{owner}: cannot honour this attention mask ({got}); supported: None or the standard "
                         f"({n}, {n}) causal mask (same as is_causal=True). Use key_padding_mask for padding")


class DilatedAttention(nn.Module):
    """The old ``DilatedAttention``: dilated attention on (b, n, h, d) with the old numbers (see module doc).

    ``DilatedAttention(segment_lengths, dilation_rates, softmax_scale=None, attention_dropout=0.0, *,
    backend="auto")``; ``forward(query, key, value, is_causal=False, attention_mask=None, *,
    key_padding_mask=None)``. key/value may have fewer heads than query (grouped-query attention).
    """

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 softmax_scale: float | None = None, attention_dropout: float = 0.0, *, backend: str = "auto",
                 **legacy):
        from .runtime import compile_attention

        super().__init__()
        _check_ignored(type(self).__name__, legacy, ["segment_lengths", "dilation_rates", "softmax_scale",
                                                     "attention_dropout", "backend"])
        self.spec = old_spec(segment_lengths, dilation_rates, softmax_scale, owner=type(self).__name__)
        if isinstance(attention_dropout, bool) or not isinstance(attention_dropout, (int, float)) or not (
                0.0 <= attention_dropout < 1.0):
            raise ValueError(f"attention_dropout: got {attention_dropout!r}; allowed: 0 <= attention_dropout < 1")
        self.segment_lengths = list(segment_lengths)
        self.dilation_rates = list(dilation_rates)
        self.softmax_scale = softmax_scale
        self.dropout = float(attention_dropout)
        self.num_groups = len(self.segment_lengths)
        self.attention = compile_attention(self.spec, backend=backend)
        self.causal_attention = compile_attention(dataclasses.replace(self.spec, causal=True), backend=backend)

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"softmax_scale={self.softmax_scale}, dropout={self.dropout}")

    def forward(self, query, key, value, is_causal: bool = False, attention_mask=None, *, key_padding_mask=None):
        name = type(self).__name__
        if self.dropout > 0 and self.training:
            raise RuntimeError(f"{name}: attention_dropout ({self.dropout}) in training mode is not supported: no "
                               "backend fuses dropout of attention weights. Use attention_dropout=0.0, or .eval()")
        if isinstance(query, torch.Tensor) and query.dim() == 4:
            _check_mask_is_causal(name, attention_mask, query.shape[1])
        if attention_mask is not None:
            is_causal = True
        attn = self.causal_attention if is_causal else self.attention
        return attn(query, key, value, key_padding_mask=key_padding_mask) / self.num_groups


class ImprovedDilatedAttention(DilatedAttention):
    """The old ``ImprovedDilatedAttention(segment_lengths, dilation_rates, dropout=0.0, use_tf32=True)``:
    the same computation as :class:`DilatedAttention` (the old one computed attention over the wrong axis)."""

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], dropout: float = 0.0,
                 use_tf32: bool = True, *, softmax_scale: float | None = None, backend: str = "auto", **legacy):
        super().__init__(segment_lengths, dilation_rates, softmax_scale=softmax_scale, attention_dropout=dropout,
                         backend=backend, **legacy)


class MultiheadDilatedAttention(DilatedMultiheadAttention):
    """The old ``MultiheadDilatedAttention`` (old argument order):

    ``MultiheadDilatedAttention(embed_dim, num_heads, dilation_rates, segment_lengths, dropout=0.0, bias=True,
    layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0, device=None, dtype=None, *, backend="auto")``.

    ``forward(query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
    is_causal=False, average_attn_weights=True)`` on (batch, seq, embed_dim) returns the output tensor, as the
    old class did (key/value default to query). The attention is the old :class:`DilatedAttention` (including
    its 1/len(segment_lengths) scale). It is a :class:`dilated_compiler.nn.DilatedMultiheadAttention`
    underneath; see the module docstring for every difference from the old class.
    """

    def __init__(self, embed_dim: int, num_heads: int, dilation_rates: Sequence[int], segment_lengths: Sequence[int],
                 dropout: float = 0.0, bias: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, device=None, dtype=None, *, backend: str = "auto", **legacy):
        owner = type(self).__name__
        _check_ignored(owner, legacy, ["embed_dim", "num_heads", "dilation_rates", "segment_lengths", "dropout",
                                       "bias", "layer_norm", "layer_norm_eps", "gamma_init", "device", "dtype",
                                       "backend"])
        spec = old_spec(segment_lengths, dilation_rates, owner=owner)
        super().__init__(embed_dim, num_heads, spec, bias=bias, dropout=dropout, batch_first=True,
                         sub_layernorm=layer_norm, gamma_init=gamma_init, device=device, dtype=dtype,
                         backend=backend)
        if self.sub_ln is not None:
            self.sub_ln.eps = layer_norm_eps
        self.segment_lengths = list(segment_lengths)
        self.dilation_rates = list(dilation_rates)
        self.num_groups = len(self.segment_lengths)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
                is_causal=False, average_attn_weights=True):
        key = query if key is None else key
        value = query if value is None else value
        out, _ = super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                 attn_mask=attn_mask, is_causal=is_causal)
        return out

    def _output(self, o):
        # the old DilatedAttention's constant 1/num_groups, before the sub-LN and output projection
        return super()._output(o / self.num_groups)


class ImprovedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """The old ``ImprovedMultiheadDilatedAttention``: same arguments and computation as
    :class:`MultiheadDilatedAttention` (``use_tf32`` accepted and ignored)."""

    def __init__(self, embed_dim: int, num_heads: int, dilation_rates: Sequence[int], segment_lengths: Sequence[int],
                 dropout: float = 0.0, bias: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, device=None, dtype=None, use_tf32: bool = True, *, backend: str = "auto",
                 **legacy):
        super().__init__(embed_dim, num_heads, dilation_rates, segment_lengths, dropout, bias, layer_norm,
                         layer_norm_eps, gamma_init, device, dtype, backend=backend, **legacy)


# kind -> (attention class, multihead class). Later kinds (ring, block-sparse) register here.
KINDS: dict[str, tuple[type, type]] = {
    "standard": (DilatedAttention, MultiheadDilatedAttention),
    "improved": (ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention),
}
_AUTO = "standard"


def _resolve_kind(kind, attention_type, factory: str) -> str:
    if attention_type is not None:
        if kind not in (None, "auto") and kind != attention_type:
            raise TypeError(f"{factory}: got both kind={kind!r} and attention_type={attention_type!r}; pass one")
        kind = attention_type
    kind = "auto" if kind is None else kind
    if kind == "auto":
        return _AUTO
    if kind not in KINDS:
        raise ValueError(f"{factory}: unknown kind {kind!r}; known kinds: {['auto', *KINDS]}")
    return kind


def create_dilated_attention(kind: str = "auto", segment_lengths: Sequence[int] | None = None,
                             dilation_rates: Sequence[int] | None = None, *, attention_type: str | None = None,
                             **kwargs) -> DilatedAttention:
    """The old factory: ``kind`` in "auto" | "standard" | "improved" ("auto" = "standard"). Defaults as the old
    one: segment_lengths [2048, 4096, 8192], dilation_rates [1, 2, 4]. Keywords: ``softmax_scale``,
    ``attention_dropout`` (or the old config name ``dropout``), ``backend``; old performance knobs are ignored."""
    kind = _resolve_kind(kind, attention_type, "create_dilated_attention")
    seg = list(_OLD_DEFAULT_SEGMENTS if segment_lengths is None else segment_lengths)
    dil = list(_OLD_DEFAULT_DILATIONS if dilation_rates is None else dilation_rates)
    if "dropout" in kwargs:
        if "attention_dropout" in kwargs:
            raise TypeError("create_dilated_attention: pass dropout or attention_dropout, not both")
        kwargs["attention_dropout"] = kwargs.pop("dropout")
    for k in ("device", "dtype"):  # the old config carried them; this module has no parameters
        kwargs.pop(k, None)
    allowed = ("softmax_scale", "attention_dropout", "backend")
    legacy = {k: v for k, v in kwargs.items() if k not in allowed}
    _check_ignored("create_dilated_attention", legacy, ["segment_lengths", "dilation_rates", "dropout", *allowed])
    known = {k: v for k, v in kwargs.items() if k in allowed}
    return DilatedAttention(seg, dil, **known) if kind == "standard" else KINDS[kind][0](
        seg, dil, softmax_scale=known.get("softmax_scale"), dropout=known.get("attention_dropout", 0.0),
        backend=known.get("backend", "auto"))


def create_multihead_dilated_attention(kind: str = "auto", embed_dim: int = 768, num_heads: int = 12,
                                       segment_lengths: Sequence[int] | None = None,
                                       dilation_rates: Sequence[int] | None = None, *,
                                       attention_type: str | None = None, **kwargs) -> MultiheadDilatedAttention:
    """The old factory: ``kind`` in "auto" | "standard" | "improved" ("auto" = "standard"). Defaults as the old
    one (embed_dim 768, num_heads 12, segment_lengths [2048, 4096, 8192], dilation_rates [1, 2, 4]). Keywords:
    dropout, bias, layer_norm, layer_norm_eps, gamma_init, device, dtype, backend; old performance knobs are
    ignored."""
    kind = _resolve_kind(kind, attention_type, "create_multihead_dilated_attention")
    seg = list(_OLD_DEFAULT_SEGMENTS if segment_lengths is None else segment_lengths)
    dil = list(_OLD_DEFAULT_DILATIONS if dilation_rates is None else dilation_rates)
    allowed = ("dropout", "bias", "layer_norm", "layer_norm_eps", "gamma_init", "device", "dtype", "backend")
    legacy = {k: v for k, v in kwargs.items() if k not in allowed}
    _check_ignored("create_multihead_dilated_attention", legacy, ["embed_dim", "num_heads", "segment_lengths",
                                                                  "dilation_rates", *allowed])
    known = {k: v for k, v in kwargs.items() if k in allowed}
    return KINDS[kind][1](embed_dim, num_heads, dil, seg, **known)
