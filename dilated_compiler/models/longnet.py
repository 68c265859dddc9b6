"""LongNet models: the paper's base hyper-parameters (arXiv 2307.02486, Sec. 4.1: 768 dim, 12 heads,
segment lengths 2048..32768 with dilations 1, 2, 4, 6, 12) on compiled dilated attention.

Attention pattern: by default every head attends through every (segment, dilation) branch, head h using offset
h mod r, and the branches are merged by their softmax denominators (paper Eq. 10-13) -- the spec's
``head_assignment: all``. ``head_assignment="grouped"`` gives each branch its own group of heads instead (the
cheaper layout of the old dilated-attention-pytorch; needs heads >= branches).

Initialisation: MAGNETO (arXiv 2210.06423) -- sub-LayerNorm in every attention and feed-forward block, and
xavier_normal with gain gamma on v_proj, out_proj, fc1, fc2 (1 on q_proj, k_proj), where gamma depends on the
depth as in torchscale's ``subln`` branch (torchscale/architecture/encoder.py and decoder.py):

* decoder-only / encoder-only with L layers: gamma = sqrt(log(2 L))
* encoder-decoder with N encoder and M decoder layers: encoder gamma = sqrt(log(3 M) * log(2 N) / 3), decoder
  gamma = sqrt(log(3 M)); the decoder's cross-attention is not scaled (gain 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer, RotaryEmbedding
from ..nn.attention import _check_positive_int
from ..spec import AttentionSpec, Branch, SpecError

__all__ = ["LongNet", "LongNetLM", "longnet_spec", "magneto_gamma"]

PAPER_SEGMENT_LENGTHS = (2048, 4096, 8192, 16384, 32768)
PAPER_DILATION_RATES = (1, 2, 4, 6, 12)


def magneto_gamma(kind: str, num_layers: int, num_decoder_layers: int | None = None) -> float:
    """MAGNETO's init gain. kind: "decoder-only" or "encoder-only" (gamma = sqrt(log(2 L))), "encoder" or
    "decoder" of an encoder-decoder model with ``num_layers`` encoder layers and ``num_decoder_layers`` decoder
    layers (see the module docstring)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers: got {num_layers!r}; allowed: an integer >= 1")
    if kind in ("decoder-only", "encoder-only"):
        return math.sqrt(math.log(2 * num_layers))
    if kind in ("encoder", "decoder"):
        M = num_decoder_layers
        if isinstance(M, bool) or not isinstance(M, int) or M < 1:
            raise ValueError(f"num_decoder_layers: got {M!r}; allowed: an integer >= 1 for kind {kind!r}")
        if kind == "encoder":
            return math.sqrt(math.log(3 * M) * math.log(2 * num_layers) / 3)
        return math.sqrt(math.log(3 * M))
    raise ValueError(f"kind: got {kind!r}; allowed: 'decoder-only', 'encoder-only', 'encoder', 'decoder'")


def longnet_spec(segment_lengths: Sequence[int], dilation_rates: Sequence[int], *, causal: bool = False,
                 head_assignment: str = "all", name: str | None = None) -> AttentionSpec:
    """The spec of LongNet's (segment length, dilation) pairs."""
    seg, dil = list(segment_lengths), list(dilation_rates)
    if len(seg) != len(dil) or not seg:
        raise ValueError(f"segment_lengths ({len(seg)}: {seg}) and dilation_rates ({len(dil)}: {dil}) must be "
                         "non-empty and of equal length: one dilation per segment length")
    problems = []
    branches = []
    for i, (w, r) in enumerate(zip(seg, dil)):
        try:
            branches.append(Branch(w, r))
        except SpecError:
            problems.append(f"segment_lengths[{i}]={w!r}, dilation_rates[{i}]={r!r}: need integers with "
                            "1 <= dilation <= segment length")
    if problems:
        raise ValueError("; ".join(problems))
    return AttentionSpec(tuple(branches), head_assignment=head_assignment, causal=causal, name=name)


class LongNet(nn.Module):
    """Encoder-decoder LongNet on embeddings: ``forward(src, tgt, *, src_key_padding_mask=None,
    tgt_key_padding_mask=None, memory_key_padding_mask=None)`` with src (B, Ns, d_model), tgt (B, Nt, d_model)
    returns (B, Nt, d_model).

    The encoder is bidirectional dilated attention (``encoder_causal=True`` makes it causal); the decoder has
    causal dilated self-attention and dense cross-attention over the encoder output. Each stack ends in a
    LayerNorm. ``memory_key_padding_mask`` defaults to ``src_key_padding_mask``.

    Differences from the old dilated-attention-pytorch ``LongNet``: its ``forward(x, is_causal=True)`` fed the
    same tensor to encoder and decoder and used dilated (equal-length) cross-attention; here source and target
    are separate and cross-attention is dense (any lengths).
    """

    def __init__(self, d_model=768, nhead=12, num_encoder_layers=12, num_decoder_layers=12, dim_feedforward=3072,
                 segment_lengths=PAPER_SEGMENT_LENGTHS, dilation_rates=PAPER_DILATION_RATES, dropout=0.0,
                 activation="gelu", layer_norm_eps=1e-5, *, encoder_causal=False, head_assignment="all",
                 num_kv_heads=None, checkpointing=False, backend="auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        spec = longnet_spec(segment_lengths, dilation_rates, causal=bool(encoder_causal),
                            head_assignment=head_assignment)
        _check_positive_int("num_encoder_layers", num_encoder_layers)
        _check_positive_int("num_decoder_layers", num_decoder_layers)
        enc_gamma = magneto_gamma("encoder", num_encoder_layers, num_decoder_layers)
        dec_gamma = magneto_gamma("decoder", num_decoder_layers, num_decoder_layers)
        common = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                      layer_norm_eps=layer_norm_eps, num_kv_heads=num_kv_heads, backend=backend, **factory)
        self.encoder_layers = nn.ModuleList(
            DilatedTransformerEncoderLayer(d_model, nhead, spec, gamma_init=enc_gamma, **common)
            for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(
            DilatedTransformerDecoderLayer(d_model, nhead, spec, gamma_init=dec_gamma, **common)
            for _ in range(num_decoder_layers))
        self.encoder_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.decoder_norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.checkpointing = bool(checkpointing)

    def _run(self, layer, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def encode(self, src, src_key_padding_mask=None):
        x = src
        for layer in self.encoder_layers:
            x = self._run(layer, x, None, src_key_padding_mask)
        return self.encoder_norm(x)

    def decode(self, tgt, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None):
        x = tgt
        for layer in self.decoder_layers:
            x = self._run(layer, x, memory, None, None, tgt_key_padding_mask, memory_key_padding_mask)
        return self.decoder_norm(x)

    def forward(self, src, tgt, *, src_key_padding_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None):
        memory = self.encode(src, src_key_padding_mask)
        if memory_key_padding_mask is None:
            memory_key_padding_mask = src_key_padding_mask
        return self.decode(tgt, memory, tgt_key_padding_mask, memory_key_padding_mask)


class LongNetLM(nn.Module):
    """Decoder-only LongNet language model: token embedding, ``depth`` pre-LN layers of causal dilated
    self-attention with rotary (or XPOS) positions applied to q and k, a final LayerNorm and an output head tied
    to the embedding. ``forward(tokens (B, N) long, key_padding_mask=None) -> logits (B, N, vocab_size)``.

    ``LongNetLM(vocab_size, dim=768, depth=12, heads=12, segment_lengths=(2048, 4096, 8192, 16384, 32768),
    dilation_rates=(1, 2, 4, 6, 12), ffn_mult=4, dropout=0.0, checkpointing=False, *, num_kv_heads=None,
    head_assignment="all", position="rotary", activation="gelu", backend="auto", device=None, dtype=None)``

    * MAGNETO: gamma = sqrt(log(2 * depth)) (torchscale decoder.py, ``subln`` branch, decoder-only).
    * ``position``: "rotary" or "xpos" (rotary with XPOS's length-extrapolating decay, scale base 512).
    * ``checkpointing=True`` recomputes each layer's activations in backward (torch.utils.checkpoint,
      use_reentrant=False, RNG state preserved so dropout masks repeat): less memory, same gradients.
    * ``key_padding_mask`` (B, N) bool, True = padding: padded tokens are never attended to.
    """

    def __init__(self, vocab_size, dim=768, depth=12, heads=12, segment_lengths=PAPER_SEGMENT_LENGTHS,
                 dilation_rates=PAPER_DILATION_RATES, ffn_mult=4, dropout=0.0, checkpointing=False, *,
                 num_kv_heads=None, head_assignment="all", position="rotary", activation="gelu", backend="auto",
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("dim", dim), ("depth", depth), ("heads", heads),
                        ("ffn_mult", ffn_mult)):
            _check_positive_int(name, v)
        if dim % heads != 0:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        head_dim = dim // heads
        if position not in ("rotary", "xpos"):
            raise ValueError(f"position: got {position!r}; allowed: 'rotary', 'xpos'")
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension; got dim // heads = {head_dim}")
        factory = {"device": device, "dtype": dtype}
        self.vocab_size, self.dim, self.depth, self.heads = vocab_size, dim, depth, heads
        self.spec = longnet_spec(segment_lengths, dilation_rates, causal=True, head_assignment=head_assignment)
        self.gamma = magneto_gamma("decoder-only", depth)
        self.embed = nn.Embedding(vocab_size, dim, **factory)
        self.layers = nn.ModuleList(
            DilatedTransformerEncoderLayer(dim, heads, self.spec, dim_feedforward=ffn_mult * dim, dropout=dropout,
                                           activation=activation, gamma_init=self.gamma,
                                           num_kv_heads=num_kv_heads, backend=backend, **factory)
            for _ in range(depth))
        rotary = RotaryEmbedding(head_dim, xpos_scale_base=512.0 if position == "xpos" else None)
        for layer in self.layers:
            layer.self_attn.rotary = rotary  # one shared module; it has no parameters
        self.norm = nn.LayerNorm(dim, **factory)
        self.checkpointing = bool(checkpointing)
        nn.init.normal_(self.embed.weight, std=dim ** -0.5)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output head's weight: the token embedding (tied)."""
        return self.embed.weight

    def forward(self, tokens, key_padding_mask=None):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            got = (f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                   else type(tokens).__name__)
            raise ValueError(f"tokens must be an integer tensor of shape (batch, seq); got {got}")
        x = self.embed(tokens)
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, None, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, None, key_padding_mask)
        return F.linear(self.norm(x), self.embed.weight)
