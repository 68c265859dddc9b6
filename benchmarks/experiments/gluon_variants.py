"""What the Gluon experiment scripts share: a lowering whose Gluon kernels' source text is patched into a variant,
and the table of the variants' times."""

from __future__ import annotations

import hashlib


def patch_gluon(low, label: str, patches, expected=lambda old: 1):
    """``low`` (a ``TritonLowering``) with its Gluon module's source changed by ``patches``, (old, new) pairs
    applied in order, each old text found ``expected(old)`` times (once unless said), and a cache key of its own
    from ``label``, so that the variant's kernels are compiled from the patched text and not taken from the disk
    cache. A patch whose old text is not found as often as expected raises: the lowering's source has moved on."""
    text = low._gluon_text
    for old, new in patches:
        found, want = text.count(old), expected(old)
        if found != want:
            raise ValueError(f"variant {label!r}: a patch's text is found {found} times, expected {want}:\n{old}")
        text = text.replace(old, new)
    low._gluon_text = text
    low._gluon_key = hashlib.sha256((low._gluon_key + label).encode()).hexdigest()[:24]
    low._gluon_module = None
    return low


def print_results(rows, rounds: int, heads: int, head_dim: int) -> None:
    """The experiments' table over the four-branch grouped 64K case: ``rows`` of (case, pass, form, median ms,
    bitwise equal, each round's ms)."""
    import torch
    print(f"\n{torch.cuda.get_device_name()}: four-branch grouped N=64K, bf16, H={heads}, D={head_dim}; median of "
          f"{rounds} alternating rounds")
    print("| case | pass | form | ms | bitwise equal | rounds |")
    print("|---|---|---|---|---|---|")
    for case, p, f, ms, eq, ts in rows:
        print(f"| {case} | {p} | {f} | {ms:.3f} | {eq} | {', '.join(f'{t:.3f}' for t in ts)} |")
