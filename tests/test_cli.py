"""The command line (dilated_compiler.cli): every subcommand through main([...]), exit codes, error paths."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import sympy
import torch

from dilated_compiler import build_plan, cli, compile_attention, load_spec, reference
from dilated_compiler import draw
from dilated_compiler.draw import MAX_SEQ_LEN, figure_size_px, panels
from dilated_compiler.spec import AttentionSpec, Branch
from dilated_compiler import lowering
from dilated_compiler.lowering import base as lowering_base
from dilated_compiler.planner import PASSES

SPECS = Path(__file__).resolve().parent.parent / "specs"

SMALL = """\
# two small branches, for fast CLI runs
name: small
branches:
  - {segment_length: 16, dilation: 1}
  - {segment_length: 32, dilation: 2}
"""
SMALL_ALL = SMALL.replace("name: small", "name: small-all\nhead_assignment: all\ncausal: true")
BAD = """\
branches:
  - {segment_length: 0, dilation: 1}
  - {segment_length: 64, dilation: 2, ofset: 1}
causal: maybe
"""


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return str(path)


@pytest.fixture
def small_all(tmp_path):
    path = tmp_path / "small-all.yaml"
    path.write_text(SMALL_ALL)
    return str(path)


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(err, *needles):
    """One line on stderr, no traceback, naming the command and the needles."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("dilated-compiler ") and ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- validate ------------------------------------------------------------------------------------------------


def test_validate_all_library_specs_ok(capsys):
    files = sorted(str(p) for p in SPECS.glob("*.yaml"))
    code, out, err = run_cli(capsys, "validate", *files)
    assert code == 0 and err == ""
    assert out.splitlines() == [f"ok: {f}" for f in files]


def test_validate_reports_every_problem_prefixed_by_file(capsys, tmp_path, small):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    code, out, err = run_cli(capsys, "validate", small, str(bad))
    assert code == 1
    assert out.splitlines() == [f"ok: {small}"]
    lines = err.strip().splitlines()
    assert all(line.startswith(f"{bad}: error: ") for line in lines), lines
    text = "\n".join(lines)
    assert "branches[0].segment_length: got 0" in text
    assert "branches[1].ofset: unknown key; did you mean 'offset'?" in text
    assert "causal: got 'maybe'" in text
    assert len(lines) == 3


def test_validate_missing_file_yaml_error_and_any_suffix(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    broken = tmp_path / "broken.yaml"
    broken.write_text("branches: [\n")
    txt = tmp_path / "spec.txt"  # a non-.yaml name is still read as a file, not parsed as YAML text
    txt.write_text(SMALL)
    code, out, err = run_cli(capsys, "validate", str(missing), str(broken), str(txt))
    assert code == 1
    assert out.splitlines() == [f"ok: {txt}"]
    assert f"{missing}: error: spec file" in err and "does not exist" in err
    assert re.search(rf"{re.escape(str(broken))}: error: YAML syntax error at line \d+", err)
    date = tmp_path / "date.yaml"  # a value YAML itself refuses: reported like any problem, the rest still checked
    date.write_text(SMALL.replace("name: small", "name: 2024-02-30"))
    code, out, err = run_cli(capsys, "validate", str(date), str(txt))
    assert code == 1 and out.splitlines() == [f"ok: {txt}"]
    assert f"{date}: error: " in err and "YAML value error" in err and "Traceback" not in err


def test_validate_needs_a_file(capsys):
    code, out, err = run_cli(capsys, "validate")
    assert code == 2 and "usage:" in err


# ---- plan ----------------------------------------------------------------------------------------------------


def test_plan_prints_explain(capsys):
    spec_path = str(SPECS / "old-default.yaml")
    code, out, err = run_cli(capsys, "plan", spec_path, "--seq-len", "20000", "--heads", "6", "--head-dim", "64")
    assert code == 0 and err == ""
    expected = build_plan(load_spec(Path(spec_path)), 20000, 6, 64, dtype_bytes=2).explain()
    assert out.strip() == expected.strip()
    assert "passes: expand_heads -> split_ragged" in out and "useful FLOPs fwd:" in out


def test_plan_dtype_batch_and_kv_heads(capsys, small):
    code, out, _ = run_cli(capsys, "plan", small, "-n", "64", "--heads", "4", "--head-dim", "8", "--batch", "3",
                           "--kv-heads", "2", "--dtype", "fp32")
    assert code == 0
    plan = build_plan(load_spec(Path(small)), 64, 4, 8, batch=3, kv_heads=2, dtype_bytes=4)
    assert out.strip() == plan.explain().strip()
    assert "B=3" in out and "Hkv=2" in out and "4-byte elements" in out


def test_plan_with_symbols(capsys, small):
    """plan takes a name for a shape (a symbol): the explain of the planner's symbolic plan, costs as formulas;
    run, show and draw take integers only."""
    code, out, err = run_cli(capsys, "plan", str(SPECS / "four-branch.yaml"), "-n", "N", "--heads", "16",
                             "--head-dim", "D", "--batch", "B")
    assert code == 0 and err == ""
    plan = build_plan(load_spec(SPECS / "four-branch.yaml"), "N", 16, "D", batch="B")
    assert out.strip() == plan.explain().strip()
    assert "floor(N/2048)" in out and "Mod(N, 2048)" in out and "fraction of dense" not in out
    N, D, B = (sympy.Symbol(x, integer=True, positive=True) for x in "NDB")
    assert plan.flops.subs({N: 70000, D: 64, B: 2}) == build_plan(load_spec(SPECS / "four-branch.yaml"), 70000, 16,
                                                                  64, batch=2).flops
    code, _, err = run_cli(capsys, "plan", small, "-n", "64", "--heads", "H", "--head-dim", "8", "--kv-heads", "2")
    assert code == 0 and err == ""
    code, _, err = run_cli(capsys, "plan", small, "-n", "64", "--heads", "1H", "--head-dim", "8")
    assert code == 2 and "expected a positive integer or a name for a symbol (such as N), got '1H'" in err
    code, _, err = run_cli(capsys, "show", small, "-n", "N", "--heads", "4", "--head-dim", "8")
    assert code == 2 and "expected a positive integer, got 'N'" in err


def test_plan_list_passes(capsys, small):
    code, out, err = run_cli(capsys, "plan", "--list-passes")
    assert code == 0 and err == ""
    # with a SPEC but no shapes: the list alone, not an error after it
    assert run_cli(capsys, "plan", small, "--list-passes") == (0, out, "")
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == list(PASSES)
    for line, fn in zip(out.splitlines()[1:], PASSES.values()):
        first_words = " ".join(fn.__doc__.split()[:4])
        assert first_words in line


def test_plan_errors(capsys, small):
    code, _, err = run_cli(capsys, "plan", small, "--seq-len", "64")
    assert code == 2 and "--heads" in err and "--head-dim" in err
    code, _, err = run_cli(capsys, "plan")
    assert code == 2 and "SPEC" in err
    code, _, err = run_cli(capsys, "plan", small, "-n", "64", "--heads", "1", "--head-dim", "8")
    assert code == 1
    assert_clean_error(err, "grouped mode needs heads >= number of branches")
    code, _, err = run_cli(capsys, "plan", small, "-n", "64", "--heads", "4", "--head-dim", "8", "--kv-heads", "3")
    assert code == 1
    assert_clean_error(err, "kv heads (3) must divide heads (4)")


@pytest.mark.parametrize("flags", [
    ["--seq-len", "0"], ["--seq-len", "4k"], ["--heads", "-2"], ["--head-dim", "1.5"], ["--dtype", "int8"],
    ["--frobnicate"],
])
def test_bad_flags_are_usage_errors(capsys, small, flags):
    argv = ["plan", small, "--seq-len", "64", "--heads", "4", "--head-dim", "8"] + flags
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert "usage: dilated-compiler plan" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2 ** 64)], "0 <= seed < 2**64"), (["--seed", "-1"], "0 <= seed < 2**64"),
    (["--device", "meta"], "allowed: cpu, cuda, cuda:N"), (["--device", "nodevice"], "allowed: cpu, cuda, cuda:N"),
])
def test_run_flags_out_of_range_are_usage_errors(capsys, small, flags, message):
    code, out, err = run_cli(capsys, "run", small, "-n", "64", *flags)
    assert code == 2 and out == ""
    assert "usage: dilated-compiler run" in err and message in err and "Traceback" not in err


def test_unknown_command_and_no_command(capsys):
    assert run_cli(capsys, "compile")[0] == 2
    assert run_cli(capsys)[0] == 2
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "validate" in out and "draw" in out


def test_invalid_spec_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    code, _, err = run_cli(capsys, "plan", str(bad), "-n", "64", "--heads", "4", "--head-dim", "8")
    assert code == 1
    assert_clean_error(err, "invalid attention spec", "branches[0].segment_length", "causal")
    code, _, err = run_cli(capsys, "show", str(tmp_path / "missing.yaml"), "-n", "64", "--heads", "4",
                           "--head-dim", "8")
    assert code == 1
    assert_clean_error(err, "does not exist")


# ---- show ----------------------------------------------------------------------------------------------------


def test_show_torch(capsys, small):
    code, out, err = run_cli(capsys, "show", small, "--backend", "torch", "--device", "cpu", "-n", "80",
                             "--heads", "4", "--head-dim", "16", "--dtype", "fp32")
    assert code == 0 and err == ""
    expected = compile_attention(load_spec(Path(small)), backend="torch").kernel_source(
        80, 4, 16, dtype=torch.float32, device="cpu")
    assert out.strip() == expected.strip()
    assert "torch lowering" in out and "unflatten(1, (5, 16))" in out


def test_show_triton_unavailable_is_clean_error(capsys, small, monkeypatch):
    monkeypatch.delitem(lowering_base._LOWERINGS, "triton", raising=False)
    code, out, err = run_cli(capsys, "show", small, "--backend", "triton", "--device", "cpu", "-n", "64",
                             "--heads", "4", "--head-dim", "16")
    assert code == 1 and out == ""
    assert_clean_error(err, "backend 'triton' is not available")
    code, out, err = run_cli(capsys, "run", small, "--backend", "triton", "--device", "cpu", "-n", "64")
    assert code == 1
    assert_clean_error(err, "backend 'triton' is not available")


def test_show_triton_available_prints_its_source(capsys, tmp_path, monkeypatch):
    """With a 'triton' lowering registered, show prints what it generates (a stand-in lowering here, so the
    test does not depend on the Triton lowering's state; a spec with its own key keeps the cache clean)."""

    class FakeLowered:
        def __init__(self, plan, device, dtype):
            self.plan, self.device, self.dtype = plan, device, dtype

        def source(self):
            return f"@triton.jit  # N={self.plan.seq_len} H={self.plan.heads} dtype={self.dtype}"

    monkeypatch.setitem(lowering_base._LOWERINGS, "triton", FakeLowered)
    path = tmp_path / "fake.yaml"
    path.write_text(SMALL + "scale: 0.123457\n")
    code, out, err = run_cli(capsys, "show", str(path), "--backend", "triton", "--device", "cpu", "-n", "96",
                             "--heads", "4", "--head-dim", "16", "--dtype", "fp16")
    assert code == 0 and err == ""
    assert out.strip() == "@triton.jit  # N=96 H=4 dtype=torch.float16"


@pytest.mark.skipif(not lowering.triton_available(), reason="triton unavailable")
def test_show_triton_prints_the_generated_kernels(capsys):
    """The real Triton lowering through the CLI: the kernels of the module's kernel_source(), glossaries included."""
    spec = str(Path(__file__).resolve().parents[1] / "specs" / "four-branch.yaml")
    code, out, err = run_cli(capsys, "show", spec, "--backend", "triton", "--device", "cpu", "-n", "8192",
                             "--heads", "8", "--head-dim", "64", "--dtype", "bf16")
    assert code == 0 and err == ""
    expected = compile_attention(load_spec(Path(spec)), backend="triton").kernel_source(
        8192, 8, 64, dtype=torch.bfloat16, device="cpu")
    assert out.strip() == expected.strip()
    for kernel in ("dilated_fwd", "dilated_bwd_dq", "dilated_bwd_dkdv"):
        assert f"def {kernel}(" in out and f"# {kernel}:" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(capsys, small):
    code, _, err = run_cli(capsys, "show", small, "--device", "cuda", "-n", "64", "--heads", "4", "--head-dim", "8")
    assert code == 1
    assert_clean_error(err, "CUDA is not available")


# ---- run -----------------------------------------------------------------------------------------------------


def _errors_line(out):
    """run's heading line of the reference check ("max abs error against ...")."""
    return next(l for l in out.splitlines() if l.startswith("max abs"))


def _errors(out):
    """The error figures run prints: {name: value}."""
    lines = out.splitlines()
    line = lines[lines.index(_errors_line(out)) + 1]
    return {name: float(value) for name, value in re.findall(r"(out|lse|dq|dk|dv) (\S+)", line)}


def test_run_prints_timings_and_small_errors(capsys, small):
    code, out, err = run_cli(capsys, "run", small, "-n", "96", "--heads", "4", "--head-dim", "16", "--repeats", "2",
                             "--device", "cpu", "--dtype", "fp32")
    assert code == 0 and err == ""
    assert "backend: torch  device: cpu  dtype: float32" in out
    assert "shape: B=1 N=96 H=4 Hkv=4 D=16" in out
    plan = build_plan(load_spec(Path(small)), 96, 4, 16)
    assert f"fwd {int(plan.flops):.4g}" in out
    for what in ("forward ", "forward+backward"):
        line = next(l for l in out.splitlines() if l.strip().startswith(what))
        tflops = float(re.search(r"([\d.e+-]+) TFLOP/s", line).group(1))
        assert tflops > 0
    assert "(N=96, same inputs)" in out
    errors = _errors(out)
    assert set(errors) == {"out", "lse", "dq", "dk", "dv"}
    assert all(0 <= e < 1e-4 for e in errors.values()), errors


def test_run_default_seq_len_all_mode_and_gqa(capsys, small_all):
    code, out, _ = run_cli(capsys, "run", small_all, "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                           "--repeats", "1", "--device", "cpu", "--batch", "2", "--dtype", "fp64")
    assert code == 0
    assert "shape: B=2 N=64 (default: 2 x largest segment) H=4 Hkv=2 D=8" in out
    assert "(all, causal; 2 branches)" in out
    errors = _errors(out)
    assert all(0 <= e < 1e-5 for e in errors.values()), errors


def test_run_caps_the_reference_check(capsys, small, monkeypatch):
    # A tiny memory budget forces the reference check onto a prefix; it must say so and still be accurate.
    monkeypatch.setattr(cli, "REF_BUDGET_BYTES", 48 * 4 * 40 * 40)
    code, out, _ = run_cli(capsys, "run", small, "-n", "128", "--heads", "4", "--head-dim", "8", "--repeats", "1",
                           "--device", "cpu", "--dtype", "fp32")
    assert code == 0
    assert "(N=40, the first 40 positions as a separate call" in out
    assert all(0 <= e < 1e-4 for e in _errors(out).values())


def test_run_no_check_and_default_seq_len():
    spec = load_spec(SPECS / "longnet-paper.yaml")
    assert cli.default_seq_len(spec, "cpu") == cli.RUN_SEQ_CAP["cpu"] == 2048
    assert cli.default_seq_len(spec, "cuda") == 65536
    assert cli.default_seq_len(load_spec(SMALL), "cpu") == 64
    assert cli.reference_seq_len(2048, 1, 8, 1) == 2048
    assert cli.reference_seq_len(2048, 1, 8, 5) < 2048


def test_run_no_check(capsys, small):
    code, out, _ = run_cli(capsys, "run", small, "-n", "32", "--heads", "2", "--head-dim", "8", "--repeats", "1",
                           "--no-check", "--device", "cpu")
    assert code == 0 and "reference check: skipped (--no-check)" in out and "max abs" not in out


# ---- draw ----------------------------------------------------------------------------------------------------


def _read_png(path):
    import matplotlib.image
    return matplotlib.image.imread(str(path))  # (h, w, 4) floats in [0, 1]


def _colored_fraction(img):
    rgb = img[..., :3]
    return float(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2).mean())


def test_draw_writes_png(capsys, tmp_path, small):
    out_path = tmp_path / "pattern.png"
    code, out, err = run_cli(capsys, "draw", small, "--seq-len", "96", "--out", str(out_path))
    assert code == 0 and err == ""
    assert out.strip().startswith(f"wrote {out_path} (2 panels")
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = _read_png(out_path)
    w, h = figure_size_px(2, 2)
    assert img.shape[:2] == (h, w)
    assert f"{w}x{h} px" in out
    assert 0.005 < _colored_fraction(img) < 0.5  # the attended cells are coloured; most of the page is not


def test_draw_causal_colours_fewer_cells(capsys, tmp_path, small):
    causal = tmp_path / "causal.yaml"
    causal.write_text(SMALL + "causal: true\n")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run_cli(capsys, "draw", small, "-n", "128", "-o", str(a))[0] == 0
    assert run_cli(capsys, "draw", str(causal), "-n", "128", "-o", str(b))[0] == 0
    fa, fb = _colored_fraction(_read_png(a)), _colored_fraction(_read_png(b))
    assert 0.4 < fb / fa < 0.7  # causal keeps about half of each segment's pairs (plus the diagonal)


def test_draw_all_mode_panels_and_scale(capsys, tmp_path):
    spec_path = str(SPECS / "longnet-all.yaml")
    out_path = tmp_path / "all.png"
    code, out, _ = run_cli(capsys, "draw", spec_path, "-n", "256", "--scale", "128", "-o", str(out_path),
                           "--heads", "3")
    assert code == 0 and "(3 panels" in out  # 3 heads with distinct offsets (h % r for r = 1, 2, 4, 6, 12)
    assert _read_png(out_path).shape[:2][::-1] == figure_size_px(3, 5)
    code, out, _ = run_cli(capsys, "draw", spec_path, "-n", "256", "--scale", "128", "-o", str(out_path),
                           "--heads", "3", "--per-branch")
    assert code == 0 and "(12 panels" in out  # branch with dilation r contributes min(r, 3) offsets: 1+2+3+3+3
    assert _read_png(out_path).shape[:2][::-1] == figure_size_px(12, 5)


def test_draw_panels_follow_reference():
    spec = load_spec(SMALL_ALL)
    n, heads = 70, 4
    per_head = reference.head_branches(spec, heads)
    ps = panels(spec, heads)
    assert sorted(h for p in ps for h in p.heads) == list(range(heads))
    for p in ps:
        for h in p.heads:
            want = torch.zeros(n, n, dtype=torch.bool)
            for (w, r, o) in per_head[h]:
                want |= reference.allowed_pairs(n, w, r, o, spec.causal)
            assert torch.equal(p.union(n, spec.causal), want)
    grouped = panels(load_spec(SMALL), 5)
    assert [p.heads for p in grouped] == [(0, 1, 2), (3, 4)]
    assert [p.branches for p in grouped] == [((0, 16, 1, 0),), ((1, 32, 2, 1),)]
    assert "w=32 r=2 offset=1" in grouped[1].title and "heads 3-4" in grouped[1].title


def test_draw_errors(capsys, tmp_path, small):
    out_path = tmp_path / "big.png"
    code, _, err = run_cli(capsys, "draw", small, "-n", str(MAX_SEQ_LEN + 1), "-o", str(out_path))
    assert code == 1 and not out_path.exists()
    assert_clean_error(err, "too large to draw", str(MAX_SEQ_LEN))
    code, _, err = run_cli(capsys, "draw", small, "-n", "64", "-o", str(tmp_path / "no" / "dir.png"))
    assert code == 1
    assert_clean_error(err, "does not exist")
    code, _, err = run_cli(capsys, "draw", small, "-n", "64", "--scale", "3", "-o", str(out_path))
    assert code == 1
    assert_clean_error(err, "cannot scale down by 3")
    code, _, err = run_cli(capsys, "draw", small, "-n", "64")
    assert code == 2 and "--out" in err
    # a name without an image suffix, or a folder: matplotlib would write name + ".png", or beside the folder
    for out in (tmp_path / "pattern", tmp_path / "pattern.bmpx", tmp_path):
        code, _, err = run_cli(capsys, "draw", small, "-n", "64", "-o", str(out))
        assert code == 1
        assert_clean_error(err, str(out), "folder" if out == tmp_path else ".png, .ps")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.yaml"]  # nothing written anywhere
    assert not Path(str(tmp_path) + ".png").exists()


# ---- entry points --------------------------------------------------------------------------------------------


def test_python_dash_m(tmp_path, small):
    result = subprocess.run([sys.executable, "-m", "dilated_compiler", "validate", small,
                             str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stdout.strip() == f"ok: {small}"
    assert "missing.yaml: error: spec file" in result.stderr and "Traceback" not in result.stderr


# in all mode the reference budget counts every branch of a head
def test_cli_run_caps_reference_per_branch_in_all_mode(capsys, tmp_path, monkeypatch):
    path = tmp_path / "small-all.yaml"
    path.write_text(SMALL_ALL)
    monkeypatch.setattr(cli, "REF_BUDGET_BYTES", 48 * 4 * 2 * 40 * 40)  # 4 heads x 2 branches per head
    code = cli.main(["run", str(path), "-n", "128", "--heads", "4", "--head-dim", "8", "--repeats", "1",
                     "--device", "cpu", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert code == 0 and "(N=40, the first 40 positions" in _errors_line(out)


# the '% of dense attention' figure halves the dense cost for causal specs
def test_cli_run_dense_fraction_causal(capsys, tmp_path):
    path = tmp_path / "small-all.yaml"
    path.write_text(SMALL_ALL)
    code = cli.main(["run", str(path), "-n", "64", "--heads", "2", "--head-dim", "8", "--repeats", "1",
                     "--device", "cpu", "--no-check"])
    out = capsys.readouterr().out
    plan = build_plan(load_spec(SMALL_ALL), 64, 2, 8)
    dense = 4 * 1 * 2 * 8 * 64 ** 2 // 2
    pct = float(re.search(r"\(([\d.e+-]+)% of dense attention\)", out).group(1))
    assert code == 0 and pct == pytest.approx(100 * plan.flops / dense, rel=1e-2)


# more than MAX_PANELS panels is refused, exactly MAX_PANELS is drawn
def test_draw_panel_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(draw, "MAX_PANELS", 2)
    two = AttentionSpec((Branch(4, 1), Branch(8, 2)), head_assignment="grouped")
    three = AttentionSpec((Branch(4, 1), Branch(8, 2), Branch(16, 4)), head_assignment="grouped")
    assert draw.draw_pattern(two, 16, tmp_path / "a.png")["panels"] == 2
    with pytest.raises(draw.DrawError, match=r"3 panels \(more than 2\)"):
        draw.draw_pattern(three, 16, tmp_path / "b.png")


# block-averaged cells: 0 where nothing is attended, else 0.35 + 0.65 * fraction
def test_draw_cells_shading():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 0] = True
    cells = draw._cells(mask, 4)
    assert cells.shape == (4, 4) and cells[0, 0].item() == pytest.approx(0.35 + 0.65 * 0.25)
    assert (cells.flatten()[1:] == 0).all()


# all mode draws 8 heads by default
def test_draw_default_heads_all_mode(capsys, tmp_path):
    code = cli.main(["draw", str(SPECS / "longnet-all.yaml"), "-n", "256", "--scale", "128", "-o",
                     str(tmp_path / "x.png")])
    out = capsys.readouterr().out
    assert code == 0 and "(8 panels" in out  # h % r distinct for h < 12: one panel per head


# scaling a segment below its dilation is a DrawError naming the scale factor
def test_draw_scale_below_dilation(tmp_path):
    with pytest.raises(draw.DrawError, match=r"cannot scale down by 4: branches\[0\]: segment_length 8 / 4 must be "
                                             r"a whole number >= dilation 4"):
        draw.draw_pattern(AttentionSpec((Branch(8, 4),)), 16, tmp_path / "x.png", scale=4)
