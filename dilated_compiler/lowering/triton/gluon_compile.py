"""Compile the Gluon kernels (:mod:`.gluon_hopper`) for sm_90a without a GPU and summarise their SASS: shared
memory, warpgroup matrix instructions, and local-memory spills inside and outside a step's matrix instructions.

For checks, not for running: ``tests/test_gluon_compile.py`` and the experiment scripts' ``--check-compile``.
Needs the Triton release the kernels are checked on (``gluon_hopper.CHECKED_TRITON``); Gluon's API changes
between releases.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

__all__ = ["MAX_SHARED", "SassSummary", "compile_sm90", "summarize"]

MAX_SHARED = 232448  # bytes of shared memory a block may use on compute capability 9.0
# the kernels' non-tensor parameters by name; every other non-constexpr parameter is a pointer to the data dtype
_SCALARS = {"T": "i32", "B": "i32", "N": "i32", "H": "i32", "qk_scale": "fp32", "sm_scale": "fp32",
            "stride_b": "i64", "stride_og": "i64", "stride_lg": "i64", "stride_lb": "i32", "stride_lh": "i32",
            "stride_ld": "i32", "TABLE": "*i32", "RB": "*i32", "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32",
            "LD": "*fp32", "PHASES": "*i32", "NPH": "i32", "BAR": "*i32", "SEL": "*u8"}


@dataclass(frozen=True)
class SassSummary:
    shared: int             # bytes of shared memory
    hgmma: int              # warpgroup matrix instructions
    spills_in_steps: int    # local loads/stores between two matrix instructions with no branch between them
    spills_elsewhere: int

    def __str__(self) -> str:
        return (f"shared {self.shared} B, HGMMA {self.hgmma}, spill instructions among a step's HGMMAs "
                f"{self.spills_in_steps}, elsewhere {self.spills_elsewhere}")


def compile_sm90(fn, constexprs: dict, dtype: str = "bf16", pointers: dict | None = None, ints: dict | None = None):
    """``fn`` (a ``gluon.jit`` kernel) compiled for sm_90a with these constexprs; tensors of ``dtype`` but those
    named in ``pointers`` (name: Triton type, e.g. ``{"DQ": "*fp32"}``). ``ints``: integer arguments' values at a
    launch; as at run time, one equal to 1 becomes a constant unless the kernel's ``do_not_specialize`` names it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    params = inspect.signature(fn.fn).parameters
    constexprs = {**constexprs, **{p.name: 1 for p in fn.params
                                   if (ints or {}).get(p.name) == 1 and not p.do_not_specialize}}
    unknown = set(constexprs) - set(params)
    if unknown:
        raise ValueError(f"{fn.fn.__name__} has no parameters {sorted(unknown)}")
    unset = [p for p, v in params.items() if "constexpr" in str(v.annotation) and p not in constexprs]
    if unset:
        raise ValueError(f"{fn.fn.__name__}: no value for the constexprs {unset}")
    types = {**_SCALARS, **(pointers or {})}
    sig = {p: "constexpr" if p in constexprs else types.get(p, f"*{dtype}") for p in params}
    src = GluonASTSource(fn, sig, constexprs={(list(sig).index(k), ): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": constexprs.get("num_warps", 4)})


def summarize(compiled) -> SassSummary:
    """Shared memory, matrix instructions and spills of a compiled kernel (nvdisasm from Triton's wheel)."""
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    # one letter per instruction of interest: M a matrix instruction, S a local load or store (a spill), B a
    # branch; a spill between two matrix instructions with no branch between them sits inside a step
    marks = "".join("M" if "HGMMA" in ln else "S" if ("STL" in ln or "LDL" in ln) else "B"
                    for ln in sass.splitlines() if "HGMMA" in ln or "STL" in ln or "LDL" in ln or "BRA" in ln)
    in_steps = sum(run.count("S") for run in re.findall(r"M[MS]*M", marks))
    return SassSummary(compiled.metadata.shared, marks.count("M"), in_steps, marks.count("S") - in_steps)
