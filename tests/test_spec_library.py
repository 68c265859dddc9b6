"""The spec library in specs/: every file loads, validates, round-trips, and runs correctly.

The library's patterns use segments of 2048 to 32768 (dense: 2^20) positions, which the O(N^2) float64
reference cannot check cheaply on CPU. So the run check uses a *scaled-down copy* of each spec: every
segment length divided by 512 (2048 -> 4, 32768 -> 64, 2^20 -> 2048), dilations, offsets, head assignment and
causality unchanged, at a sequence length covering two of the largest scaled segments plus a ragged tail. This
checks the structure of each pattern (branch count, dilations relative to segments, head grouping, merging),
not the full-size segment lengths.
"""

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import check_against_reference, make_qkv
from dilated_compiler import AttentionSpec, Branch, build_plan, compile_attention, load_spec, reference

SPECS = Path(__file__).resolve().parent.parent / "specs"
FILES = sorted(SPECS.glob("*.yaml"))
SCALE = 512

PAPER = [(2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]
EXPECTED = {
    "longnet-paper": (PAPER, "grouped", False),
    "longnet-causal": (PAPER, "grouped", True),
    "longnet-all": (PAPER, "all", False),
    "old-default": ([(2048, 1), (4096, 2), (8192, 4)], "grouped", False),
    "four-branch": ([(2048, 1), (4096, 2), (8192, 4), (16384, 8)], "grouped", False),
    "dense": ([(1048576, 1)], "grouped", False),
}


def ids(paths):
    return [p.stem for p in paths]


def test_library_has_the_expected_files():
    assert set(ids(FILES)) >= set(EXPECTED)


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_loads_with_header_and_name(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} has no comment header"
    spec = load_spec(path)
    assert spec.name == path.stem
    if path.stem in EXPECTED:
        branches, mode, causal = EXPECTED[path.stem]
        assert [(b.segment_length, b.dilation) for b in spec.branches] == branches
        assert all(b.offset is None for b in spec.branches)
        assert spec.head_assignment == mode and spec.causal is causal and spec.scale is None


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_round_trip(path, tmp_path):
    spec = load_spec(path)
    again = load_spec(spec.to_yaml())
    assert again == spec and again.key == spec.key
    copy = tmp_path / path.name
    copy.write_text(spec.to_yaml())
    assert load_spec(copy) == spec


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_plans_at_full_size(path):
    """The real (unscaled) spec plans at a long sequence, symbolically cheap, with sane costs."""
    spec = load_spec(path)
    heads = max(8, spec.num_branches)
    n = 2 * max(b.segment_length for b in spec.branches) if path.stem != "dense" else 8192
    plan = build_plan(spec, n, heads, 64)
    dense = 4 * heads * 64 * n * n // (2 if spec.causal else 1)
    assert 0 < int(plan.flops) <= dense * spec.num_branches
    if path.stem == "dense":
        assert int(plan.flops) == dense


def scaled_down(spec: AttentionSpec, factor: int = SCALE) -> AttentionSpec:
    """Every segment length divided by ``factor``; the rest of the spec unchanged (see the module docstring)."""
    branches = []
    for b in spec.branches:
        w = b.segment_length // factor
        assert w >= b.dilation, f"scaling {b} by {factor} would leave dilation > segment length"
        branches.append(dataclasses.replace(b, segment_length=w))
    return dataclasses.replace(spec, branches=tuple(branches), name=f"{spec.name}-scaled-{factor}")


@pytest.mark.parametrize("path", FILES, ids=ids(FILES))
def test_scaled_copy_runs_against_reference(path):
    spec = scaled_down(load_spec(path))
    largest = max(b.segment_length for b in spec.branches)
    n = min(2 * largest, 128) + 11  # whole segments of the longest branch (dense: one ragged one) + a tail
    heads = spec.num_branches + 1  # grouped: one group larger than the others
    attn = compile_attention(spec, backend="torch")
    q, k, v = make_qkv(1, n, heads, 8, dtype=torch.float32, requires_grad=True, seed=3)
    check_against_reference(attn, spec, q, k, v)


def test_scaled_dense_is_dense():
    spec = scaled_down(load_spec(SPECS / "dense.yaml"))
    assert spec.branches == (Branch(2048, 1),)
    assert bool(reference.allowed_pairs(139, 2048, 1, 0, False).all())
