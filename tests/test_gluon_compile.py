"""The Gluon kernels (``lowering/triton/gluon_hopper.py``) compile for sm_90a without a GPU, with the launch
constexprs the lowering uses, and their matrix-instruction loops do not spill to local memory.

Gluon is experimental and its API changes between Triton releases, so the kernels are compiled only with the
release they are checked on (``gluon_hopper.CHECKED_TRITON``); elsewhere these tests are skipped. The CI runs
them in a second environment with that release (``scripts/gluon_compile_check.sh``). Numerics are checked on a
GPU (``test_triton_lowering.py``, tests marked gpu).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess

import pytest
import torch

from dilated_compiler import AttentionSpec, Branch, build_plan

triton = pytest.importorskip("triton")
from dilated_compiler.lowering.triton import gluon_hopper  # noqa: E402

if not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
    pytest.skip(f"the Gluon kernels compile with triton {gluon_hopper.CHECKED_TRITON[0]}x only "
                f"(this is {triton.__version__}; scripts/gluon_compile_check.sh makes such an environment)",
                allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from dilated_compiler.lowering.triton.lowering import TritonLowering  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory a block may use on compute capability 9.0
SCALARS = {"T": "i32", "B": "i32", "N": "i32", "H": "i32", "qk_scale": "fp32", "sm_scale": "fp32",
           "stride_b": "i64", "stride_lb": "i32", "stride_lh": "i32", "stride_ld": "i32", "TABLE": "*i32",
           "RB": "*i32", "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32", "LD": "*fp32"}


def _constexprs(kernel: str, head_dim: int, causal: bool, has_dlse: bool, early: bool | None) -> dict:
    """The lowering's launch constexprs (EARLY_RELEASE: the lowering's setting where ``early`` is None)."""
    g = gluon_hopper
    if kernel == "gluon_fwd":
        c = dict(HEAD_DIM=head_dim, BLOCK_M=g.BLOCK_M, BLOCK_N=g.BLOCK_N, STAGES=g.FWD_STAGES[head_dim],
                 ZFILL=True, CAUSAL=causal, CONSUMER_REGS=g.CONSUMER_REGS, num_warps=4)
    elif kernel == "gluon_bwd_dq":
        c = dict(HEAD_DIM=head_dim, BLOCK_M=g.BWD_BLOCK, BLOCK_N=g.BWD_STEP, STAGES=g.DQ_STAGES[head_dim],
                 ZFILL=True, HAS_DLSE=has_dlse, CAUSAL=causal, CONSUMER_REGS=g.DQ_CONSUMER_REGS, num_warps=4)
    else:
        c = dict(HEAD_DIM=head_dim, BLOCK_N=g.BWD_BLOCK, BLOCK_M=g.BWD_STEP, STAGES=g.DKDV_STAGES[head_dim],
                 ZFILL=True, CAUSAL=causal, CONSUMER_REGS=g.DKDV_CONSUMER_REGS, num_warps=4, EPI_PTR=g.DKDV_EPI_PTR)
    pass_name = {"gluon_fwd": "fwd", "gluon_bwd_dq": "dq", "gluon_bwd_dkdv": "dkdv"}[kernel]
    c["EARLY_RELEASE"] = g.EARLY_RELEASE[pass_name] if early is None else early
    return c


def _compile(kernel: str, head_dim: int, causal: bool, has_dlse: bool, dtype: str, early: bool | None = None,
             **override):
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)), causal=causal)
    low = TritonLowering(build_plan(spec, 1024, 4, head_dim), torch.device("cpu"), torch.bfloat16)
    fn = getattr(low.gluon_kernels, kernel)
    consts = {**_constexprs(kernel, head_dim, causal, has_dlse, early), **override}
    sig = {p: "constexpr" if p in consts else SCALARS.get(p, f"*{dtype}") for p in inspect.signature(fn.fn).parameters}
    assert set(consts) <= set(sig), f"{kernel} lacks constexprs {set(consts) - set(sig)}"
    src = GluonASTSource(fn, sig, constexprs={(list(sig).index(k), ): v for k, v in consts.items()})
    return triton.compile(src, target=SM90, options={"num_warps": 4})


def _sass(compiled, tmp_path) -> list[str]:
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    return subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("kernel,head_dim,causal,has_dlse,dtype,early", [
    ("gluon_fwd", 128, False, False, "bf16", None), ("gluon_fwd", 128, True, False, "bf16", None),
    ("gluon_fwd", 64, False, False, "fp16", None), ("gluon_fwd", 64, True, False, "bf16", None),
    ("gluon_bwd_dq", 128, False, True, "bf16", None), ("gluon_bwd_dq", 128, True, False, "fp16", None),
    ("gluon_bwd_dq", 64, False, False, "bf16", None), ("gluon_bwd_dq", 64, True, True, "bf16", None),
    ("gluon_bwd_dkdv", 128, False, False, "bf16", None), ("gluon_bwd_dkdv", 128, True, False, "fp16", None),
    ("gluon_bwd_dkdv", 64, False, False, "bf16", None), ("gluon_bwd_dkdv", 64, True, False, "bf16", None),
    # the EARLY_RELEASE forms (benchmarks/gluon_release_experiment.py), whatever the lowering's setting
    ("gluon_fwd", 128, True, False, "bf16", True), ("gluon_bwd_dq", 128, True, True, "bf16", True),
    ("gluon_bwd_dkdv", 128, True, False, "bf16", True), ("gluon_bwd_dkdv", 128, False, False, "bf16", True),
])
def test_gluon_kernel_compiles_without_spills(kernel, head_dim, causal, has_dlse, dtype, early, tmp_path):
    _check(_compile(kernel, head_dim, causal, has_dlse, dtype, early), tmp_path)


@pytest.mark.parametrize("causal,stages,early",
                         [(False, 3, False), (True, 3, True), (False, 4, True), (True, 4, False)])
def test_gluon_dkdv_pointer_epilogue_compiles_without_spills(causal, stages, early, tmp_path):
    """dk/dv's EPI_PTR form (benchmarks/gluon_release_experiment.py), with the fourth Q/dO stage it makes room for."""
    _check(_compile("gluon_bwd_dkdv", 128, causal, False, "bf16", early, EPI_PTR=True, STAGES=stages), tmp_path)


@pytest.mark.parametrize("head_dim,causal", [(128, False), (128, True), (64, False), (64, True)])
def test_gluon_fwd_xt_compiles_without_spills(head_dim, causal, tmp_path):
    """gluon_fwd_xt, the forward pipelined across tiles (benchmarks/gluon_fwd_xtile_experiment.py)."""
    consts = _constexprs("gluon_fwd", head_dim, causal, False, None)
    del consts["EARLY_RELEASE"]  # gluon_fwd_xt always frees Q early
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2)), causal=causal)
    fn = TritonLowering(build_plan(spec, 1024, 4, head_dim), torch.device("cpu"), torch.bfloat16).gluon_kernels
    fn = fn.gluon_fwd_xt
    sig = {p: "constexpr" if p in consts else SCALARS.get(p, "*bf16") for p in inspect.signature(fn.fn).parameters}
    src = GluonASTSource(fn, sig, constexprs={(list(sig).index(k), ): v for k, v in consts.items()})
    _check(triton.compile(src, target=SM90, options={"num_warps": 4}), tmp_path)


def _check(compiled, tmp_path):
    assert compiled.metadata.shared <= MAX_SHARED, f"{compiled.metadata.shared} bytes of shared memory"
    sass = _sass(compiled, tmp_path)
    # one letter per instruction of interest: M a matrix instruction, S a local-memory load or store (a spill),
    # B a branch; a spill between two matrix instructions with no branch between them sits inside a step
    marks = "".join("M" if "HGMMA" in ln else "S" if ("STL" in ln or "LDL" in ln) else "B"
                    for ln in sass if "HGMMA" in ln or "STL" in ln or "LDL" in ln or "BRA" in ln)
    assert marks.count("M") > 0, "no warpgroup matrix instructions"
    between = sum(run.count("S") for run in re.findall(r"M[MS]*M", marks))
    assert between == 0, f"{between} spill instructions among a step's matrix instructions"
