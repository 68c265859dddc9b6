"""Plans: a spec at given shapes, as a networkx DAG of named operations with sympy shapes and costs.

A plan is built by a fixed list of named passes (:data:`PASSES`); ``dilated-compiler plan`` lists them.
Shapes may be concrete ints or sympy symbols; costs are sympy expressions in the shape symbols.

Graph nodes (attribute ``op``):

* ``inputs``   q, k, v as given: (B, N, H, D) and (B, N, Hkv, D).
* ``attend``   one :class:`AttendOp`: dense softmax attention over the rows one branch selects, for one set of
               heads (all sharing one offset), over one region of whole segments (``full``) or the ragged last
               segment (``tail``). Rows are read by strided addressing; nothing of size N*w is formed.
* ``scatter``  grouped mode: each attend result lands on its own rows and heads; unselected rows are 0, lse -inf.
* ``merge``    all mode: branch results at the same row and head are merged by log-sum-exp.
* ``output``   out (B, N, H, D) and lse (B, H, N).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import networkx as nx
import sympy

from ..spec import AttentionSpec, load_spec

__all__ = ["AttendOp", "Plan", "PASSES", "build_plan", "PlanError"]

Expr = Union[int, sympy.Expr]


class PlanError(ValueError):
    """Shapes that a spec cannot be planned for (e.g. fewer heads than branches in grouped mode)."""


def _int_or_expr(x: Expr) -> Expr:
    """An int where ``x`` is an integer; otherwise ``x`` as sympy's automatic evaluation left it.

    The planner builds its expressions in forms that need no further simplification (``ceiling``, ``floor`` and
    ``Mod`` of the shape symbols, no redundant ``Max`` or ``Piecewise``), so ``sympy.simplify`` is never called: on
    a sum over many nodes it took seconds per property for no shorter result."""
    if isinstance(x, sympy.Basic) and x.is_Integer:
        return int(x)
    return x


def _as_int(x: Expr) -> int | None:
    if isinstance(x, int):
        return x
    if isinstance(x, sympy.Basic) and x.is_Integer:
        return int(x)
    return None


@dataclasses.dataclass(frozen=True)
class AttendOp:
    """Dense attention over the rows branch ``branch`` selects, for heads head_start::head_step (head_count of
    them), within ``num_segments`` segments of ``extent`` positions starting at ``start``; each segment holds
    ``rows`` selected positions (start + s*extent + offset + j*dilation)."""

    name: str
    branch: int
    segment_length: int
    dilation: int
    offset: int
    head_start: Expr
    head_count: Expr
    head_step: int
    region: str  # "full" (whole segments) or "tail" (the ragged last segment)
    start: Expr
    num_segments: Expr
    extent: Expr
    rows: Expr
    causal: bool

    def pairs_per_segment(self) -> Expr:
        r = sympy.sympify(self.rows)
        return _int_or_expr(r * (r + 1) / 2 if self.causal else r * r)

    def replace(self, **kw) -> "AttendOp":
        return dataclasses.replace(self, **kw)


class Plan:
    """A spec planned at shapes (B, N, H, D, Hkv): a DAG of operations with costs."""

    def __init__(self, spec: AttentionSpec, batch: Expr, seq_len: Expr, heads: Expr, head_dim: Expr,
                 kv_heads: Expr, dtype_bytes: int):
        self.spec = spec
        self.batch, self.seq_len, self.heads, self.head_dim, self.kv_heads = batch, seq_len, heads, head_dim, kv_heads
        self.dtype_bytes = dtype_bytes
        self.graph = nx.DiGraph()
        self.passes: list[str] = []

    # ---- structure ---------------------------------------------------------------------------------------
    @property
    def attend_ops(self) -> list[AttendOp]:
        ops = [self.graph.nodes[n]["attend"] for n in nx.topological_sort(self.graph)
               if self.graph.nodes[n]["op"] == "attend"]
        return sorted(ops, key=lambda a: (a.branch, _as_int(a.head_start) or 0, a.region))

    @property
    def is_concrete(self) -> bool:
        return all(_as_int(x) is not None for x in (self.batch, self.seq_len, self.heads, self.head_dim))

    @property
    def combine(self) -> str:
        return "merge" if self.spec.head_assignment == "all" else "scatter"

    # ---- costs -------------------------------------------------------------------------------------------
    def _sum(self, attr: str) -> Expr:
        return _int_or_expr(sum((self.graph.nodes[n].get(attr, 0) for n in self.graph.nodes), sympy.Integer(0)))

    @property
    def flops(self) -> Expr:
        """Useful forward FLOPs: 4*D per attended (query, key) pair per head (q k^T and p v)."""
        return self._sum("flops")

    @property
    def flops_backward(self) -> Expr:
        """Useful backward FLOPs (five matrix products per pair instead of two: 2.5x forward)."""
        return self._sum("flops_backward")

    @property
    def bytes(self) -> Expr:
        """Bytes a fused forward must move: selected rows of q, k, v read once; out and lse written once."""
        return self._sum("bytes")

    @property
    def attended_pairs(self) -> Expr:
        return self._sum("pairs")

    # ---- display -----------------------------------------------------------------------------------------
    def explain(self) -> str:
        spec = self.spec
        lines = [
            f"plan for {spec}",
            f"shapes: B={self.batch} N={self.seq_len} H={self.heads} D={self.head_dim} Hkv={self.kv_heads}; "
            f"scale={'1/sqrt(D)' if spec.scale is None else spec.scale}; causal={spec.causal}",
            f"passes: {' -> '.join(self.passes)}",
            "",
            f"{'node':<28} {'heads':<14} {'region':<6} {'segments':<14} {'rows/seg':<18} {'FLOPs':<24}",
        ]
        for a in self.attend_ops:
            heads = f"{a.head_start}::{a.head_step} x{a.head_count}"
            node = self.graph.nodes[a.name]
            lines.append(f"{a.name:<28} {heads:<14} {a.region:<6} {str(a.num_segments):<14} "
                         f"{str(a.rows):<18} {str(node['flops']):<24}")
        lines.append(f"{self.combine:<28} ({'log-sum-exp merge of branches' if self.combine == 'merge' else 'rows and heads disjoint; unselected rows 0, lse -inf'})")
        lines += [
            "",
            f"attended (query, key) pairs, summed over heads, per batch element: {self.attended_pairs}",
            f"useful FLOPs fwd: {self.flops}",
            f"useful FLOPs bwd: {self.flops_backward}",
            f"bytes moved (fused fwd, {self.dtype_bytes}-byte elements): {self.bytes}",
        ]
        if self.is_concrete:
            dense = 4 * self.batch * self.heads * self.head_dim * self.seq_len ** 2
            if spec.causal:
                dense //= 2
            lines.append(f"fraction of dense attention FLOPs: {float(self.flops) / dense:.4g}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Plan({self.spec.name or self.spec.key}, N={self.seq_len}, H={self.heads}, D={self.head_dim}, "
                f"{len(self.attend_ops)} attend ops)")


# --------------------------------------------------------------------------------------------------------------
# Passes. Each takes a plan and rewrites its graph in place.


# all mode, symbolic H: the most (branch, offset) pairs planned (each is a node with its own cost expressions)
MAX_SYMBOLIC_OFFSETS = 64


def _head_sets(plan: Plan) -> list[tuple[int, int, Expr, Expr, int]]:
    """(branch, offset, head_start, head_count, head_step) for every set of heads that shares a branch and
    offset."""
    spec, H = plan.spec, plan.heads
    G = spec.num_branches
    sets = []
    if spec.head_assignment == "all":
        Hc = _as_int(H)
        total = sum(b.dilation for b in spec.branches)
        if Hc is None and total > MAX_SYMBOLIC_OFFSETS:
            raise PlanError(
                f"all mode with a symbolic head count plans one node per (branch, offset): the dilations "
                f"{[b.dilation for b in spec.branches]} add up to {total}, more than {MAX_SYMBOLIC_OFFSETS}; "
                f"give a head count (then only offsets below it are planned)")
        for i, b in enumerate(spec.branches):
            # offset o gets heads o, o + r, ... below H: ceiling((H - o) / r) of them, which is 0 when o >= H
            # (H >= 1 and o < r keep the quotient above -1)
            for o in range(b.dilation if Hc is None else min(b.dilation, Hc)):
                count = sympy.ceiling((H - o) / sympy.Integer(b.dilation))
                sets.append((i, o, o, _int_or_expr(count), b.dilation))
        return sets
    for i, b in enumerate(spec.branches):
        # H heads split into G contiguous groups, the first H mod G of them one head larger:
        # group i has ceiling((H - i) / G) heads and starts after i * floor(H / G) + min(i, H mod G) of them
        start = i * sympy.floor(H / sympy.Integer(G)) + sympy.Min(i, sympy.Mod(H, G))
        count = sympy.ceiling((H - i) / sympy.Integer(G))
        offset = b.offset if b.offset is not None else i % b.dilation
        sets.append((i, offset, _int_or_expr(start), _int_or_expr(count), 1))
    return sets


def expand_heads(plan: Plan) -> None:
    """One attend node per (branch, offset, set of heads), covering all segments."""
    g = plan.graph
    g.add_node("inputs", op="inputs")
    g.add_node(plan.combine, op=plan.combine)
    g.add_node("output", op="output")
    g.add_edge(plan.combine, "output")
    for (i, offset, start, count, step) in _head_sets(plan):
        b = plan.spec.branches[i]
        name = f"attend_b{i}_w{b.segment_length}_r{b.dilation}_o{offset}"
        op = AttendOp(name=name, branch=i, segment_length=b.segment_length, dilation=b.dilation, offset=offset,
                      head_start=start, head_count=count, head_step=step, region="all", start=0,
                      num_segments=sympy.ceiling(plan.seq_len / sympy.Integer(b.segment_length)),
                      extent=b.segment_length, rows=-(-(b.segment_length - offset) // b.dilation),
                      causal=plan.spec.causal)
        g.add_node(name, op="attend", attend=op)
        g.add_edge("inputs", name)
        g.add_edge(name, plan.combine)


def split_ragged(plan: Plan) -> None:
    """Split each attend node into whole segments (one dense batch) and the ragged last segment, if any."""
    g = plan.graph
    N = plan.seq_len
    for name in [n for n in g.nodes if g.nodes[n]["op"] == "attend"]:
        a: AttendOp = g.nodes[name]["attend"]
        w = sympy.Integer(a.segment_length)
        full = _int_or_expr(sympy.floor(N / w))
        tail = _int_or_expr(sympy.Mod(N, w))
        # positions offset, offset + r, ... below the tail's length: 0 when offset >= tail (0 <= tail, offset < r)
        tail_rows = _int_or_expr(sympy.ceiling((tail - a.offset) / sympy.Integer(a.dilation)))
        parts = [
            a.replace(name=f"{a.name}_full", region="full", start=0, num_segments=full),
            a.replace(name=f"{a.name}_tail", region="tail", start=_int_or_expr(N - tail), num_segments=1,
                      extent=tail, rows=tail_rows),
        ]
        g.remove_node(name)
        for p in parts:
            g.add_node(p.name, op="attend", attend=p)
            g.add_edge("inputs", p.name)
            g.add_edge(p.name, plan.combine)


def drop_empty(plan: Plan) -> None:
    """Remove attend nodes that provably do no work (no heads, no segments or no selected rows)."""
    g = plan.graph
    for name in [n for n in g.nodes if g.nodes[n]["op"] == "attend"]:
        a: AttendOp = g.nodes[name]["attend"]
        if any(_as_int(x) == 0 for x in (a.head_count, a.num_segments, a.rows)):
            g.remove_node(name)


def annotate_costs(plan: Plan) -> None:
    """Useful FLOPs, attended pairs and bytes moved for each attend node, as sympy expressions."""
    g = plan.graph
    B, D = plan.batch, plan.head_dim
    for name in g.nodes:
        node = g.nodes[name]
        if node["op"] != "attend":
            continue
        a: AttendOp = node["attend"]
        pairs = _int_or_expr(a.num_segments * a.pairs_per_segment())
        node["pairs"] = _int_or_expr(a.head_count * pairs)  # per batch element
        node["flops"] = _int_or_expr(4 * B * a.head_count * D * pairs)
        node["flops_backward"] = _int_or_expr(10 * B * a.head_count * D * pairs)
        rows = a.num_segments * a.rows
        node["bytes"] = _int_or_expr(B * a.head_count * rows * (4 * D * plan.dtype_bytes + 4))
        node["shape"] = (B, a.num_segments, a.head_count, a.rows, D)


def verify(plan: Plan) -> None:
    """Check the IR: a DAG from inputs to output; every attend node within bounds; with concrete shapes, each
    (branch, head) covered by exactly one offset, and in grouped mode every head in exactly one branch."""
    g = plan.graph
    problems = []
    if not nx.is_directed_acyclic_graph(g):
        problems.append("graph has a cycle")
    for name in g.nodes:
        if g.nodes[name]["op"] == "attend":
            if list(g.predecessors(name)) != ["inputs"] or list(g.successors(name)) != [plan.combine]:
                problems.append(f"{name} is not wired inputs -> {name} -> {plan.combine}")
    if plan.is_concrete:
        H, N = int(plan.heads), int(plan.seq_len)
        cover: dict[tuple[int, int], int] = {}
        for a in plan.attend_ops:
            if a.region != "full" and not (a.region == "tail" and int(a.start) + int(a.extent) == N):
                problems.append(f"{a.name}: tail does not end at N")
            if int(a.offset) + (int(a.rows) - 1) * a.dilation >= int(a.extent):
                problems.append(f"{a.name}: rows run past the segment")
            if a.region == "full":
                for h in range(int(a.head_start), int(a.head_start) + int(a.head_count) * a.head_step, a.head_step):
                    if not 0 <= h < H:
                        problems.append(f"{a.name}: head {h} out of range")
                    cover[(a.branch, h)] = cover.get((a.branch, h), 0) + 1
        if N >= max(b.segment_length for b in plan.spec.branches):
            per_head: dict[int, int] = {}
            for (_, h), c in cover.items():
                if c != 1:
                    problems.append(f"head {h} covered {c} times by one branch")
                per_head[h] = per_head.get(h, 0) + 1
            want = plan.spec.num_branches if plan.spec.head_assignment == "all" else 1
            for h in range(H):
                if per_head.get(h, 0) != want:
                    problems.append(f"head {h} attends through {per_head.get(h, 0)} branches, expected {want}")
    if problems:
        raise AssertionError("plan verification failed:\n" + "\n".join(problems))


PASSES: dict[str, Callable[[Plan], None]] = {
    "expand_heads": expand_heads,
    "split_ragged": split_ragged,
    "drop_empty": drop_empty,
    "annotate_costs": annotate_costs,
    "verify": verify,
}


def _dim(value, symbol: str) -> Expr:
    if value is None:
        return sympy.Symbol(symbol, integer=True, positive=True)
    if isinstance(value, str):
        if not value.isidentifier():
            raise PlanError(f"{symbol}: got {value!r}; allowed: an integer >= 1, a name for a symbol (an identifier "
                            "such as 'N'), a sympy expression, or None for a symbol")
        return sympy.Symbol(value, integer=True, positive=True)
    if isinstance(value, sympy.Basic):
        value = _int_or_expr(value)  # an int where the expression is an integer
        if isinstance(value, sympy.Basic) and not value.is_number:
            return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{symbol}: got {value!r}; allowed: an integer >= 1, a name for a symbol, a sympy expression, "
                        "or None for a symbol")
    return value


def build_plan(spec, seq_len=None, heads=None, head_dim=None, *, batch=1, kv_heads=None,
               dtype_bytes: int = 2) -> Plan:
    """Plan ``spec`` at the given shapes. A shape left as None (or given as a name) becomes a sympy symbol
    (N, H, D, B); costs are then expressions in it."""
    spec = load_spec(spec)
    N, H, D, B = _dim(seq_len, "N"), _dim(heads, "H"), _dim(head_dim, "D"), _dim(batch, "B")
    Hkv = H if kv_heads is None else _dim(kv_heads, "Hkv")
    if _as_int(H) is not None:
        if spec.head_assignment == "grouped" and _as_int(H) < spec.num_branches:
            raise PlanError(f"grouped mode needs heads >= number of branches; got heads={H}, "
                            f"branches={spec.num_branches}. Use more heads, fewer branches, or head_assignment: all")
        if _as_int(Hkv) is not None and _as_int(H) % _as_int(Hkv) != 0:
            raise PlanError(f"kv heads ({Hkv}) must divide heads ({H})")
    plan = Plan(spec, B, N, H, D, Hkv, dtype_bytes)
    for name, run in PASSES.items():
        run(plan)
        plan.passes.append(name)
    return plan
