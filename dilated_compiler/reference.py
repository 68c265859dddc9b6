"""The exact semantics of a spec, as a slow, obviously correct float64 implementation.

Every backend and every layer is tested against this module; production paths never call it.

Definitions (inputs q: (B, N, H, D); k, v: (B, N, Hkv, D) with Hkv dividing H, head h reading kv head
h // (H // Hkv); output: the shape of q; lse: (B, H, N), natural log):

* A branch (w, r, offset) cuts the sequence into segments [s*w, min((s+1)*w, N)); in each it *selects*
  the positions s*w + offset + j*r inside the segment. A selected query attends, by softmax(q k^T * scale),
  to the selected keys of its own segment (with ``causal``: only to those at positions <= its own).
* grouped: heads split into len(branches) contiguous groups (sizes H // G, the first H % G one larger);
  group i uses branch i with the branch's offset if given, else i % r_i. Unselected positions output 0 and
  lse -inf.
* all: every head attends through every branch (head h uses offset h % r_i); at each position the branch
  results that exist are merged by log-sum-exp: lse = logsumexp_i lse_i, out = sum_i exp(lse_i - lse) out_i.
* ``key_padding_mask`` (B, N) bool, True = ignore: such keys get no weight anywhere.
* A row that attends to nothing outputs 0 with lse -inf, never NaN.
"""

from __future__ import annotations

import math

import torch

from .inputs import check_inputs
from .spec import AttentionSpec, load_spec

__all__ = ["attention", "allowed_pairs", "head_branches", "head_masks", "masked_softmax_attention"]


def head_branches(spec: AttentionSpec, num_heads: int) -> list[list[tuple[int, int, int]]]:
    """For each head, the (segment_length, dilation, offset) of every branch it attends through."""
    G = spec.num_branches
    if spec.head_assignment == "all":
        return [[(b.segment_length, b.dilation, h % b.dilation) for b in spec.branches] for h in range(num_heads)]
    if num_heads < G:
        raise ValueError(f"grouped mode needs heads >= branches; got heads={num_heads}, branches={G}")
    result = []
    for i, b in enumerate(spec.branches):
        size = num_heads // G + (1 if i < num_heads % G else 0)
        offset = b.offset if b.offset is not None else i % b.dilation
        result += [[(b.segment_length, b.dilation, offset)]] * size
    return result


def allowed_pairs(n: int, w: int, r: int, offset: int, causal: bool) -> torch.Tensor:
    """(n, n) bool: entry [i, j] is True when query i attends to key j through branch (w, r, offset)."""
    pos = torch.arange(n)
    segment = pos // w
    local = pos - segment * w
    selected = (local >= offset) & ((local - offset) % r == 0)
    allowed = selected[:, None] & selected[None, :] & (segment[:, None] == segment[None, :])
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    return allowed


def head_masks(spec: AttentionSpec, batch: int, seq_len: int, num_heads: int, num_kv_heads: int,
               key_padding_mask=None, device=None):
    """For each head h, yields (h, the kv head it reads, [allowed (batch or 1, N, N) bool per branch]): the pairs
    of each of its branches, less the keys ``key_padding_mask`` (batch, N) ignores."""
    key_ok = torch.ones(1, 1, seq_len, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        key_ok = ~key_padding_mask.to(device=device, dtype=torch.bool).reshape(batch, 1, seq_len)
    for h, branches in enumerate(head_branches(spec, num_heads)):
        masks = [allowed_pairs(seq_len, w, r, offset, spec.causal).to(device)[None] & key_ok
                 for (w, r, offset) in branches]
        yield h, h // (num_heads // num_kv_heads), masks


def masked_softmax_attention(q, k, v, allowed, scale):
    """q, k, v: (B, N, D) float64; allowed: (B or 1, N, N). Returns out (B, N, D), lse (B, N)."""
    scores = torch.einsum("bid,bjd->bij", q, k) * scale
    scores = torch.where(allowed, scores, -math.inf)
    # The row maximum only stabilises exp; it cancels exactly, so it carries no gradient.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = torch.where(allowed, torch.exp(scores - row_max), 0.0)
    denom = weights.sum(dim=-1)
    has_keys = denom > 0
    safe_denom = torch.where(has_keys, denom, 1.0)
    out = torch.einsum("bij,bjd->bid", weights, v) / safe_denom[..., None]
    lse = torch.where(has_keys, torch.log(safe_denom) + row_max[..., 0], -math.inf)
    return out, lse


def _merge(outs, lses):
    """Log-sum-exp merge of per-branch results; branches with lse -inf contribute nothing."""
    lse_stack = torch.stack(lses)  # (G, B, N)
    finite = torch.isfinite(lse_stack)
    top = torch.where(finite, lse_stack, -math.inf).amax(dim=0).detach()
    top = torch.where(torch.isfinite(top), top, 0.0)
    e = torch.where(finite, torch.exp(torch.where(finite, lse_stack, 0.0) - top), 0.0)
    denom = e.sum(dim=0)
    has = denom > 0
    safe = torch.where(has, denom, 1.0)
    lse = torch.where(has, torch.log(safe) + top, -math.inf)
    out = sum((e[i] / safe)[..., None] * outs[i] for i in range(len(outs)))
    return out, lse


def attention(q, k, v, spec, *, key_padding_mask=None, return_lse=False):
    """Reference dilated attention in float64. Returns float64 out (and lse (B, H, N) float64)."""
    spec = load_spec(spec)
    check_inputs(spec, q, k, v, key_padding_mask)
    B, N, H, D = q.shape
    Hkv = k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    scale = spec.softmax_scale(D)

    outs, lses = [], []
    for h, kv, masks in head_masks(spec, B, N, H, Hkv, key_padding_mask, q.device):
        results = [masked_softmax_attention(q[:, :, h], k[:, :, kv], v[:, :, kv], allowed, scale)
                   for allowed in masks]
        if len(results) == 1:
            out_h, lse_h = results[0]
        else:
            out_h, lse_h = _merge([o for o, _ in results], [l for _, l in results])
        outs.append(out_h)
        lses.append(lse_h)
    out = torch.stack(outs, dim=2)  # (B, N, H, D)
    lse = torch.stack(lses, dim=1)  # (B, H, N)
    return (out, lse) if return_lse else out
