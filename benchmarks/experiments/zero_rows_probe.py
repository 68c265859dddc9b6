"""Probe (timing only; its "unwritten" form gives wrong results by design): what does writing the zero rows cost
the main case's step at the power limit's steady clock?

In grouped mode a head of a branch with dilation r attends from and to one row in r; out, dq, dk and dv are zero
in the other rows, and the kernels write those zeros (the zero fill: TMA stores of a zero tile). For the four-branch
pattern at 64K that is 142 MB per tensor, 570 MB a fwd+bwd step. SDPA over pre-gathered segments, the baseline of
the issue's targets, writes compact per-branch outputs and no zeros. The "unwritten" form runs the same step with
the zero fill off and the outputs taken from ``torch.empty`` (no memset either): the lowering's ``_zfill`` answers
False and its ``torch.zeros``/``torch.zeros_like`` become ``torch.empty``/``torch.empty_like`` while the step runs.
Before timing it checks that the selected rows are bitwise the lowering's and counts the unselected ones left
unwritten (NaN from a block the allocator handed back).

    PYTHONPATH=. python benchmarks/experiments/zero_rows_probe.py [--rounds 3] [--heat 8] [--measure 3]

Two H100s (stop 44, 3 rounds, 8 s heat, 3 s timed): fwd+bwd 3.924 -> 3.846 ms (pre-gathered 3.842) and 3.858 ->
3.783 (pre-gathered 3.765); fwd 0.940 -> 0.923 (0.918) and 0.922 -> 0.908 (0.904). The zeros are 80-95% of the
2% between the step and the pre-gathered SDPA (benchmarks/results/H100-triton.md, "Stop 44").
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import target_rounds as tr  # noqa: E402

from dilated_compiler.lowering.triton import lowering as L  # noqa: E402


class _NoZeros:
    """The lowering module's ``torch`` while the zeros are left unwritten: torch, with empty for zeros."""
    zeros, zeros_like = staticmethod(torch.empty), staticmethod(torch.empty_like)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def zeros_unwritten():
    zfill, real = L.TritonLowering._zfill, L.torch
    L.TritonLowering._zfill = lambda self, *args: False
    L.torch = _NoZeros()
    try:
        yield
    finally:
        L.TritonLowering._zfill, L.torch = zfill, real


def check(attn, q, k, v) -> None:
    with torch.no_grad():
        ref = attn(q, k, v)
        sel = ref != 0
        torch.full_like(q, float("nan"))  # freed at once: a block of NaN in the allocator's cache for the next output
        with zeros_unwritten():
            out = attn(q, k, v)
    assert torch.equal(out[sel], ref[sel]), "the selected rows differ from the lowering's"
    print(f"unwritten form: selected rows bitwise the lowering's; of {int((~sel).sum())} unselected elements "
          f"{int(out[~sel].isnan().sum())} hold the NaN left in the reused block", flush=True)


def main():
    args = tr.sustained_args(heat=8.0)
    case = tr.main_case()
    _, attn, q, k, v, _ = case
    check(attn, q, k, v)
    tr.sustained_forms(case, {"unwritten": zeros_unwritten}, args)


if __name__ == "__main__":
    main()
