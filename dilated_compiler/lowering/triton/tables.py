"""Tile tables: the host-side int32 tables that tell each Triton program what to compute.

A plan's attend ops are cut into *tiles*: BLOCK consecutive selected rows of one segment, for one head. Every
program of a launch reads one row of its table (:data:`COLUMNS`), so all branches, segments, heads and tiles of a
spec run in a single launch per pass.

A row also carries the tile's *block table*: the range of partner tiles its inner loop walks (key tiles for a
query tile; query tiles for a key tile), split into phases that need element masks (causal diagonal, ragged
end of a segment) and one that needs none. Block sparsity would only change these ranges (or turn them into a
list); the kernels would not change.

The Gluon kernels are persistent: their G programs walk one table, program p rows p, p + G, p + 2G, ...
:func:`persistent_order` arranges a table for that walk.

No triton import here: tables (and the generated source) can be built on any machine.
"""

from __future__ import annotations

import torch

from ...planner import Plan

__all__ = ["COLUMNS", "tile_table", "kv_tile_table", "whole_groups_reason", "branch_heads", "persistent_order",
           "kv_tile_heads", "tile_work", "describe_columns", "spans_cover", "selected_rows"]

# Columns of a tile table, in order.
COLUMNS = (
    ("head", "query head h this program computes"),
    ("branch", "branch id (index into the spec's branches; selects the dilation)"),
    ("pos0", "sequence position of the segment's selected row 0: segment start + offset"),
    ("rows", "L, selected rows in this segment (rows j sit at pos0 + j*dilation; the last segment may be ragged)"),
    ("row0", "first selected row of this program's own tile"),
    ("lo", "block table: the inner loop walks partner rows [lo, hi) in steps of its block size"),
    ("mid", "  [lo, mid) needs element masks (causal diagonal)"),
    ("full_end", "  [mid, full_end) needs none; [full_end, hi) needs masks again (diagonal / ragged end)"),
    ("hi", "  end of the walk"),
    ("zlo", "span [zlo, zhi) of sequence positions this tile owns in its segment (zero fill, see the kernels)"),
    ("zhi", "  the tile's rows j cover row0*r.. (row0+block)*r from the segment start; the last tile runs to its end"),
)
NCOLS = len(COLUMNS)


def describe_columns() -> str:
    return "\n".join(f"#   {i:>2}  {name:<9} {text}" for i, (name, text) in enumerate(COLUMNS))


def _heads(a) -> torch.Tensor:
    return torch.arange(int(a.head_count), dtype=torch.int64) * a.head_step + int(a.head_start)


def spans_cover(plan: Plan, table: torch.Tensor, gqa: int = 1) -> bool:
    """Whether the tiles' spans [zlo, zhi) cover every position 0..N-1 for every head of the plan (then the
    kernels' zero fill replaces a memset of the outputs). Spans never overlap within a head in grouped mode,
    so comparing their total length per head with N decides it. ``gqa`` > 1: ``table`` is a
    :func:`kv_tile_table`, whose tiles write the kv head of their first query head (h // gqa)."""
    if plan.spec.head_assignment != "grouped":
        return False
    H, N = int(plan.heads) // gqa, int(plan.seq_len)
    if table.shape[0] == 0:
        return N == 0
    t = table.to(torch.int64)
    per_head = torch.zeros(H, dtype=torch.int64).index_add_(0, t[:, 0] // gqa, t[:, 10] - t[:, 9])
    return bool((per_head == N).all())


def selected_rows(plan: Plan) -> torch.Tensor:
    """(G, H, N) bool: whether branch g selects position n for head h (its query rows, which are also its key
    rows). "All" mode's backward uses it to order its phases and to know which rows an earlier phase wrote."""
    G, H, N = len(plan.spec.branches), int(plan.heads), int(plan.seq_len)
    sel = torch.zeros(G, H, N, dtype=torch.bool)
    for a in plan.attend_ops:
        L, S = int(a.rows), int(a.num_segments)
        if L <= 0 or S <= 0 or int(a.head_count) <= 0:
            continue
        pos = (int(a.start) + torch.arange(S, dtype=torch.int64)[:, None] * int(a.extent) + int(a.offset)
               + torch.arange(L, dtype=torch.int64)[None, :] * int(a.dilation)).reshape(-1)
        sel[a.branch, _heads(a)[:, None], pos[None, :]] = True
    return sel


def tile_table(plan: Plan, kind: str, block: int, partner_block: int) -> torch.Tensor:
    """The (T, NCOLS) int32 table for one pass.

    kind "q": one program per query tile of ``block`` rows, walking key tiles of ``partner_block`` rows
    (forward and dq). kind "k": one program per key tile of ``block`` rows, walking query tiles of
    ``partner_block`` rows (dk/dv).

    Order: the tiles of one (segment, head) are adjacent, heaviest first, and these groups come heaviest first
    (in plan order among equals). Programs start about in row order, so the tiles running at a time share a few
    segments' partners, which stay in L2, and the light tiles come last (load balance). Ordering single tiles
    heaviest first instead put tiles of different segments side by side in causal tables (equal work, different
    segments), and the passes became bound by memory bandwidth: on an H100 (four-branch causal, N = 64K, bf16,
    benchmarks/experiments/tl_order_experiment.py) this order took the "all" mode fwd+bwd from 21.08 to 17.67 ms and the
    grouped tl fwd+bwd from 3.97 to 3.11. Persistent launches rearrange the rows (:func:`persistent_order`).
    """
    if kind not in ("q", "k"):
        raise ValueError(f"kind must be 'q' or 'k'; got {kind!r}")
    causal = plan.spec.causal
    parts = []
    for op_index, a in enumerate(plan.attend_ops):
        L = int(a.rows)
        S = int(a.num_segments)
        if L <= 0 or S <= 0 or int(a.head_count) <= 0:
            continue
        n_tiles = -(-L // block)
        seg = torch.arange(S, dtype=torch.int64)
        tile = torch.arange(n_tiles, dtype=torch.int64)
        heads = _heads(a)
        sg, hd, tl_ = torch.meshgrid(seg, heads, tile, indexing="ij")
        sg, hd, tl_ = sg.reshape(-1), hd.reshape(-1), tl_.reshape(-1)
        row0 = tl_ * block
        pos0 = int(a.start) + sg * int(a.extent) + a.offset
        P = partner_block
        floor_L = (L // P) * P
        if kind == "q":
            lo = torch.zeros_like(row0)
            mid = torch.zeros_like(row0)
            if causal:
                hi = torch.clamp(row0 + block, max=L)
                full_end = torch.clamp(((row0 + 1) // P) * P, max=floor_L)
            else:
                hi = torch.full_like(row0, L)
                full_end = torch.full_like(row0, floor_L)
        else:
            hi = torch.full_like(row0, L)
            if causal:
                lo = (row0 // P) * P
                mid = torch.clamp(-(-(row0 + block) // P) * P, max=L)
                full_end = torch.maximum(mid, torch.full_like(row0, floor_L))
            else:
                lo = torch.zeros_like(row0)
                mid = torch.zeros_like(row0)
                full_end = torch.full_like(row0, floor_L)
        work = hi - lo
        seg_start = int(a.start) + sg * int(a.extent)
        zlo = seg_start + row0 * int(a.dilation)
        zhi = torch.where(tl_ == n_tiles - 1, seg_start + int(a.extent),
                          torch.clamp(seg_start + (row0 + block) * int(a.dilation), max=seg_start + int(a.extent)))
        cols = [hd, torch.full_like(row0, a.branch), pos0, torch.full_like(row0, L), row0, lo, mid, full_end, hi,
                zlo, zhi]
        t = torch.stack(cols, dim=1)
        group_work = work.view(-1, n_tiles).sum(dim=1).repeat_interleave(n_tiles)  # per (segment, head)
        order_keys = torch.stack([-group_work, torch.full_like(row0, op_index), sg, hd, -work, tl_], dim=1)
        parts.append((t, order_keys))
    if not parts:
        return torch.zeros((0, NCOLS), dtype=torch.int32)
    table = torch.cat([p[0] for p in parts])
    keys = torch.cat([p[1] for p in parts])
    # lexicographic sort: stable sorts from the least significant key to the most
    order = torch.arange(table.shape[0])
    for col in reversed(range(keys.shape[1])):
        order = order[torch.sort(keys[order, col], stable=True).indices]
    table = table[order]
    if table.numel() and int(table.abs().max()) >= 2 ** 31:
        raise ValueError("sequence positions past 2^31 do not fit the int32 tile table")
    return table.to(torch.int32).contiguous()


def whole_groups_reason(plan: Plan, gqa: int) -> str | None:
    """None if, in grouped mode, every attend op's heads are whole groups of ``gqa`` query heads (those sharing
    a kv head, h // gqa), so that each kv head's rows belong to one branch; else why not. "All" mode: None."""
    if gqa == 1 or plan.spec.head_assignment != "grouped":
        return None
    for a in plan.attend_ops:
        start, count = int(a.head_start), int(a.head_count)
        if count > 0 and (start % gqa or count % gqa or a.head_step != 1):
            return (f"branch {a.branch} has query heads {start}..{start + count - 1}, not whole groups of the "
                    f"{gqa} query heads that share a kv head")
    return None


def branch_heads(plan: Plan) -> list[tuple[int, int]]:
    """Grouped mode: each branch's run of query heads, (first, one past the last), in branch order ((0, 0) for a
    branch without heads)."""
    runs = [(0, 0)] * len(plan.spec.branches)
    for a in plan.attend_ops:
        if int(a.head_count) > 0:
            runs[a.branch] = (int(a.head_start), int(a.head_start) + (int(a.head_count) - 1) * a.head_step + 1)
    return runs


def kv_tile_table(plan: Plan, block: int, partner_block: int, gqa: int) -> torch.Tensor:
    """The dk/dv table under grouped-query attention (``gqa`` = H // Hkv query heads per kv head): one row per key
    tile of a kv head and the set of its query heads whose selected rows are the tile's, which add into the same
    dK and dV rows. The head column holds the set's first query head h0; the set is h0, h0 + s, ... below
    (h0 // gqa + 1) * gqa, with s the head step of the tile's attend op:

    * grouped mode: s = 1, the kv head's query heads in the tile's branch: the whole group, or (where a group
      spans branches, :func:`whole_groups_reason`) its part in the branch, which ends at the branch's last head
      (:func:`branch_heads`); such a kv head's rows then get tiles of several branches;
    * "all" mode: s = r, where head h has offset h % r: the group's heads of one offset.

    The rows are :func:`tile_table`'s kind "k" rows of each set's first head, in its order; ``gqa`` 1 gives that
    table."""
    table = tile_table(plan, "k", block, partner_block)
    if gqa == 1 or table.shape[0] == 0:
        return table
    t = table.to(torch.int64)
    if plan.spec.head_assignment == "all":
        step = torch.tensor([b.dilation for b in plan.spec.branches], dtype=torch.int64)[t[:, 1]]
        return table[t[:, 0] % gqa < step].contiguous()
    # grouped: a group's first head, or a branch's first head (the first of the group's heads in that branch)
    starts = torch.tensor([first for first, _ in branch_heads(plan)], dtype=torch.int64)[t[:, 1]]
    return table[(t[:, 0] % gqa == 0) | (t[:, 0] == starts)].contiguous()


def kv_tile_heads(plan: Plan, table: torch.Tensor, gqa: int) -> torch.Tensor:
    """How many query heads each row of a :func:`kv_tile_table` walks (int64), as the kernel counts them
    (``gluon_hopper._query_heads``); all ones where ``gqa`` is 1."""
    t = table.to(torch.int64)
    if gqa == 1 or t.shape[0] == 0:
        return torch.ones(t.shape[0], dtype=torch.int64)
    h0, branch = t[:, 0], t[:, 1]
    if plan.spec.head_assignment == "all":
        step = torch.tensor([b.dilation for b in plan.spec.branches], dtype=torch.int64)[branch]
        return (gqa - h0 % gqa + step - 1) // step
    ends = torch.tensor([end for _, end in branch_heads(plan)], dtype=torch.int64)[branch]
    return torch.minimum((h0 // gqa + 1) * gqa, ends) - h0


def tile_work(table: torch.Tensor, partner_block: int, heads: torch.Tensor | None = None) -> torch.Tensor:
    """Each tile's work as :func:`persistent_order` balances it (int64): the partner rows its inner loop walks,
    ``hi - lo`` (times ``heads``, the query heads a :func:`kv_tile_table` row walks, where given), plus one partner
    block for the tile's set-up."""
    t = table.to(torch.int64)
    walk = t[:, 8] - t[:, 5]
    return (walk if heads is None else walk * heads.to(torch.int64)) + partner_block


def persistent_order(table: torch.Tensor, programs: int, partner_block: int,
                     heads: torch.Tensor | None = None) -> torch.Tensor:
    """``table``'s rows arranged for a persistent launch of ``programs`` programs (G), where program p runs rows
    p, p + G, p + 2G, ... in turn.

    Rows [iG, iG + G), band i, are the tiles that run at about the same time. Bands take the tiles in the plan's
    order (branch, segment, head, tile), so a band covers a few whole segments of a head and their partner rows
    (keys for a query tile, queries for a key tile) are read from memory once and then from L2. Within a band the
    heaviest tile goes to the program with the least work so far (longest processing time first), which keeps
    the programs' totals, and with them their progress through the bands, level. Work: the partner rows walked,
    ``hi - lo`` (times ``heads``, per row, for a :func:`kv_tile_table`), plus one partner block for the tile's
    set-up (:func:`tile_work`). A last band of k < G tiles goes to the k least
    loaded programs, which are then numbered 0..k-1 (the only programs with a row there). With tiles of equal
    work every program is as loaded as every other before the last band, and the numbering does not move.

    Single tiles heaviest first (tile_table's order until it kept segments together) balances too, but in a causal
    table the tiles of equal work come from different segments, so a band of them read G segments' partners, each
    from memory; and tile_table's order dealt round-robin would not balance (a program would get the same rank in
    every group it meets). On an H100 (four-branch causal, N = 64K, bf16, 16 heads, D = 128;
    benchmarks/experiments/gluon_order_experiment.py) this order took the Gluon forward from 0.851 to 0.525 ms,
    dq from 0.959 to 0.702, dk/dv from 1.139 to 0.967 and the lowering's fwd+bwd from 2.971 to 2.316, outputs
    bitwise equal; non-causal times did not move (the orders nearly agree there). The last band's rule came later
    and is not yet timed: benchmarks/wave_model.py models it (four-branch causal, 132 SMs) as raising the busy
    fraction of the SMs' time from 0.850-0.864 to 0.897 at N = 16K and from 0.956-0.963 to 0.963-0.977 at 64K; the
    non-causal tables are the same as before.
    """
    T = table.shape[0]
    if programs <= 0:
        raise ValueError(f"programs must be positive; got {programs}")
    if T == 0:
        return table
    t = table.to(torch.int64)
    # the plan's order: branch, segment start, head, first row (tile_table puts the heaviest groups first)
    order = torch.arange(T)
    for col in (4, 0, 2, 1):
        order = order[torch.sort(t[order, col], stable=True).indices]
    work = tile_work(t, partner_block, heads)
    bands = (T + programs - 1) // programs
    runs = torch.full((bands, programs), -1, dtype=torch.int64)  # band i, program p: the row p runs in band i
    load = torch.zeros(programs, dtype=torch.int64)
    for i in range(bands):
        band = order[i * programs:(i + 1) * programs]
        w = work[band]
        heavy = torch.sort(w, descending=True, stable=True).indices
        idle = torch.sort(load, stable=True).indices[:band.shape[0]]
        runs[i, idle] = band[heavy]
        load[idle] += w[heavy]
    # a last band of k < G tiles has rows for programs 0..k-1 only: the programs that took its tiles (the least
    # loaded) are numbered first
    last = runs[-1]
    numbering = torch.cat([torch.nonzero(last >= 0).flatten(), torch.nonzero(last < 0).flatten()])
    rows = runs[:, numbering].flatten()
    return table[rows[rows >= 0]].contiguous()
