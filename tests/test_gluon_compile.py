"""The Gluon kernels (``lowering/triton/gluon_hopper.py``) compile for sm_90a without a GPU, with the launch
constexprs the lowering uses, and their matrix-instruction loops do not spill to local memory.

Gluon is experimental and its API changes between Triton releases, so the kernels are compiled only with the
release they are checked on (``gluon_hopper.CHECKED_TRITON``); elsewhere these tests are skipped. The CI runs
them in a second environment with that release (``scripts/gluon_compile_check.sh``). Numerics are checked on a
GPU (``test_triton_lowering.py``, tests marked gpu).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dilated_compiler import AttentionSpec, Branch, build_plan

triton = pytest.importorskip("triton")
from dilated_compiler.lowering.triton import gluon_hopper  # noqa: E402

if not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
    pytest.skip(f"the Gluon kernels compile with triton {gluon_hopper.CHECKED_TRITON[0]}x only "
                f"(this is {triton.__version__}; scripts/gluon_compile_check.sh makes such an environment)",
                allow_module_level=True)

from dilated_compiler.lowering.triton.gluon_compile import (  # noqa: E402
    MAX_SHARED, compile_sm90, launch_constexprs, operand_overwrites, sass, summarize)
from dilated_compiler.lowering.triton.lowering import TritonLowering  # noqa: E402


# strides typed int64 (as past 2^31 elements, and as the SASS fingerprints type them) and int32 (as a launch types
# them below 2^31: the variant that runs at all but the largest sizes)
STRIDES = ["i64", "i32"]


def _kernels(head_dim: int, causal: bool):
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)), causal=causal)
    return TritonLowering(build_plan(spec, 1024, 4, head_dim), torch.device("cpu"), torch.bfloat16).gluon_kernels


@pytest.mark.parametrize("kernel,head_dim,causal,has_dlse,dtype", [
    ("gluon_fwd", 128, False, False, "bf16"), ("gluon_fwd", 128, True, False, "bf16"),
    ("gluon_fwd", 64, False, False, "fp16"), ("gluon_fwd", 64, True, False, "bf16"),
    ("gluon_bwd_dq", 128, False, True, "bf16"), ("gluon_bwd_dq", 128, True, False, "fp16"),
    ("gluon_bwd_dq", 64, False, False, "bf16"), ("gluon_bwd_dq", 64, True, True, "bf16"),
    ("gluon_bwd_dkdv", 128, False, False, "bf16"), ("gluon_bwd_dkdv", 128, True, False, "fp16"),
    ("gluon_bwd_dkdv", 64, False, False, "bf16"), ("gluon_bwd_dkdv", 64, True, False, "bf16"),
])
@pytest.mark.parametrize("strides", STRIDES)
def test_gluon_kernel_compiles_without_spills(kernel, head_dim, causal, has_dlse, dtype, strides):
    kernels = _kernels(head_dim, causal)
    _check(compile_sm90(getattr(kernels, kernel), launch_constexprs(kernel, head_dim, causal, has_dlse), dtype,
                        strides=strides))


@pytest.mark.parametrize("head_dim,causal", [(128, False), (128, True), (64, False)])
@pytest.mark.parametrize("strides", STRIDES)
def test_gluon_fwd_all_mode_compiles_without_spills(head_dim, causal, strides):
    """"all" mode's forward (MERGE: per-branch out and lse, no zero fill)."""
    consts = {**launch_constexprs("gluon_fwd", head_dim, causal, False), "MERGE": True, "ZFILL": False}
    _check(compile_sm90(_kernels(head_dim, causal).gluon_fwd, consts, strides=strides))


@pytest.mark.parametrize("gqa,merge,causal", [(2, False, False), (4, False, True), (8, True, False)])
def test_gluon_fwd_gqa_compiles_without_spills(gqa, merge, causal):
    """Grouped-query attention's forward (GQA > 1: K and V read at kv head h // GQA), both modes."""
    consts = {**launch_constexprs("gluon_fwd", 128, causal, False), "GQA": gqa, "MERGE": merge, "ZFILL": not merge}
    _check(compile_sm90(_kernels(128, causal).gluon_fwd, consts))


@pytest.mark.parametrize("kernel,gqa,acc,causal,head_dim", [
    ("gluon_bwd_dq", 2, 0, False, 128), ("gluon_bwd_dq", 4, 0, True, 128), ("gluon_bwd_dq", 8, 3, True, 128),
    ("gluon_bwd_dkdv", 2, 0, False, 128), ("gluon_bwd_dkdv", 4, 0, True, 128), ("gluon_bwd_dkdv", 8, 0, False, 64),
    ("gluon_bwd_dkdv", 2, 3, False, 128), ("gluon_bwd_dkdv", 4, 1, True, 128), ("gluon_bwd_dkdv", 4, 4, True, 64),
    ("gluon_bwd_dkdv", 2, "split", False, 128), ("gluon_bwd_dkdv", 8, "split", True, 128),
    ("gluon_bwd_dkdv", 4, "split", True, 64)])
def test_gluon_bwd_gqa_compiles_without_spills(kernel, gqa, acc, causal, head_dim):
    """Grouped-query attention's backward: dq reads K and V at kv head h // GQA; dk/dv walks its tile's query heads
    in turn (grouped, zero fill; "all" mode's phases, ACC > 0; or grouped mode's phases where a kv head's query
    heads span branches: SPLIT, ACC 1)."""
    consts = {**launch_constexprs(kernel, head_dim, causal, True), "GQA": gqa}
    pointers = {}
    if acc == "split":
        consts.update(ACC=1, ZFILL=False, PHASED=True, SPLIT=True, OVERLAP=False)
        pointers = {"DK": "*fp32", "DV": "*fp32"}
    elif acc:
        consts.update(ACC=acc, ZFILL=False, PHASED=True, OVERLAP=False)
        pointers = {"DQ": "*fp32"} if kernel == "gluon_bwd_dq" else {"DK": "*fp32", "DV": "*fp32"}
    _check(compile_sm90(getattr(_kernels(head_dim, causal), kernel), consts, pointers=pointers))


def _int64_offsets(ir: str, name: str) -> bool:
    """Whether the IR widens the int32 argument ``name`` to int64 before using it."""
    import re
    return re.search(rf"arith\.extsi %{name}\w* : i32 to i64", ir) is not None


@pytest.mark.parametrize("kernel", ["dilated_merge", "gluon_fwd"])
def test_all_mode_branch_offsets_are_64_bit_when_the_stride_is_int32(kernel):
    """"all" mode's per-branch outputs lie g * stride_og elements apart (stride_og = B*N*H*D), which passes 2^31 for
    g >= 2 from B*N*H*D = 2^30 (bf16, B = 8, N = 64K, H = 16, D = 128), while an int argument below 2^31 reaches the
    kernel as int32: the offset must be widened before the multiply."""
    lowering = TritonLowering(build_plan(AttentionSpec((Branch(256, 1), Branch(512, 2)), head_assignment="all"),
                                         1024, 4, 128), torch.device("cpu"), torch.bfloat16)
    if kernel == "dilated_merge":
        consts = dict(G=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_R=32, num_warps=4)
        types = {"AUX": "*fp32", "LSE": "*fp32"}
        compiled = compile_sm90(lowering.kernels.dilated_merge, consts, pointers=types, strides="i32")
        # strides equal to 1 (B = N = H = D = 1) arrive as constants, which the widening must take too
        compile_sm90(lowering.kernels.dilated_merge, consts, pointers=types, strides="i32",
                     ints={"stride_og": 1, "stride_ag": 1})
    else:
        consts = {**launch_constexprs("gluon_fwd", 128, False), "MERGE": True, "ZFILL": False}
        compiled = compile_sm90(lowering.gluon_kernels.gluon_fwd, consts, strides="i32")
    assert _int64_offsets(compiled.asm["ttir" if kernel == "dilated_merge" else "ttgir"], "stride_og")


@pytest.mark.parametrize("kernel,head_dim,causal,acc", [
    ("gluon_bwd_dq", 128, False, 1), ("gluon_bwd_dq", 128, True, 1), ("gluon_bwd_dq", 64, True, 1),
    ("gluon_bwd_dkdv", 128, False, 1), ("gluon_bwd_dkdv", 128, True, 1), ("gluon_bwd_dkdv", 64, True, 1),
    ("gluon_bwd_dq", 128, False, 2), ("gluon_bwd_dkdv", 128, False, 2), ("gluon_bwd_dkdv", 64, True, 2),
    ("gluon_bwd_dq", 128, False, 3), ("gluon_bwd_dq", 128, True, 3), ("gluon_bwd_dkdv", 128, False, 3),
    ("gluon_bwd_dkdv", 128, True, 3), ("gluon_bwd_dkdv", 64, True, 3), ("gluon_bwd_dq", 64, False, 4),
    ("gluon_bwd_dkdv", 128, False, 4)])
@pytest.mark.parametrize("strides", STRIDES)
def test_gluon_backward_acc_compiles_without_spills(kernel, head_dim, causal, acc, strides):
    """"all" mode's backward form (ACC, PHASED: one launch over the branches in phases, adding into float32 dq, dk,
    dv, or in the first phase storing: ACC 2; with a last phase writing the results in the inputs' dtype: ACC 3
    and 4; no zero fill), which the lowering runs where gluon_hopper.ALL_MODE_BACKWARD is set."""
    consts = {**launch_constexprs(kernel, head_dim, causal, True), "ACC": acc, "ZFILL": False, "PHASED": True,
              "OVERLAP": False}
    fp32 = {"DQ": "*fp32"} if kernel == "gluon_bwd_dq" else {"DK": "*fp32", "DV": "*fp32"}
    _check(compile_sm90(getattr(_kernels(head_dim, causal), kernel), consts, "bf16", fp32, strides=strides))


@pytest.mark.parametrize("kernel", ["gluon_bwd_dq", "gluon_bwd_dkdv"])
@pytest.mark.parametrize("acc", [1, 2])
def test_gluon_backward_one_phase_compiles(kernel, acc):
    """"all" mode with one branch: a phased backward of one phase (NPH = 1), one tile (T = 1), B = H = 1, with the
    runtime's specialisation of arguments equal to 1 (triton 3.6 fails to compile ACC 2 with NPH the constant 1)."""
    consts = {**launch_constexprs(kernel, 64, False, False), "ACC": acc, "ZFILL": False, "PHASED": True,
              "OVERLAP": False}
    fp32 = {"DQ": "*fp32"} if kernel == "gluon_bwd_dq" else {"DK": "*fp32", "DV": "*fp32"}
    _check(compile_sm90(getattr(_kernels(64, False), kernel), consts, "bf16", fp32, ints=dict(NPH=1, T=1, B=1, H=1)))


def _check(compiled):
    sass = summarize(compiled)
    assert sass.shared <= MAX_SHARED, f"{sass.shared} bytes of shared memory"
    assert sass.hgmma > 0, "no warpgroup matrix instructions"
    assert sass.spills_in_steps == 0, f"{sass.spills_in_steps} spill instructions among a step's matrix instructions"
    assert sass.serialized is None, f"ptxas serialises the matrix instructions: {sass.serialized}"
    assert not sass.overwrites, f"A-operand registers rewritten between two products: {sass.overwrites[:4]}"


@pytest.mark.parametrize("dtype,head_dim,dot", [(torch.float32, d, dot) for dot in ("ieee", "tf32")
                                                 for d in (64, 128, 256)] + [(torch.float16, 128, None)])
def test_tl_tile_candidates_fit_in_shared_memory(dtype, head_dim, dot):
    """Every tile config the autotuner may try for this dtype, head_dim and float32 product precision
    (autotune.candidates; float32's own, exact or TF32) fits a block's shared memory on sm_90, through tensor
    descriptors and through pointer loads (a TMA config runs so where the inputs are not 16-byte aligned). The
    16-bit D = 128 configs did not fit at float32. And no loop rewrites a product's A-operand registers before
    another product reads them (operand_overwrites, as _check refuses for the Gluon kernels)."""
    from dilated_compiler.lowering.triton import autotune
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)), causal=True)
    low = TritonLowering(build_plan(spec, 1024, 4, head_dim), torch.device("cpu"), dtype, float32_dot=dot)
    flags = {"fwd": dict(MERGE=False), "dq": dict(ATOMIC=False, HAS_DLSE=True), "dkdv": dict(ATOMIC=False)}
    kernels = {"fwd": "dilated_fwd", "dq": "dilated_bwd_dq", "dkdv": "dilated_bwd_dkdv"}
    over, overwrites, n = [], [], 0
    for pass_name, kernel in kernels.items():
        for cfg in autotune.candidates(pass_name, head_dim, dtype.itemsize, low.dot_precision):
            own, partner = ("BLOCK_N", "BLOCK_M") if pass_name == "dkdv" else ("BLOCK_M", "BLOCK_N")
            for tma in sorted({cfg.tma, False}):
                consts = dict(HEAD_DIM=head_dim, BLOCK_D=low.block_d, GQA=1, CAUSAL=True, HAS_KPM=False, TMA=tma,
                              ZFILL=True, **{own: cfg.block, partner: cfg.partner}, **flags[pass_name],
                              **cfg.launch_options())
                compiled = compile_sm90(getattr(low.kernels, kernel), consts, str(dtype).replace("torch.float", "fp"))
                n += 1
                if compiled.metadata.shared > MAX_SHARED:
                    over.append(f"{kernel} {cfg} {'TMA' if tma else 'pointers'}: {compiled.metadata.shared} B")
                overwrites += [f"{kernel} {cfg}: {w}" for w in operand_overwrites(sass(compiled))]
    assert n >= 6 and not over, f"over {MAX_SHARED} B of shared memory: {over}"
    assert not overwrites, f"A-operand registers rewritten between two products: {overwrites[:4]}"


EXPERIMENTS = ["gluon_bwd_experiment", "gluon_bwd_tile_experiment", "gluon_causal_experiment", "gluon_dkdv_experiment",
               "gluon_dkdv_ld_experiment", "gluon_dkdv_skew_experiment", "gluon_dq_experiment",
               "gluon_dq_regs_experiment", "gluon_dq_skew_experiment", "gluon_ds_experiment", "gluon_fwd_experiment",
               "gluon_offs32_experiment", "gluon_pingpong_experiment", "gluon_q2_experiment", "gluon_red_experiment"]


def _load(relpath: str):
    """The module at ``relpath`` from the repository's root (a script of benchmarks/ or scripts/, not a package)."""
    path = Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", EXPERIMENTS)
def test_experiment_kernels_compile(script):
    """The experiment scripts in benchmarks/experiments/ that carry their own kernels or launch constexprs still
    compile them (``--check-compile``): a kernel parameter added to the lowering's kernels shows here, not on the
    GPU."""
    root = Path(__file__).resolve().parents[1]
    script_path = root / "benchmarks" / "experiments" / f"{script}.py"
    run = subprocess.run([sys.executable, str(script_path), "--check-compile"], cwd=root, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(root)})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    # the scripts report a variant that fails to compile on a line of its own and go on
    failed = [line for line in out.splitlines() if "Error" in line]
    assert not failed, "\n".join(failed)
    # matrix instructions counted, not only named: "HGMMA <n>" (SassSummary) or "wgmma: <n>"
    counts = [int(n) for n in re.findall(r"(?:HGMMA|wgmma:) (\d+)", out)]
    assert counts and min(counts) > 0, out[-3000:]


def test_ds_experiment_tl_kernels_on_cpu():
    """gluon_ds_experiment.py's tl kernels (dQ from a stored dS, and delta) agree with torch under the
    interpreter (``--check-cpu``); its Gluon kernels are compiled by test_experiment_kernels_compile."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "experiments" / "gluon_ds_experiment.py"),
                          "--check-cpu"], cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert out.count("max abs error") == 3, out[-3000:]


def test_serialized_matrix_instructions_are_reported():
    """summarize names ptxas's reason where it serialises the matrix instructions, which _check refuses: stop 9's
    PIPE form of the dq kernel (rebuilt in gluon_dq_skew_experiment.py; measured 45% slower) is serialised, the
    lowering's dq kernel and the experiment's skewed form are not."""
    exp = _load("benchmarks/experiments/gluon_dq_skew_experiment.py")
    consts = launch_constexprs("gluon_bwd_dq", 128, False)
    found = {}
    for form in exp.FORMS:
        low = exp.variant(TritonLowering(build_plan(AttentionSpec((Branch(256, 1), Branch(512, 2))), 1024, 4, 128),
                                         torch.device("cpu"), torch.bfloat16), form)
        found[form] = summarize(compile_sm90(low.gluon_kernels.gluon_bwd_dq, consts)).serialized
    assert found[exp.FORMS[0]] is None and found[exp.FORMS[1]] is None, found
    assert found[exp.FORMS[2]] is not None and "register" in found[exp.FORMS[2]], found


def _loop(body: str) -> str:
    """SASS of a loop at .L_x_5 over ``body``'s instructions (separated by "|"), branching back at its end."""
    lines = ["        /*0000*/                   MOV R1, c[0x0][0x28] ;", ".L_x_5:"]
    lines += [f"        /*{16 * (i + 1):04x}*/                   {ins} ;" for i, ins in enumerate(body.split("|"))]
    lines += [f"        /*{16 * (len(lines) + 1):04x}*/               @P0 BRA `(.L_x_5) ;"]
    return "\n".join(lines)


def test_operand_overwrites_on_hand_written_sass():
    """operand_overwrites reports a register a loop's product reads as its A operand, then rewritten, then read by
    another product of the same pass; not one written before its first read (the pass's own value), nor one
    carried to the next pass on purpose (written after its only read), nor a branch back over an EXIT (ptxas's
    out-of-line wait loops)."""
    read = "HGMMA.64x64x16.F32 R24, R120, gdesc[UR8], RZ, !UPT"
    again = "HGMMA.64x64x16.F32 R88, R120, gdesc[UR12].tnspB, R88, gsb0"
    write = "F2FP.F16.F32.PACK_AB R121, R46, R49"
    found = operand_overwrites(_loop("|".join([read, "WARPGROUP.DEPBAR.LE gsb0, 0x0", write, again])))
    assert len(found) == 1 and found[0].startswith("R121 in the loop at .L_x_5"), found
    assert operand_overwrites(_loop("|".join(["LDSM.16.M88.4 R120, [R23+UR4]", read, write, again]))) == []
    assert operand_overwrites(_loop("|".join([read, write]))) == []
    assert operand_overwrites(_loop("|".join([read, write, "EXIT", again]))) == []


def test_overwritten_operands_are_reported():
    """summarize reports (and _check refuses) the dq kernel whose Q and dO stay in registers over the key loop
    without being named in the products' waits (gluon_dq_regs_experiment.py, forms 1 and 4): at stop 42 ptxas gave
    dS the registers of dO there, and dq came out wrong on the GPU (causal, head_dim 64). The lowering's dq kernel
    and the form that names them in the waits (``deps``) are not reported."""
    exp = _load("benchmarks/experiments/gluon_dq_regs_experiment.py")
    plan = build_plan(AttentionSpec(exp.TEST_BRANCHES, causal=True), 4096, 8, 64)
    consts = launch_constexprs("gluon_bwd_dq", 64, True)
    found = {}
    for form in (exp.FORMS[0], exp.FORMS[1], exp.FORMS[5]):
        low = exp.variant(TritonLowering(plan, torch.device("cpu"), torch.float16), form)
        found[form] = summarize(compile_sm90(low.gluon_kernels.gluon_bwd_dq, consts, "fp16")).overwrites
    assert found[exp.FORMS[0]] == () and found[exp.FORMS[5]] == (), found
    assert len(found[exp.FORMS[1]]) >= 16, found   # dO's 16 registers, in each consumer's loop


def _fingerprints_script():
    module = _load("scripts/sass_fingerprints.py")
    return Path(module.__file__), module


def test_instruction_multiset_ignores_register_numbers_addresses_and_order():
    _, fp = _fingerprints_script()
    a = ("        /*0010*/                   FMUL R26, R26, UR4 ;\n"
         "        /*0020*/               @P0 BRA `(.L_x_12) ;\n"
         "        /*0030*/                   IMAD.SHL.U32 R14, R12, 0x10, RZ ;\n.L_x_12:\n")
    b = ("        /*0040*/                   IMAD.SHL.U32 R16, R12, 0x10, RZ ;\n"
         "        /*0050*/                   FMUL R15, R58, UR5 ;\n"
         "        /*0060*/               @P1 BRA `(.L_x_3) ;\n.L_x_3:\n")
    assert fp.instruction_multiset(a) == fp.instruction_multiset(b)
    assert fp.instruction_multiset(a) != fp.instruction_multiset(b.replace("FMUL", "FADD"))
    assert fp.instruction_multiset(a) != fp.instruction_multiset(b.replace("0x10", "0x8"))


def test_sass_fingerprints_save_and_compare(tmp_path):
    """scripts/sass_fingerprints.py on one variant: compared with itself it is unchanged (exit 0); against a saved
    line whose code hash differs it is rescheduled (exit 0), and changed where the instructions' hash differs too
    (exit 1)."""
    path, _ = _fingerprints_script()
    saved = tmp_path / "fp.txt"

    def run(*args):
        done = subprocess.run([sys.executable, str(path), "--only", "tl", "--match", "dilated_merge D64", *args],
                              capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout + done.stderr

    rc, out = run("--save", str(saved))
    assert rc == 0, out[-3000:]
    name, code, instructions = saved.read_text().strip().rsplit(" ", 2)
    assert name == "dilated_merge D64" and len(code) == len(instructions) == 16
    rc, out = run("--compare", str(saved))
    assert rc == 0 and "1 unchanged, 0 rescheduled, 0 changed" in out, out[-3000:]
    saved.write_text(f"{name} {'0' * 16} {instructions}\n")
    rc, out = run("--compare", str(saved))
    assert rc == 0 and "rescheduled: dilated_merge D64" in out, out[-3000:]
    saved.write_text(f"{name} {'0' * 16} {'0' * 16}\n")
    rc, out = run("--compare", str(saved))
    assert rc == 1 and "changed: dilated_merge D64" in out, out[-3000:]
