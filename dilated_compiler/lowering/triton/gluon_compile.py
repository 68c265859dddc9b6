"""Compile the Gluon kernels (:mod:`.gluon_hopper`) and the generated tl kernels for sm_90a without a GPU and
summarise their SASS: shared memory, warpgroup matrix instructions, local-memory spills inside and outside a
step's matrix instructions, whether ptxas serialises the matrix instructions, and registers a loop's matrix
instructions read as an A operand that the loop rewrites before another product reads them (a wrong result, not a
slow one: :func:`operand_overwrites`); or give the SASS itself, to show that a change to a kernel's source leaves
the machine code as it was (``scripts/sass_fingerprints.py``).

For checks, not for running: ``tests/test_gluon_compile.py``, the experiment scripts' ``--check-compile`` and
``scripts/sass_fingerprints.py``.
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

__all__ = ["MAX_SHARED", "SassSummary", "compile_sm90", "launch_constexprs", "operand_overwrites", "sass",
           "summarize", "wgmma_serialized"]

MAX_SHARED = 232448  # bytes of shared memory a block may use on compute capability 9.0
# the kernels' non-tensor parameters by name; other non-constexpr parameters are strides (int64) where named
# stride_*, else pointers to the data dtype
_SCALARS = {"T": "i32", "B": "i32", "N": "i32", "H": "i32", "qk_scale": "fp32", "sm_scale": "fp32",
            "stride_b": "i64", "stride_og": "i64", "stride_lg": "i64", "stride_lb": "i32", "stride_lh": "i32",
            "stride_ld": "i32", "TABLE": "*i32", "RB": "*i32", "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32",
            "LD": "*fp32", "PHASES": "*i32", "NPH": "i32", "BAR": "*i32", "SEL": "*u8", "HEAD_END": "*i32",
            "DQ_ARRIVALS": "i32",
            # the tl kernels' (generator.py), besides those above
            "KPM": "*u8", "AUX": "*fp32", "R": "i32"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg")  # compiler options among the launch arguments


@dataclass(frozen=True)
class SassSummary:
    shared: int             # bytes of shared memory
    hgmma: int              # warpgroup matrix instructions
    spills_in_steps: int    # local loads/stores between two matrix instructions with no branch between them
    spills_elsewhere: int
    serialized: str | None = None  # ptxas's reason for serialising the matrix instructions, if it does
    overwrites: tuple[str, ...] = ()  # operand_overwrites: A-operand registers rewritten between two products

    def __str__(self) -> str:
        return (f"shared {self.shared} B, HGMMA {self.hgmma}, spill instructions among a step's HGMMAs "
                f"{self.spills_in_steps}, elsewhere {self.spills_elsewhere}"
                + (f"; SERIALIZED by ptxas: {self.serialized}" if self.serialized else "")
                + (f"; A OPERAND OVERWRITTEN: {self.overwrites[0]}" if self.overwrites else ""))


def compile_sm90(fn, constexprs: dict, dtype: str = "bf16", pointers: dict | None = None, ints: dict | None = None,
                 strides: str = "i64"):
    """``fn`` (a ``gluon.jit`` or ``triton.jit`` kernel) compiled for sm_90a with these constexprs; those among them
    named in ``_OPTIONS`` (num_warps, num_stages, maxnreg) also go to the compiler, as a launch passes them. Tensors
    are of ``dtype`` but those named in ``pointers`` (name: Triton type, e.g. ``{"DQ": "*fp32"}``); other
    arguments are typed by ``_SCALARS``, strides not named there as int64; ``strides="i32"`` types every stride
    not named in ``pointers`` int32, as a launch passes them while a stride is below 2^31 (the variant that runs at
    all but the largest sizes). ``ints``: integer arguments' values at a launch; as at run time, one equal to 1
    becomes a constant unless the kernel's ``do_not_specialize`` names it. A constexpr left out takes its default
    (one without a default is an error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    params = inspect.signature(fn.fn).parameters
    options = {"num_warps": constexprs.get("num_warps", 4)}
    options.update({k: v for k, v in constexprs.items() if k in _OPTIONS and k != "num_warps"})
    constexprs = {k: v for k, v in constexprs.items() if k in params or k not in _OPTIONS}
    constexprs = {**constexprs, **{p.name: 1 for p in fn.params
                                   if (ints or {}).get(p.name) == 1 and not p.do_not_specialize}}
    unknown = set(constexprs) - set(params)
    if unknown:
        raise ValueError(f"{fn.fn.__name__} has no parameters {sorted(unknown)}")
    # a constexpr with a default takes it, as a launch that leaves it out does
    constexprs = {**{p: v.default for p, v in params.items()
                     if "constexpr" in str(v.annotation) and v.default is not inspect.Parameter.empty}, **constexprs}
    unset = [p for p, v in params.items() if "constexpr" in str(v.annotation) and p not in constexprs]
    if unset:
        raise ValueError(f"{fn.fn.__name__}: no value for the constexprs {unset}")
    if strides not in ("i64", "i32"):
        raise ValueError(f"strides must be 'i64' or 'i32'; got {strides!r}")
    narrow = {p: "i32" for p in params if p.startswith("stride")} if strides == "i32" else {}
    types = {**_SCALARS, **narrow, **(pointers or {})}
    sig = {p: "constexpr" if p in constexprs else types.get(p, "i64" if p.startswith("stride") else f"*{dtype}")
           for p in params}
    source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    src = source(fn, sig, constexprs={(list(sig).index(k), ): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass(compiled) -> str:
    """The kernel's SASS as nvdisasm (from Triton's wheel) prints it, without line information."""
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout


def wgmma_serialized(compiled) -> str | None:
    """ptxas's reason where it serialises the kernel's warpgroup matrix instructions (its "Potential Performance
    Loss: wgmma.mma_async instructions are serialized due to ..." note: each product then waits for the one before,
    which made a dq form of stop 9 45% slower), else None. Reads the note from ptxas (from Triton's wheel) run
    verbosely on the kernel's PTX."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        run = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    for line in (run.stdout + run.stderr).splitlines():
        if "wgmma.mma_async instructions are serialized" in line:
            return line.split("serialized", 1)[1].strip()
    return None


_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def _written(op: str, operands: str) -> range:
    """The registers an instruction writes: its first operand where that is a register (stores, branches and
    barriers have none), over the width its opcode says."""
    m = re.match(r"R(\d+)\b", operands)
    if not m or op.startswith(("ST", "RED", "BRA", "BAR", "SYNCS", "HGMMA", "WARPGROUP")):
        return range(0)
    n = 4 if (".128" in op or (op.startswith("LDSM") and op.endswith(".4"))) else \
        2 if (".64" in op or ".WIDE" in op or (op.startswith("LDSM") and op.endswith(".2"))) else 1
    return range(int(m.group(1)), int(m.group(1)) + n)


def operand_overwrites(sass_text: str) -> list[str]:
    """Registers that a loop's warpgroup matrix instructions read as their A operand, that an instruction of the
    loop then rewrites, and that a later matrix instruction of the same pass reads again. The first read comes
    before any write in the pass, so its value is the one the previous pass left: the rewritten one. ptxas 12.8
    (triton 3.6) allocates so for a loop-invariant A operand whose products the source does not keep alive
    (``warpgroup_mma_wait``'s ``deps``): at stop 42 dO, held in registers over the dq kernel's key loop, shared
    its registers with dS, and dq came out wrong (causal, head_dim 64). A value carried from one pass to the next
    on purpose (P of the forward, issued at the top of the next pass) is written after its only read, so it is
    not reported. Each finding names the loop's label and the addresses of the read, the write and the second
    read."""
    lines = sass_text.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := _LABEL.match(ln.strip()))}
    found = []
    for end, ln in enumerate(lines):
        m = _BRANCH.search(ln)
        start = labels.get(m.group(1), end) if m else end
        if start >= end:
            continue   # not a branch back to an earlier label: not a loop
        if any(re.search(r"\b(EXIT|RET)\b", body) for body in lines[start:end]):
            continue   # ptxas's out-of-line wait loops branch back over whole partitions: not a loop body
        state = {}     # register -> (address of its first A-operand read, address of the write after it)
        for body in lines[start:end + 1]:
            ins = _INSTR.search(body)
            if not ins:
                continue
            addr, op, operands = ins.groups()
            if op.startswith("HGMMA"):
                a = re.match(r"R\d+\s*,\s*R(\d+)\b", operands)
                for r in range(int(a.group(1)), int(a.group(1)) + 4) if a else ():
                    if r not in state:
                        state[r] = (addr, None)
                    elif state[r][0] and state[r][1]:
                        found.append(f"R{r} in the loop at {m.group(1)}: read by a product at 0x{state[r][0]}, "
                                     f"rewritten at 0x{state[r][1]}, read again at 0x{addr}")
                        state[r] = (None, None)
                continue
            for r in _written(op, operands):
                if r not in state:
                    state[r] = (None, addr)   # written before any read: this pass's own value
                elif state[r][0] and not state[r][1]:
                    state[r] = (state[r][0], addr)
    return found


def summarize(compiled) -> SassSummary:
    """Shared memory, matrix instructions and spills of a compiled kernel, whether ptxas serialises its matrix
    instructions, and A-operand registers rewritten between two products of a loop (:func:`operand_overwrites`)."""
    text = sass(compiled)
    # one letter per instruction of interest: M a matrix instruction, S a local load or store (a spill), B a
    # branch; a spill between two matrix instructions with no branch between them sits inside a step
    marks = "".join("M" if "HGMMA" in ln else "S" if ("STL" in ln or "LDL" in ln) else "B"
                    for ln in text.splitlines() if "HGMMA" in ln or "STL" in ln or "LDL" in ln or "BRA" in ln)
    in_steps = sum(run.count("S") for run in re.findall(r"M[MS]*M", marks))
    return SassSummary(compiled.metadata.shared, marks.count("M"), in_steps, marks.count("S") - in_steps,
                       wgmma_serialized(compiled), tuple(operand_overwrites(text)))


def launch_constexprs(kernel: str, head_dim: int, causal: bool, has_dlse: bool = False) -> dict:
    """The constexprs the lowering launches Gluon ``kernel`` (gluon_fwd, gluon_bwd_dq, gluon_bwd_dkdv) with, in
    grouped mode (zero fill on, the backward's launches overlapping as ``gluon_hopper.BWD_OVERLAP`` says; "all" mode
    changes MERGE, ACC, ZFILL and PHASED, and overlaps nothing)."""
    from . import gluon_hopper as g
    if kernel == "gluon_fwd":
        return dict(HEAD_DIM=head_dim, BLOCK_M=g.BLOCK_M, BLOCK_N=g.BLOCK_N, STAGES=g.FWD_STAGES[head_dim],
                    ZFILL=True, CAUSAL=causal, CONSUMER_REGS=g.CONSUMER_REGS, num_warps=4, MERGE=False, GQA=1)
    if kernel == "gluon_bwd_dq":
        return dict(HEAD_DIM=head_dim, BLOCK_M=g.BWD_BLOCK, BLOCK_N=g.BWD_STEP, STAGES=g.DQ_STAGES[head_dim],
                    ZFILL=True, HAS_DLSE=has_dlse, CAUSAL=causal, CONSUMER_REGS=g.DQ_CONSUMER_REGS, num_warps=4,
                    ACC=0, PHASED=False, OVERLAP=g.BWD_OVERLAP)
    if kernel == "gluon_bwd_dkdv":
        return dict(HEAD_DIM=head_dim, BLOCK_N=g.BWD_BLOCK, BLOCK_M=g.BWD_STEP, STAGES=g.DKDV_STAGES[head_dim],
                    ZFILL=True, CAUSAL=causal, CONSUMER_REGS=g.DKDV_CONSUMER_REGS, num_warps=4, ACC=0, PHASED=False,
                    OVERLAP=g.BWD_OVERLAP)
    raise ValueError(f"unknown Gluon kernel {kernel!r}; allowed: gluon_fwd, gluon_bwd_dq, gluon_bwd_dkdv")
