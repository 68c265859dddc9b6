"""Transformer layers with dilated self-attention, in the MAGNETO (sub-LN) layout of arXiv 2210.06423:

    x = x + dropout(Attn(LN(x)))                       Attn has its own sub-LN before out_proj
    x = x + dropout(fc2(LN_ffn(dropout(act(fc1(LN(x)))))))

``gamma_init`` is the xavier_normal gain of v_proj, out_proj, fc1 and fc2 (q_proj, k_proj: 1). The model
classes in :mod:`dilated_compiler.models` choose it per MAGNETO from the depth.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import load_spec
from .attention import (DilatedMultiheadAttention, MultiheadCrossAttention, _check_dropout, _check_gamma_init,
                        _check_positive_int)

__all__ = ["DilatedTransformerEncoderLayer", "DilatedTransformerDecoderLayer", "FeedForward"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _activation(activation) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation: got {activation!r}; allowed: {sorted(_ACTIVATIONS)} or a callable")
        return _ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation: got {type(activation).__name__}; allowed: {sorted(_ACTIVATIONS)} or a callable")
    return activation


class FeedForward(nn.Module):
    """fc2(LN(dropout(act(fc1(x))))) with MAGNETO's sub-LN inside; xavier_normal with gain ``gamma_init``."""

    def __init__(self, d_model, dim_feedforward, *, dropout=0.0, activation="gelu", layer_norm_eps=1e-5,
                 gamma_init=1.0, device=None, dtype=None):
        super().__init__()
        d_model = _check_positive_int("d_model", d_model)
        dim_feedforward = _check_positive_int("dim_feedforward", dim_feedforward)
        factory = {"device": device, "dtype": dtype}
        self.activation = _activation(activation)
        self.fc1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.ffn_ln = nn.LayerNorm(dim_feedforward, eps=layer_norm_eps, **factory)
        self.fc2 = nn.Linear(dim_feedforward, d_model, **factory)
        self.dropout = nn.Dropout(_check_dropout(dropout))
        self.gamma_init = _check_gamma_init(gamma_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_normal_(fc.weight, gain=self.gamma_init)
            nn.init.zeros_(fc.bias)
        self.ffn_ln.reset_parameters()

    def forward(self, x):
        return self.fc2(self.ffn_ln(self.dropout(self.activation(self.fc1(x)))))


def _check_layer_args(d_model, nhead, dim_feedforward):
    for name, v in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
        _check_positive_int(name, v)


class DilatedTransformerEncoderLayer(nn.Module):
    """Pre-LN transformer layer with dilated self-attention (MAGNETO sub-LN layout, see module docstring).

    ``DilatedTransformerEncoderLayer(d_model, nhead, spec, dim_feedforward=2048, dropout=0.1,
    activation="gelu", layer_norm_eps=1e-5, gamma_init=1.0, *, num_kv_heads=None, batch_first=True,
    backend="auto", device=None, dtype=None)``; ``spec`` is anything ``load_spec`` accepts.

    ``dropout`` applies to the residual branches and inside the feed-forward block, not to attention weights
    (no backend fuses that; see :class:`DilatedMultiheadAttention`).

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` like
    ``nn.TransformerEncoderLayer``: ``src_key_padding_mask`` (batch, seq) bool, True = ignore that key;
    ``is_causal`` (or ``src_mask`` equal to the standard causal mask) runs the causal variant of the spec.
    A decoder-only language model is a stack of these with a causal spec (see ``LongNetLM``).
    """

    def __init__(self, d_model, nhead, spec, dim_feedforward=2048, dropout=0.1, activation="gelu",
                 layer_norm_eps=1e-5, gamma_init=1.0, *, num_kv_heads=None, batch_first=True, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        _check_layer_args(d_model, nhead, dim_feedforward)
        factory = {"device": device, "dtype": dtype}
        self.batch_first = bool(batch_first)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.self_attn = DilatedMultiheadAttention(
            d_model, nhead, spec, dropout=0.0, batch_first=True, num_kv_heads=num_kv_heads, gamma_init=gamma_init,
            backend=backend, **factory)
        self.self_attn.sub_ln.eps = layer_norm_eps
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout=dropout, activation=activation,
                               layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, **factory)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    @property
    def spec(self):
        return self.self_attn.spec

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src if self.batch_first else src.transpose(0, 1)
        h = self.norm1(x)
        a, _ = self.self_attn(h, h, h, key_padding_mask=src_key_padding_mask, attn_mask=src_mask,
                              is_causal=is_causal)
        x = x + self.dropout(a)
        x = x + self.dropout(self.ffn(self.norm2(x)))
        return x if self.batch_first else x.transpose(0, 1)


class DilatedTransformerDecoderLayer(nn.Module):
    """Pre-LN decoder layer: causal dilated self-attention, dense cross-attention over ``memory``
    (:class:`MultiheadCrossAttention`, torch SDPA), feed-forward; MAGNETO sub-LN layout.

    ``DilatedTransformerDecoderLayer(d_model, nhead, spec, dim_feedforward=2048, dropout=0.1,
    activation="gelu", layer_norm_eps=1e-5, gamma_init=1.0, *, num_kv_heads=None, batch_first=True,
    backend="auto", device=None, dtype=None)``. The self-attention always runs the causal variant of ``spec``
    (``dataclasses.replace(spec, causal=True)``). Following torchscale's MAGNETO decoder, ``gamma_init``
    scales the self-attention and feed-forward but not the cross-attention (gain 1).

    ``dropout`` applies to the residual branches, inside the feed-forward block and to the cross-attention's
    weights (dense SDPA supports it), not to the dilated self-attention's weights (no backend fuses that).

    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False)`` like
    ``nn.TransformerDecoderLayer``. ``tgt_is_causal`` is accepted for that signature; the self-attention is
    causal regardless. ``tgt_mask`` may be None or the standard causal mask. ``memory_mask`` (any bool/float
    mask of shape (Nt, Nm) or (batch * nhead, Nt, Nm)), ``memory_key_padding_mask`` and ``memory_is_causal``
    go to the dense cross-attention.
    """

    def __init__(self, d_model, nhead, spec, dim_feedforward=2048, dropout=0.1, activation="gelu",
                 layer_norm_eps=1e-5, gamma_init=1.0, *, num_kv_heads=None, batch_first=True, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        _check_layer_args(d_model, nhead, dim_feedforward)
        factory = {"device": device, "dtype": dtype}
        self.batch_first = bool(batch_first)
        causal_spec = dataclasses.replace(load_spec(spec), causal=True)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.self_attn = DilatedMultiheadAttention(
            d_model, nhead, causal_spec, dropout=0.0, batch_first=True, num_kv_heads=num_kv_heads,
            gamma_init=gamma_init, backend=backend, **factory)
        self.self_attn.sub_ln.eps = layer_norm_eps
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.cross_attn = MultiheadCrossAttention(d_model, nhead, dropout=dropout, batch_first=True,
                                                  num_kv_heads=num_kv_heads, gamma_init=1.0, **factory)
        self.cross_attn.sub_ln.eps = layer_norm_eps
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.ffn = FeedForward(d_model, dim_feedforward, dropout=dropout, activation=activation,
                               layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, **factory)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    @property
    def spec(self):
        return self.self_attn.spec

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = tgt if self.batch_first else tgt.transpose(0, 1)
        mem = memory if self.batch_first else memory.transpose(0, 1)
        h = self.norm1(x)
        a, _ = self.self_attn(h, h, h, key_padding_mask=tgt_key_padding_mask, attn_mask=tgt_mask)
        x = x + self.dropout(a)
        h = self.norm2(x)
        c, _ = self.cross_attn(h, mem, mem, key_padding_mask=memory_key_padding_mask, attn_mask=memory_mask,
                               is_causal=memory_is_causal)
        x = x + self.dropout(c)
        x = x + self.dropout(self.ffn(self.norm3(x)))
        return x if self.batch_first else x.transpose(0, 1)
