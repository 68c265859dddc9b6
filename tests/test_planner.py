"""The planner: named passes, DAG structure, symbolic and concrete costs."""

import networkx as nx
import pytest
import sympy
import torch
from hypothesis import given, settings, strategies as st

from dilated_compiler import AttentionSpec, Branch, PlanError, build_plan, compile_attention, reference
from dilated_compiler.planner import PASSES

FOUR = AttentionSpec((Branch(2048, 1), Branch(4096, 2), Branch(8192, 4), Branch(16384, 8)))


def _pairs_by_mask(spec, n, heads):
    """Attended (query, key) pairs summed over heads, counted from the reference's masks."""
    total = 0
    for branches in reference.head_branches(spec, heads):
        for (w, r, off) in branches:
            total += int(reference.allowed_pairs(n, w, r, off, spec.causal).sum())
    return total


def test_passes_are_named_and_applied_in_order():
    plan = build_plan(FOUR, 65536, 16, 128)
    assert plan.passes == list(PASSES) == ["expand_heads", "split_ragged", "drop_empty", "annotate_costs", "verify"]
    assert all(PASSES[name].__doc__ for name in PASSES)


def test_graph_is_a_dag_from_inputs_to_output():
    plan = build_plan(FOUR, 65536, 16, 128)
    g = plan.graph
    assert nx.is_directed_acyclic_graph(g)
    assert nx.has_path(g, "inputs", "output")
    attends = [n for n in g.nodes if g.nodes[n]["op"] == "attend"]
    assert len(attends) == 4  # N divisible by every w: no tail nodes
    assert {g.nodes[n]["op"] for n in g.nodes} == {"inputs", "attend", "scatter", "output"}


def test_four_branch_flops_at_64k():
    plan = build_plan(FOUR, 65536, 16, 128)
    # each branch: 4 heads, N/w segments of 2048 rows: 4 * D * 4 heads * (N/w) * 2048^2
    expected = sum(4 * 128 * 4 * (65536 // w) * 2048 ** 2 for w in (2048, 4096, 8192, 16384))
    assert plan.flops == expected
    assert plan.flops_backward == expected * 5 // 2
    assert plan.attended_pairs == sum(4 * (65536 // w) * 2048 ** 2 for w in (2048, 4096, 8192, 16384))
    # bytes moved: per head and selected row, q, k, v and out (4 D elements of 2 bytes) and the float32 lse
    assert plan.bytes == sum(4 * (65536 // w) * 2048 * (4 * 128 * 2 + 4) for w in (2048, 4096, 8192, 16384))


def test_verify_rejects_broken_plans():
    """The planner's self-check fires: a node whose rows run past its segment, and a head covered twice."""
    from dilated_compiler.planner.plan import verify
    plan = build_plan(AttentionSpec((Branch(8, 1), Branch(16, 2))), 32, 2, 16)
    verify(plan)
    g = plan.graph
    name = next(n for n in g.nodes if g.nodes[n]["op"] == "attend" and g.nodes[n]["attend"].region == "full")
    a = g.nodes[name]["attend"]
    g.nodes[name]["attend"] = a.replace(rows=int(a.rows) + 1)
    with pytest.raises(AssertionError, match="rows run past the segment"):
        verify(plan)
    g.nodes[name]["attend"] = a
    g.add_node("dup", op="attend", attend=a.replace(name="dup"))
    g.add_edge("inputs", "dup")
    g.add_edge("dup", plan.combine)
    with pytest.raises(AssertionError, match="covered 2 times"):
        verify(plan)


@pytest.mark.parametrize("mode", ["grouped", "all"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 7, 37, 64, 100])
def test_pairs_match_the_reference_masks(mode, causal, n):
    spec = AttentionSpec((Branch(8, 1), Branch(12, 3), Branch(32, 4)), head_assignment=mode, causal=causal)
    plan = build_plan(spec, n, 5, 16)
    assert plan.attended_pairs == _pairs_by_mask(spec, n, 5)
    assert plan.flops == 4 * 16 * _pairs_by_mask(spec, n, 5)


def test_symbolic_plan_substitutes_to_concrete_values():
    spec = AttentionSpec((Branch(8, 1), Branch(12, 3)), causal=True)
    sym = build_plan(spec, None, 4, None)
    N, D = sympy.Symbol("N", integer=True, positive=True), sympy.Symbol("D", integer=True, positive=True)
    assert sym.flops.free_symbols == {N, D}
    for n in (5, 24, 50, 97):
        assert sym.flops.subs({N: n, D: 16}) == build_plan(spec, n, 4, 16).flops
    text = sym.explain()
    assert "floor(N/8)" in text and "passes:" in text


def test_symbolic_heads():
    spec = AttentionSpec((Branch(8, 1), Branch(16, 2), Branch(16, 4)))
    sym = build_plan(spec, 64, None, 8)
    H = sympy.Symbol("H", integer=True, positive=True)
    for h in (3, 4, 5, 7, 11):
        assert sym.flops.subs(H, h) == build_plan(spec, 64, h, 8).flops


@st.composite
def _symbolic_cases(draw):
    """A spec (either mode, offsets, causal) and concrete shapes to substitute into its fully symbolic plan."""
    mode = draw(st.sampled_from(["grouped", "all"]))
    branches = []
    for _ in range(draw(st.integers(1, 3))):
        w = draw(st.integers(1, 24))
        r = draw(st.integers(1, min(w, 5)))
        off = draw(st.one_of(st.none(), st.integers(0, r - 1))) if mode == "grouped" else None
        branches.append(Branch(w, r, off))
    spec = AttentionSpec(tuple(branches), head_assignment=mode, causal=draw(st.booleans()))
    heads = draw(st.integers(len(branches) if mode == "grouped" else 1, 9))
    return spec, draw(st.integers(1, 80)), heads, draw(st.integers(1, 4)), draw(st.integers(1, 3))


@settings(max_examples=60, deadline=None)
@given(_symbolic_cases())
def test_symbolic_plan_at_random_shapes(case):
    """Every cost of a fully symbolic plan (N, H, D, B symbols), at concrete values, is the concrete plan's; and
    the pairs are those of the reference's masks, so the symbolic head counts (ceiling((H - i) / G) in grouped
    mode, ceiling((H - o) / r) per offset in all mode) and tail rows (ceiling((N mod w - o) / r)) hold for ragged
    N, head counts not divisible by the branches, and offsets beyond the tail or the heads."""
    spec, n, heads, d, batch = case
    sym = build_plan(spec, None, None, None, batch=None)
    concrete = build_plan(spec, n, heads, d, batch=batch)
    values = {sympy.Symbol(name, integer=True, positive=True): v
              for name, v in (("N", n), ("H", heads), ("D", d), ("B", batch))}
    for cost in ("flops", "flops_backward", "bytes", "attended_pairs"):
        at = sympy.sympify(getattr(sym, cost)).subs(values)
        assert at.is_Integer and int(at) == getattr(concrete, cost), cost
    assert concrete.attended_pairs == _pairs_by_mask(spec, n, heads)
    # node by node: the nodes the concrete plan keeps, with the same head sets and rows
    by_name = {a.name: a for a in sym.attend_ops}
    for a in concrete.attend_ops:
        s = by_name[a.name]
        for field in ("head_start", "head_count", "num_segments", "rows", "start", "extent"):
            assert sympy.sympify(getattr(s, field)).subs(values) == getattr(a, field), (a.name, field)


def test_ragged_tail_nodes():
    spec = AttentionSpec((Branch(16, 4, offset=3),))
    plan = build_plan(spec, 37, 2, 8)
    ops = {a.region: a for a in plan.attend_ops}
    assert ops["full"].num_segments == 2 and ops["full"].rows == 4
    assert ops["tail"].start == 32 and ops["tail"].extent == 5 and ops["tail"].rows == 1  # position 35
    assert "tail" not in {a.region for a in build_plan(spec, 34, 2, 8).attend_ops}  # tail 32..33, offset 3: empty


def test_all_mode_head_sets_and_merge_node():
    spec = AttentionSpec((Branch(8, 1), Branch(16, 4)), head_assignment="all")
    plan = build_plan(spec, 32, 6, 8)
    assert "merge" in plan.graph
    sets = sorted((a.branch, a.offset, a.head_start, a.head_count, a.head_step) for a in plan.attend_ops)
    assert sets == [(0, 0, 0, 6, 1), (1, 0, 0, 2, 4), (1, 1, 1, 2, 4), (1, 2, 2, 1, 4), (1, 3, 3, 1, 4)]


def test_all_mode_plans_only_offsets_that_have_heads():
    """A dilation far above the head count plans in the time of the heads, not of the dilation (offsets >= H get
    no heads); with a symbolic head count a dilation too large to plan offset by offset is a clear error."""
    spec = AttentionSpec((Branch(2**20, 2**20), Branch(4, 1)), head_assignment="all")
    plan = build_plan(spec, 16, 3, 8)
    sets = sorted((a.branch, a.offset, a.head_start, a.head_count, a.head_step) for a in plan.attend_ops)
    assert sets == [(0, 0, 0, 1, 2**20), (0, 1, 1, 1, 2**20), (0, 2, 2, 1, 2**20), (1, 0, 0, 3, 1)]
    q, k, v = (torch.randn(1, 16, 3, 8, dtype=torch.float64) for _ in range(3))
    # against the reference through the module (the plan's offsets are the heads' offsets)
    out = compile_attention(spec, backend="torch")(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v, spec), rtol=0, atol=1e-12)
    with pytest.raises(PlanError, match=r"symbolic head count.*dilations \[1048576, 1\] add up to 1048577, more "
                                        r"than 64; give a head count"):
        build_plan(spec, None, None, None)
    with pytest.raises(PlanError, match=r"dilations \[40, 25\] add up to 65"):
        build_plan(AttentionSpec((Branch(40, 40), Branch(25, 25)), head_assignment="all"), 64, None, 8)
    # a concrete head count plans the same spec
    plan = build_plan(AttentionSpec((Branch(40, 40), Branch(25, 25)), head_assignment="all"), 64, 2, 8)
    assert sorted((a.branch, a.offset, a.region) for a in plan.attend_ops) == [
        (b, o, region) for b in (0, 1) for o in (0, 1) for region in ("full", "tail")]  # offsets 0 and 1 only


def test_grouped_head_split_gives_extra_heads_to_first_groups():
    spec = AttentionSpec((Branch(8), Branch(8, 2), Branch(8, 4)))
    plan = build_plan(spec, 32, 8, 8)
    assert [(a.head_start, a.head_count) for a in plan.attend_ops] == [(0, 3), (3, 3), (6, 2)]


def test_plan_errors():
    with pytest.raises(PlanError, match="heads >= number of branches"):
        build_plan(FOUR, 1024, 3, 64)
    with pytest.raises(PlanError, match="must divide"):
        build_plan(FOUR, 1024, 8, 64, kv_heads=3)
    with pytest.raises(PlanError, match="N: got 0"):
        build_plan(FOUR, 0, 8, 64)
    # sympy numbers are checked as ints are
    with pytest.raises(PlanError, match="N: got -5"):
        build_plan(FOUR, sympy.Integer(-5), 8, 64)
    with pytest.raises(PlanError, match="Hkv: got 0"):
        build_plan(FOUR, 1024, 8, 64, kv_heads=sympy.Integer(0))
    with pytest.raises(PlanError, match="N: got 2.5"):
        build_plan(FOUR, sympy.Float(2.5), 8, 64)
    # a name becomes a symbol; a size written as a string does not
    assert str(build_plan(FOUR, "L", 8, 64).seq_len) == "L"
    with pytest.raises(PlanError, match=r"N: got '16'; allowed: an integer >= 1, a name for a symbol"):
        build_plan(FOUR, "16", 8, 64)
    assert build_plan(FOUR, sympy.Integer(1024), 8, 64).flops == build_plan(FOUR, 1024, 8, 64).flops


def test_explain_lists_nodes_and_costs():
    text = build_plan(FOUR, 65536, 16, 128).explain()
    for fragment in ("attend_b3_w16384_r8_o3_full", "useful FLOPs fwd", "fraction of dense", "scatter"):
        assert fragment in text
