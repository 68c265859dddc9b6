"""The Gluon kernels (``lowering/triton/gluon_hopper.py``) compile for sm_90a without a GPU, with the launch
constexprs the lowering uses, and their matrix-instruction loops do not spill to local memory.

Gluon is experimental and its API changes between Triton releases, so the kernels are compiled only with the
release they are checked on (``gluon_hopper.CHECKED_TRITON``); elsewhere these tests are skipped. The CI runs
them in a second environment with that release (``scripts/gluon_compile_check.sh``). Numerics are checked on a
GPU (``test_triton_lowering.py``, tests marked gpu).
"""

from __future__ import annotations

import os
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

from dilated_compiler.lowering.triton.gluon_compile import MAX_SHARED, compile_sm90, summarize  # noqa: E402
from dilated_compiler.lowering.triton.lowering import TritonLowering  # noqa: E402


def _kernels(head_dim: int, causal: bool):
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)), causal=causal)
    return TritonLowering(build_plan(spec, 1024, 4, head_dim), torch.device("cpu"), torch.bfloat16).gluon_kernels


def _constexprs(kernel: str, head_dim: int, causal: bool, has_dlse: bool) -> dict:
    """The lowering's launch constexprs."""
    g = gluon_hopper
    if kernel == "gluon_fwd":
        return dict(HEAD_DIM=head_dim, BLOCK_M=g.BLOCK_M, BLOCK_N=g.BLOCK_N, STAGES=g.FWD_STAGES[head_dim],
                    ZFILL=True, CAUSAL=causal, CONSUMER_REGS=g.CONSUMER_REGS, num_warps=4, MERGE=False)
    if kernel == "gluon_bwd_dq":
        return dict(HEAD_DIM=head_dim, BLOCK_M=g.BWD_BLOCK, BLOCK_N=g.BWD_STEP, STAGES=g.DQ_STAGES[head_dim],
                    ZFILL=True, HAS_DLSE=has_dlse, CAUSAL=causal, CONSUMER_REGS=g.DQ_CONSUMER_REGS, num_warps=4,
                    ACC=0, PHASED=False)
    return dict(HEAD_DIM=head_dim, BLOCK_N=g.BWD_BLOCK, BLOCK_M=g.BWD_STEP, STAGES=g.DKDV_STAGES[head_dim],
                ZFILL=True, CAUSAL=causal, CONSUMER_REGS=g.DKDV_CONSUMER_REGS, num_warps=4, ACC=0, PHASED=False)


@pytest.mark.parametrize("kernel,head_dim,causal,has_dlse,dtype", [
    ("gluon_fwd", 128, False, False, "bf16"), ("gluon_fwd", 128, True, False, "bf16"),
    ("gluon_fwd", 64, False, False, "fp16"), ("gluon_fwd", 64, True, False, "bf16"),
    ("gluon_bwd_dq", 128, False, True, "bf16"), ("gluon_bwd_dq", 128, True, False, "fp16"),
    ("gluon_bwd_dq", 64, False, False, "bf16"), ("gluon_bwd_dq", 64, True, True, "bf16"),
    ("gluon_bwd_dkdv", 128, False, False, "bf16"), ("gluon_bwd_dkdv", 128, True, False, "fp16"),
    ("gluon_bwd_dkdv", 64, False, False, "bf16"), ("gluon_bwd_dkdv", 64, True, False, "bf16"),
])
def test_gluon_kernel_compiles_without_spills(kernel, head_dim, causal, has_dlse, dtype):
    kernels = _kernels(head_dim, causal)
    _check(compile_sm90(getattr(kernels, kernel), _constexprs(kernel, head_dim, causal, has_dlse), dtype))


@pytest.mark.parametrize("head_dim,causal", [(128, False), (128, True), (64, False)])
def test_gluon_fwd_all_mode_compiles_without_spills(head_dim, causal):
    """"all" mode's forward (MERGE: per-branch out and lse, no zero fill)."""
    consts = {**_constexprs("gluon_fwd", head_dim, causal, False), "MERGE": True, "ZFILL": False}
    _check(compile_sm90(_kernels(head_dim, causal).gluon_fwd, consts))


@pytest.mark.parametrize("kernel,head_dim,causal,acc", [
    ("gluon_bwd_dq", 128, False, 1), ("gluon_bwd_dq", 128, True, 1), ("gluon_bwd_dq", 64, True, 1),
    ("gluon_bwd_dkdv", 128, False, 1), ("gluon_bwd_dkdv", 128, True, 1), ("gluon_bwd_dkdv", 64, True, 1),
    ("gluon_bwd_dq", 128, False, 2), ("gluon_bwd_dkdv", 128, False, 2), ("gluon_bwd_dkdv", 64, True, 2),
    ("gluon_bwd_dq", 128, False, 3), ("gluon_bwd_dq", 128, True, 3), ("gluon_bwd_dkdv", 128, False, 3),
    ("gluon_bwd_dkdv", 128, True, 3), ("gluon_bwd_dkdv", 64, True, 3), ("gluon_bwd_dq", 64, False, 4),
    ("gluon_bwd_dkdv", 128, False, 4)])
def test_gluon_backward_acc_compiles_without_spills(kernel, head_dim, causal, acc):
    """"all" mode's backward form (ACC, PHASED: one launch over the branches in phases, adding into float32 dq, dk,
    dv, or in the first phase storing: ACC 2; with a last phase writing the results in the inputs' dtype: ACC 3
    and 4; no zero fill), which the lowering runs where gluon_hopper.ALL_MODE_BACKWARD is set."""
    consts = {**_constexprs(kernel, head_dim, causal, True), "ACC": acc, "ZFILL": False, "PHASED": True}
    fp32 = {"DQ": "*fp32"} if kernel == "gluon_bwd_dq" else {"DK": "*fp32", "DV": "*fp32"}
    _check(compile_sm90(getattr(_kernels(head_dim, causal), kernel), consts, "bf16", fp32))


@pytest.mark.parametrize("kernel", ["gluon_bwd_dq", "gluon_bwd_dkdv"])
@pytest.mark.parametrize("acc", [1, 2])
def test_gluon_backward_one_phase_compiles(kernel, acc):
    """"all" mode with one branch: a phased backward of one phase (NPH = 1), one tile (T = 1), B = H = 1, with the
    runtime's specialisation of arguments equal to 1 (triton 3.6 fails to compile ACC 2 with NPH the constant 1)."""
    consts = {**_constexprs(kernel, 64, False, False), "ACC": acc, "ZFILL": False, "PHASED": True}
    fp32 = {"DQ": "*fp32"} if kernel == "gluon_bwd_dq" else {"DK": "*fp32", "DV": "*fp32"}
    _check(compile_sm90(getattr(_kernels(64, False), kernel), consts, "bf16", fp32, ints=dict(NPH=1, T=1, B=1, H=1)))


def _check(compiled):
    sass = summarize(compiled)
    assert sass.shared <= MAX_SHARED, f"{sass.shared} bytes of shared memory"
    assert sass.hgmma > 0, "no warpgroup matrix instructions"
    assert sass.spills_in_steps == 0, f"{sass.spills_in_steps} spill instructions among a step's matrix instructions"


EXPERIMENTS = ["gluon_bwd_experiment", "gluon_causal_experiment", "gluon_dkdv_experiment", "gluon_dq_experiment",
               "gluon_ds_experiment", "gluon_fwd_experiment", "gluon_offs32_experiment", "gluon_red_experiment"]


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
    assert "HGMMA" in out or "wgmma" in out, out[-3000:]


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
