"""benchmarks/wave_model.py: the busy fraction it reports for the persistent tile walk."""

import importlib.util
import math
from pathlib import Path

from dilated_compiler import AttentionSpec, Branch

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "wave_model.py"
_spec = importlib.util.spec_from_file_location("wave_model", _path)
wave_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wave_model)


def test_equal_tiles_leave_the_last_wave_idle():
    # both branches have 1024 selected rows per segment and no causal mask: every tile walks the same keys, so
    # the busy fraction is tiles / (SMs x ceil(tiles / SMs))
    spec = AttentionSpec((Branch(1024, 1), Branch(2048, 2)))
    for sms in (7, 16, 132):
        tiles, busy = wave_model.busy_fraction(spec, 8192, 6, 64, "q", 128, 64, sms)
        assert tiles == 3 * 8192 // 128 + 3 * 4096 // 128  # heads 0-2 select every row, heads 3-5 every other
        assert math.isclose(busy, tiles / (sms * math.ceil(tiles / sms)))


def test_causal_busy_fraction_with_many_and_few_waves():
    # 96 key tiles of unequal work (causal): one program is always busy; 12 waves on 8 SMs balance to within a
    # few percent; 1.5 waves on 64 SMs leave SMs idle that 12 waves keep busy
    spec = AttentionSpec((Branch(512, 1), Branch(1024, 2)), causal=True)
    results = [wave_model.busy_fraction(spec, 4096, 4, 64, "k", 128, 64, sms) for sms in (1, 8, 64)]
    assert [tiles for tiles, _ in results] == [96] * 3
    assert results[0][1] == 1.0
    assert results[1][1] >= 0.95
    assert 0 < results[2][1] < results[1][1]


def test_grouped_query_dkdv_walks_kv_head_tiles():
    # 4 query heads, 2 kv heads: each branch's 2 heads are one kv head's group, so the dk/dv pass has a tile per kv
    # head's key tile (64 + 32, half the 192 of query heads), each walking both query heads; equal work per tile,
    # so the busy fraction is again tiles / (SMs x ceil(tiles / SMs)); the query passes keep their tiles
    spec = AttentionSpec((Branch(1024, 1), Branch(2048, 2)))
    for sms in (7, 64, 132):
        tiles, busy = wave_model.busy_fraction(spec, 8192, 4, 64, "k", 128, 64, sms, kv_heads=2)
        assert tiles == 8192 // 128 + 4096 // 128
        assert math.isclose(busy, tiles / (sms * math.ceil(tiles / sms)))
        assert wave_model.busy_fraction(spec, 8192, 4, 64, "q", 128, 64, sms, kv_heads=2)[0] == 2 * tiles


def _tile_cost():
    """benchmarks/tile_cost.py as a module (it is a script, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tile_cost.py"
    spec = importlib.util.spec_from_file_location("tile_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tile_cost_cases_describe_their_tiles():
    # benchmarks/tile_cost.py's cases (N = 64K, 16 heads): w / r selected rows per segment, so (w / r) / 128 key
    # steps per query tile; every head selects N / r rows (one offset each), so 16 * N / r / 128 query tiles; the
    # four-branch case's heads split 4 ways, 4 * (N + N/2 + N/4 + N/8) / 128 tiles of 2048 / 128 steps; the busy
    # fraction of equal tiles as above
    tile_cost = _tile_cost()
    for pairs in tile_cost.CASES:
        if len(pairs) == 1:
            (w, r), = pairs
            tiles, steps = 16 * (65536 // r) // 128, w // r // 128
        else:
            tiles, steps = 4 * sum(65536 // r for _, r in pairs) // 128, 16
        busy = tiles / (132 * math.ceil(tiles / 132))
        text = tile_cost.describe(pairs, 132)
        assert f"{tiles} query tiles of {steps} key steps, busy fraction {busy:.3f}" in text, text


def test_tile_cost_kernel_names_are_the_lowerings():
    # tile_cost.py --kernels finds the Gluon kernels in a profile by name: each name must be a kernel of the
    # lowering's Gluon source, or the case would print "not launched" for a kernel that ran
    from dilated_compiler.lowering.triton import gluon_hopper
    tile_cost = _tile_cost()
    text = gluon_hopper.gluon_source(AttentionSpec((Branch(2048, 1),)), {})
    assert set(tile_cost.PRODUCTS) == {"gluon_fwd", "gluon_bwd_dq", "gluon_bwd_dkdv"}
    for name in tile_cost.PRODUCTS:
        assert f"\ndef {name}(" in text, name
