"""Fingerprints of the machine code of every kernel the Triton lowering launches on a Hopper GPU, compiled for sm_90a
without a GPU: the generated tl kernels over each pass's candidate tile configs, and the Gluon kernels over the
launch forms the lowering uses. One line per variant: the kernel, its variant and two hashes of its SASS (without
line information, so moving source lines about does not change them): of the code as it stands, and of its
instructions as a multiset with register numbers, addresses and labels left out.

What it is for: a change meant to leave the kernels' code as it was (a helper factored out, a rename, a comment)
can be checked on a machine without a GPU. Save the fingerprints before the change, compare after it:

    .venv-gluon/bin/python scripts/sass_fingerprints.py --save /tmp/before.txt
    (change the kernels)
    .venv-gluon/bin/python scripts/sass_fingerprints.py --compare /tmp/before.txt

Saved records: ``benchmarks/results/sass-fingerprints-triton3.6-i64.txt`` and ``-i32.txt`` (``--strides i32``), of
the kernels at commit d1ce875 (triton 3.6). ``--compare`` against one of them shows whether a later source differs
in machine code from that commit's.

``--compare`` sorts each variant as unchanged (the same SASS: the change is proven not to touch the machine code),
rescheduled or changed, and exits 1 where any variant changed. Rescheduled means the same instructions up to
register numbers and order: ptxas schedules and allocates registers afresh when the IR's order changes, even where
the computation does not. That is a strong hint, not a proof (it would not see two operands swapped), so read the
SASS diff of such a variant (``--dump DIR`` writes every variant's SASS). Needs the Triton release the Gluon kernels are
checked on (``gluon_hopper.CHECKED_TRITON``), as in ``scripts/gluon_compile_check.sh`` (.venv-gluon). A change
that does alter the SASS needs the GPU tests and, where it may change the time, the benchmarks.

Compiles are not always reproducible: ``gluon_bwd_dkdv`` at D = 128 has come out of fresh compiles of the same
source (an empty Triton cache) in two instruction orders, once in three runs of ``--match "gluon_bwd_dkdv D128
causal=False"`` and in whole runs for one or the other causal form (triton 3.6; "rescheduled" or "changed" by a
handful of uniform-register instructions). So a verdict on those variants alone, after a change that does not touch
them or what they call, is the compiler's and not the change's: compile them again (``--match``), and read the
``--dump`` diff.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dilated_compiler import AttentionSpec, Branch, build_plan  # noqa: E402
from dilated_compiler.lowering.triton import autotune, gluon_hopper  # noqa: E402
from dilated_compiler.lowering.triton.gluon_compile import compile_sm90, launch_constexprs, sass  # noqa: E402
from dilated_compiler.lowering.triton.lowering import TritonLowering  # noqa: E402

HEAD_DIMS = (64, 128)
# the tl kernels' flags: grouped (zero fill), causal, "all" mode (MERGE, ATOMIC), key padding, and dlse
TL_FLAGS = {
    "fwd": [dict(CAUSAL=False, MERGE=False, ZFILL=True, HAS_KPM=False),
            dict(CAUSAL=True, MERGE=False, ZFILL=True, HAS_KPM=False),
            dict(CAUSAL=False, MERGE=True, ZFILL=False, HAS_KPM=False),
            dict(CAUSAL=True, MERGE=False, ZFILL=False, HAS_KPM=True)],
    "dq": [dict(CAUSAL=False, ATOMIC=False, ZFILL=True, HAS_KPM=False, HAS_DLSE=True),
           dict(CAUSAL=True, ATOMIC=False, ZFILL=True, HAS_KPM=False, HAS_DLSE=False),
           dict(CAUSAL=False, ATOMIC=True, ZFILL=False, HAS_KPM=False, HAS_DLSE=True),
           dict(CAUSAL=True, ATOMIC=False, ZFILL=False, HAS_KPM=True, HAS_DLSE=False)],
    "dkdv": [dict(CAUSAL=False, ATOMIC=False, ZFILL=True, HAS_KPM=False),
             dict(CAUSAL=True, ATOMIC=False, ZFILL=True, HAS_KPM=False),
             dict(CAUSAL=False, ATOMIC=True, ZFILL=False, HAS_KPM=False),
             dict(CAUSAL=True, ATOMIC=False, ZFILL=False, HAS_KPM=True)],
}
TL_KERNEL = {"fwd": "dilated_fwd", "dq": "dilated_bwd_dq", "dkdv": "dilated_bwd_dkdv"}
# "all" mode's backward forms (ACC, PHASED) of the Gluon kernels, as tests/test_gluon_compile.py compiles them
GLUON_ACC = [("gluon_bwd_dq", 1), ("gluon_bwd_dq", 2), ("gluon_bwd_dq", 3), ("gluon_bwd_dq", 4),
             ("gluon_bwd_dkdv", 1), ("gluon_bwd_dkdv", 2), ("gluon_bwd_dkdv", 3), ("gluon_bwd_dkdv", 4)]


def _lowering(head_dim: int) -> TritonLowering:
    spec = AttentionSpec((Branch(256, 1), Branch(512, 2), Branch(1024, 4), Branch(2048, 8)))
    return TritonLowering(build_plan(spec, 2048, 4, head_dim), torch.device("cpu"), torch.bfloat16)


def _tl_variants(head_dim: int):
    kernels = _lowering(head_dim).kernels
    for pass_name, flag_sets in TL_FLAGS.items():
        for cfg in autotune.candidates(pass_name, head_dim):
            # dkdv's own tile is the key tile (BLOCK_N), as the launcher passes it
            own, partner = ("BLOCK_N", "BLOCK_M") if pass_name == "dkdv" else ("BLOCK_M", "BLOCK_N")
            for flags in flag_sets:
                consts = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, GQA=2, TMA=cfg.tma, **flags,
                              **{own: cfg.block, partner: cfg.partner}, **cfg.launch_options())
                pointers = {"DQ": "*fp32"} if pass_name == "dq" and flags["ATOMIC"] else {}
                if pass_name == "dkdv" and flags["ATOMIC"]:
                    pointers = {"DK": "*fp32", "DV": "*fp32"}
                name = f"{TL_KERNEL[pass_name]} D{head_dim} {cfg} " + " ".join(
                    k for k, v in flags.items() if v is True)
                yield name, getattr(kernels, TL_KERNEL[pass_name]), consts, pointers
    yield (f"dilated_merge D{head_dim}", kernels.dilated_merge,
           dict(G=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_R=32, num_warps=4), {"AUX": "*fp32", "LSE": "*fp32"})


def _gluon_variants(head_dim: int):
    kernels = _lowering(head_dim).gluon_kernels
    for causal in (False, True):
        for kernel in ("gluon_fwd", "gluon_bwd_dq", "gluon_bwd_dkdv"):
            consts = launch_constexprs(kernel, head_dim, causal, has_dlse=True)
            yield f"{kernel} D{head_dim} causal={causal}", getattr(kernels, kernel), consts, {}
        consts = {**launch_constexprs("gluon_fwd", head_dim, causal), "MERGE": True, "ZFILL": False}
        yield f"gluon_fwd D{head_dim} causal={causal} MERGE", kernels.gluon_fwd, consts, {}
        for kernel, acc in GLUON_ACC:
            consts = {**launch_constexprs(kernel, head_dim, causal, True), "ACC": acc, "ZFILL": False,
                      "PHASED": True}
            fp32 = {"DQ": "*fp32"} if kernel == "gluon_bwd_dq" else {"DK": "*fp32", "DV": "*fp32"}
            yield f"{kernel} D{head_dim} causal={causal} ACC={acc}", getattr(kernels, kernel), consts, fp32


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def instruction_multiset(sass_text: str) -> str:
    """The SASS's instructions, sorted, with addresses, register and predicate numbers, register reuse hints and
    labels left out."""
    lines = []
    for line in sass_text.splitlines():
        line = re.sub(r"/\*[0-9a-f]+\*/", "", line).strip()
        if not line or line.startswith((".", "//")) or line.endswith(":"):
            continue
        line = re.sub(r"\b(U?R|U?P)\d+\b", r"\1", line).replace(".reuse", "")
        lines.append(re.sub(r"\.L_x_\d+", ".L", line))
    return "\n".join(sorted(lines))


def fingerprints(which: str, match: str = "", strides: str = "i64"):
    """(name, SASS) of every variant of ``which`` (tl, gluon, all) whose name contains ``match``, strides typed
    ``strides``."""
    for head_dim in HEAD_DIMS:
        groups = ([_tl_variants(head_dim)] if which in ("tl", "all") else []) + \
                 ([_gluon_variants(head_dim)] if which in ("gluon", "all") else [])
        for group in groups:
            for name, fn, consts, pointers in group:
                if match not in name:
                    continue
                text = sass(compile_sm90(fn, consts, "bf16", pointers, strides=strides))
                yield name, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("tl", "gluon", "all"), default="all", help="which kernels (default all)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--save", metavar="FILE", help="write the fingerprints to FILE")
    group.add_argument("--compare", metavar="FILE", help="compare with fingerprints saved earlier; exit 1 on a change")
    ap.add_argument("--match", metavar="TEXT", default="", help="only the variants whose name contains TEXT")
    ap.add_argument("--dump", metavar="DIR", help="also write each variant's SASS to DIR")
    ap.add_argument("--strides", choices=("i64", "i32"), default="i64",
                    help="type the strides int64 (default; the form of earlier records) or int32, as a launch types "
                         "them below 2^31 elements (the form that runs at the benchmarks' sizes)")
    args = ap.parse_args(argv)
    import triton
    if not triton.__version__.startswith(gluon_hopper.CHECKED_TRITON):
        ap.error(f"needs triton {gluon_hopper.CHECKED_TRITON[0]}x (this is {triton.__version__}); "
                 f"scripts/gluon_compile_check.sh makes such an environment (.venv-gluon)")
    saved = {}
    if args.compare:
        for line in Path(args.compare).read_text().splitlines():
            name, code, instructions = line.rsplit(" ", 2)
            saved[name] = (code, instructions)
    lines, verdicts = [], {"unchanged": [], "rescheduled": [], "changed": [], "not saved before": []}
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
    for name, text in fingerprints(args.only, args.match, args.strides):
        code, instructions = _digest(text), _digest(instruction_multiset(text))
        if args.dump:
            (Path(args.dump) / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".sass")).write_text(text)
        lines.append(f"{name} {code} {instructions}")
        print(lines[-1], flush=True)
        if args.compare:
            before = saved.get(name)
            verdict = ("not saved before" if before is None else "unchanged" if before[0] == code
                       else "rescheduled" if before[1] == instructions else "changed")
            verdicts[verdict].append(name)
    if args.save:
        Path(args.save).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} fingerprints written to {args.save}")
    if args.compare:
        print(f"{len(lines)} variants against {args.compare}: "
              + ", ".join(f"{len(names)} {verdict}" for verdict, names in verdicts.items()))
        for verdict in ("rescheduled", "changed", "not saved before"):
            for name in verdicts[verdict]:
                print(f"{verdict}: {name}")
        return 1 if verdicts["changed"] or verdicts["not saved before"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
