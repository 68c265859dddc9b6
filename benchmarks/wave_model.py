"""How much of the SMs' time the persistent Gluon kernels' tile walk can keep busy: a model, not a timing.

The Gluon kernels run G programs (one per SM) over a tile table in :func:`persistent_order`, program p taking rows
p, p + G, p + 2G, ... A pass lasts as long as its busiest program, so with tiles of equal work and a tile count
that is not a multiple of G, the last wave leaves SMs idle. This script builds the tables the lowering builds and
prints, per pass, the tile count and the busy fraction: total work / (SMs x the busiest program's work), with a
tile's work counted as ``persistent_order`` counts it (``tables.tile_work``: the partner rows it walks, plus one
partner block). With ``--kv-heads`` below ``--heads`` (grouped-query attention), the dk/dv pass walks the kv heads'
key tiles (``tables.kv_tile_table``), each over the query heads that read its rows, so it has GQA times fewer
tiles of GQA times the work; the other passes keep their tiles.

It runs on any machine (no GPU, no triton kernels):

    PYTHONPATH=. python benchmarks/wave_model.py            # the four-branch pattern, 16K to 256K, 132 SMs
    PYTHONPATH=. python benchmarks/wave_model.py --sms 114 --seq-lens 65536
    PYTHONPATH=. python benchmarks/wave_model.py --kv-heads 16 4 1      # grouped-query attention's dk/dv pass
"""

from __future__ import annotations

import argparse

import torch

from dilated_compiler import AttentionSpec, Branch, build_plan
from dilated_compiler.lowering.triton import gluon_hopper
from dilated_compiler.lowering.triton.tables import (kv_tile_heads, kv_tile_table, persistent_order, tile_table,
                                                     tile_work)

FOUR_BRANCH = (Branch(2048, 1), Branch(4096, 2), Branch(8192, 4), Branch(16384, 8))
# (pass, table kind, own block, partner block) as the Gluon kernels walk them
PASSES = (("fwd", "q", gluon_hopper.BLOCK_M, gluon_hopper.BLOCK_N),
          ("dq", "q", gluon_hopper.BWD_BLOCK, gluon_hopper.BWD_STEP),
          ("dk/dv", "k", gluon_hopper.BWD_BLOCK, gluon_hopper.BWD_STEP))


def busy_fraction(spec: AttentionSpec, seq_len: int, heads: int, head_dim: int, kind: str, block: int,
                  partner: int, sms: int, kv_heads: int | None = None) -> tuple[int, float]:
    """(tiles, busy fraction of ``sms`` SMs) of one pass in persistent order; kind "k" with ``kv_heads`` below
    ``heads``: the Gluon dk/dv kernel's kv head tiles, weighted by the query heads each walks."""
    kv_heads = kv_heads or heads
    gqa = heads // kv_heads
    plan = build_plan(spec, seq_len, heads, head_dim, kv_heads=kv_heads)
    kv_tiles = kind == "k" and gqa > 1
    table = kv_tile_table(plan, block, partner, gqa) if kv_tiles else tile_table(plan, kind, block, partner)

    def heads_of(t):
        return kv_tile_heads(plan, t, gqa) if kv_tiles else None
    programs = min(table.shape[0], sms)
    order = persistent_order(table, programs, partner, heads_of(table))
    work = tile_work(order, partner, heads_of(order)).double()
    load = torch.zeros(programs, dtype=torch.float64).index_add_(0, torch.arange(work.shape[0]) % programs, work)
    return work.shape[0], (work.sum() / (sms * load.max())).item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sms", type=int, default=132, help="SMs, one program each (default 132, an H100/H200 SXM)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=None,
                    help="kv head counts to model, each dividing --heads (default: --heads, no grouped-query "
                         "attention)")
    args = ap.parse_args(argv)
    kv_list = args.kv_heads or [args.heads]
    for kv in kv_list:
        if kv < 1 or args.heads % kv:
            ap.error(f"--kv-heads {kv}: must be a positive divisor of --heads ({args.heads})")
    print(f"four-branch grouped, {args.heads} heads, D = {args.head_dim}, {args.sms} SMs; busy fraction of the "
          f"SMs' time per pass (a model: tile work = partner rows walked + one block)")
    print("| N | causal | kv heads | pass | tiles | waves | busy fraction |")
    print("|---|---|---|---|---|---|---|")
    for n in args.seq_lens:
        for causal in (False, True):
            spec = AttentionSpec(FOUR_BRANCH, causal=causal)
            for kv in kv_list:
                for name, kind, block, partner in PASSES:
                    tiles, busy = busy_fraction(spec, n, args.heads, args.head_dim, kind, block, partner, args.sms,
                                                kv)
                    print(f"| {n} | {causal} | {kv} | {name} | {tiles} | {tiles / args.sms:.2f} | {busy:.3f} |")


if __name__ == "__main__":
    main()
