"""The ``dilated-compiler`` command line: validate, plan, show, run and draw attention specs.

Every command takes spec files (YAML). Errors print one clean line on stderr and exit 1 (``validate`` lists
every problem of every file, one line each); usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "default_seq_len", "reference_seq_len"]

PROG = "dilated-compiler"

_DTYPES = {
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp64": "float64", "float64": "float64", "double": "float64",
}
# `run`'s default sequence length: 2x the largest segment, capped so that a run takes seconds.
RUN_SEQ_CAP = {"cpu": 2048, "cuda": 65536}
# The float64 reference keeps about this many bytes per attended (head, branch) N x N score matrix alive for
# autograd; the reference check is capped so that all of them fit in REF_BUDGET_BYTES.
_REF_BYTES_PER_PAIR = 48
REF_BUDGET_BYTES = 2 * 2**30


class CLIError(Exception):
    """A clean, one-line error for the user."""


# --------------------------------------------------------------------------------------------------------------
# argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _size_or_symbol(text: str) -> int | str:
    """plan's shapes: a positive integer, or a name (an identifier such as N) that the planner makes a symbol."""
    if text.isidentifier():
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or a name for a symbol (such as N), got "
                                         f"{text!r}") from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"expected an integer with 0 <= seed < 2**64, got {text!r}")
    return value


def _dtype(text: str):
    import torch
    name = _DTYPES.get(text.lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; allowed: {', '.join(sorted(_DTYPES))}")
    return getattr(torch, name)


def _device(text: str):
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"not a device this tool runs on: {text!r} (allowed: cpu, cuda, cuda:N)")
    return device


# --------------------------------------------------------------------------------------------------------------
# helpers


def _load(path: str):
    from .spec import load_spec
    # A Path (not a str) so that any file name is read as a file, never parsed as YAML text.
    return load_spec(Path(path))


def _default_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_device(device) -> None:
    import torch
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {device} requested but CUDA is not available")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_seq_len(spec, device_type: str) -> int:
    """``run``'s default N: twice the largest segment length (so every branch has a whole segment and a
    second one), capped at RUN_SEQ_CAP[device] (2048 on CPU, 65536 on CUDA) so that the example runs quickly."""
    largest = max(b.segment_length for b in spec.branches)
    return min(2 * largest, RUN_SEQ_CAP.get(device_type, RUN_SEQ_CAP["cpu"]))


def reference_seq_len(seq_len: int, batch: int, heads: int, branches_per_head: int,
                      budget_bytes: int | None = None) -> int:
    """The largest N' <= seq_len at which the float64 reference (with gradients) fits in ``budget_bytes``
    (default REF_BUDGET_BYTES, 2 GiB)."""
    if budget_bytes is None:
        budget_bytes = REF_BUDGET_BYTES
    per_pair = _REF_BYTES_PER_PAIR * batch * heads * branches_per_head
    return max(1, min(seq_len, math.isqrt(budget_bytes // per_pair)))


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def _max_err(actual, expected) -> float:
    """Max |actual - expected| in float64; matching infinities count as 0, mismatched ones as inf; NaN as nan."""
    import torch
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.numel() == 0:
        return 0.0
    if torch.isnan(a).any():
        return math.nan
    both = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = torch.where(both, 0.0, (a - e).abs())
    return float(diff.max())


# --------------------------------------------------------------------------------------------------------------
# commands


def cmd_validate(args) -> int:
    from .spec import SpecError
    failed = 0
    for path in args.specs:
        try:
            _load(path)
        except SpecError as e:
            failed += 1
            for problem in e.problems:
                print(f"{path}: error: {problem}", file=sys.stderr)
        else:
            print(f"ok: {path}")
    return 1 if failed else 0


def _list_passes() -> str:
    from .planner import PASSES
    width = max(len(n) for n in PASSES)
    lines = ["passes, in order:"]
    for name, fn in PASSES.items():
        # The docstring's first sentence (its first line may stop mid-sentence).
        para = " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())
        first = para.split(". ")[0].rstrip(".") + "." if para else ""
        lines.append(f"  {name:<{width}}  {first}")
    return "\n".join(lines)


def _require_shapes(parser, args, what: str) -> None:
    missing = [flag for flag, value in (("--seq-len", args.seq_len), ("--heads", args.heads),
                                        ("--head-dim", args.head_dim)) if value is None]
    if missing:
        parser.error(f"{what} needs {', '.join(missing)}")


def cmd_plan(args, parser) -> int:
    if args.spec is None and not args.list_passes:
        parser.error("plan needs a SPEC file (or --list-passes)")
    if args.list_passes:
        print(_list_passes())
        if args.spec is None or None in (args.seq_len, args.heads, args.head_dim):
            return 0  # the list alone; a SPEC with its shapes also gets its plan
        print()
    _require_shapes(parser, args, "plan")
    import torch
    from .planner import build_plan
    spec = _load(args.spec)
    plan = build_plan(spec, args.seq_len, args.heads, args.head_dim, batch=args.batch, kv_heads=args.kv_heads,
                      dtype_bytes=torch.empty((), dtype=args.dtype).element_size())
    print(plan.explain())
    return 0


def cmd_show(args, parser) -> int:
    _require_shapes(parser, args, "show")
    from . import compile_attention
    device = args.device or _default_device()
    _check_device(device)
    spec = _load(args.spec)
    attn = compile_attention(spec, backend=args.backend)
    print(attn.kernel_source(args.seq_len, args.heads, args.head_dim, batch=args.batch, kv_heads=args.kv_heads,
                             dtype=args.dtype, device=device))
    return 0


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats: int, warmup: int) -> tuple[float, float]:
    """(median, min) seconds per call over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def cmd_run(args, parser) -> int:
    import torch
    from . import compile_attention, reference
    from .planner import build_plan
    from .runtime import resolve_backend

    spec = _load(args.spec)
    device = args.device or _default_device()
    _check_device(device)
    G = spec.num_branches
    heads = args.heads or max(8, G)
    kv_heads = args.kv_heads or heads
    head_dim = args.head_dim
    dtype = args.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    n_note = ""
    if args.seq_len is None:
        seq_len = default_seq_len(spec, device.type)
        largest = max(b.segment_length for b in spec.branches)
        if seq_len < 2 * largest:
            n_note = f" (default: 2 x largest segment = {2 * largest}, capped at {seq_len} on {device.type})"
        else:
            n_note = " (default: 2 x largest segment)"
    else:
        seq_len = args.seq_len
    B = args.batch
    attn = compile_attention(spec, backend=args.backend)
    backend = resolve_backend(args.backend, device)
    plan = build_plan(spec, seq_len, heads, head_dim, batch=B, kv_heads=kv_heads,
                      dtype_bytes=torch.empty((), dtype=dtype).element_size())
    flops_f, flops_b = int(plan.flops), int(plan.flops_backward)

    g = torch.Generator().manual_seed(args.seed)
    q64 = torch.randn(B, seq_len, heads, head_dim, generator=g, dtype=torch.float64)
    k64 = torch.randn(B, seq_len, kv_heads, head_dim, generator=g, dtype=torch.float64)
    v64 = torch.randn(B, seq_len, kv_heads, head_dim, generator=g, dtype=torch.float64)
    dout64 = torch.randn(B, seq_len, heads, head_dim, generator=g, dtype=torch.float64)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q64, k64, v64))
    dout = dout64.to(device=device, dtype=dtype)

    label = spec.name or spec.key
    print(f"spec: {label} ({spec.head_assignment}{', causal' if spec.causal else ''}; {G} branch"
          f"{'es' if G != 1 else ''})  backend: {backend}  device: {device}  dtype: {_dtype_name(dtype)}")
    print(f"shape: B={B} N={seq_len}{n_note} H={heads} Hkv={kv_heads} D={head_dim}")
    dense = 4 * B * heads * head_dim * seq_len ** 2 // (2 if spec.causal else 1)
    print(f"useful FLOPs: fwd {flops_f:.4g}, bwd {flops_b:.4g} ({100 * flops_f / dense:.3g}% of dense attention)")

    def forward():
        with torch.no_grad():
            attn(q, k, v, return_lse=True)

    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def forward_backward():
        out = attn(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), dout)

    warmup = 2
    t_f, min_f = _median_time(forward, device, args.repeats, warmup)
    t_fb, min_fb = _median_time(forward_backward, device, args.repeats, warmup)
    print(f"time per call (median of {args.repeats} after {warmup} warm-up; TFLOP/s from the median):")
    print(f"  forward           {_fmt_time(t_f):>10}   {flops_f / t_f / 1e12:.3g} TFLOP/s   (min {_fmt_time(min_f)})")
    print(f"  forward+backward  {_fmt_time(t_fb):>10}   {(flops_f + flops_b) / t_fb / 1e12:.3g} TFLOP/s   "
          f"(min {_fmt_time(min_fb)})")

    # Correctness: the float64 reference on CPU, on the same inputs (or their first n_ref positions).
    per_head = G if spec.head_assignment == "all" else 1
    n_ref = reference_seq_len(seq_len, B, heads, per_head)
    if args.no_check:
        print("reference check: skipped (--no-check)")
        return 0
    sl = slice(0, n_ref)
    qr, kr, vr = (t[:, sl].to(device=device, dtype=dtype).detach().requires_grad_(True) for t in (q64, k64, v64))
    out, lse = attn(qr, kr, vr, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), dout64[:, sl].to(device=device, dtype=dtype))
    q_ref, k_ref, v_ref = (t[:, sl].detach().clone().requires_grad_(True) for t in (q64, k64, v64))
    ref_out, ref_lse = reference.attention(q_ref, k_ref, v_ref, spec, return_lse=True)
    rdq, rdk, rdv = torch.autograd.grad(ref_out, (q_ref, k_ref, v_ref), dout64[:, sl])
    where = ("same inputs" if n_ref == seq_len else
             f"the first {n_ref} positions as a separate call: the O(N^2) reference is capped by memory")
    print(f"max abs error vs float64 reference (N={n_ref}, {where}):")
    print("  " + "  ".join(f"{name} {_max_err(a, e):.3g}" for name, a, e in
                           (("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, rdq), ("dk", dk, rdk),
                            ("dv", dv, rdv))))
    return 0


def cmd_draw(args, parser) -> int:
    from .draw import draw_pattern
    parent = Path(args.out).resolve().parent
    if not parent.is_dir():
        raise CLIError(f"cannot write {args.out}: directory {parent} does not exist")
    spec = _load(args.spec)
    info = draw_pattern(spec, args.seq_len, args.out, heads=args.heads, per_branch=args.per_branch,
                        scale=args.scale)
    w, h = info["size"]
    print(f"wrote {info['path']} ({info['panels']} panel{'s' if info['panels'] != 1 else ''}, {w}x{h} px)")
    return 0


# --------------------------------------------------------------------------------------------------------------
# parser


def _shape_args(p, symbolic: bool = False) -> None:
    size = _size_or_symbol if symbolic else _positive_int

    def described(what: str, symbol: str) -> str:
        return what + (f" (or a name, such as {symbol}, for a symbol: the costs are then formulas in it)"
                       if symbolic else "")
    p.add_argument("--seq-len", "-n", type=size, metavar="N", help=described("sequence length N", "N"))
    p.add_argument("--heads", type=size, metavar="H", help=described("number of query heads", "H"))
    p.add_argument("--head-dim", type=size, metavar="D", help=described("head dimension", "D"))
    p.add_argument("--batch", type=size, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--kv-heads", type=size, metavar="HKV",
                   help="key/value heads for grouped-query attention (must divide --heads; default: --heads)")


def build_parser() -> argparse.ArgumentParser:
    from .runtime.module import BACKENDS
    parser = argparse.ArgumentParser(
        prog=PROG, description="A compiler for LongNet-style dilated attention: check, plan, inspect, run and "
                               "draw attention specs written in YAML.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("validate", help="check spec files; every problem with its field path",
                       description="Check spec files. Prints 'ok: FILE' per valid file; every problem of an "
                                   "invalid one on stderr as 'FILE: error: PROBLEM'. Exit 1 if any is invalid.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="YAML spec file(s)")

    p = sub.add_parser("plan", help="the plan at given shapes: attend ops, passes, FLOPs, bytes",
                       description="Build the plan for SPEC at the given shapes and explain it. A shape given as a "
                                   "name (e.g. --seq-len N) is a symbol: node sizes and costs are then formulas.")
    p.add_argument("spec", nargs="?", metavar="SPEC", help="YAML spec file")
    _shape_args(p, symbolic=True)
    p.add_argument("--dtype", type=_dtype, default="bf16", help="element type for the bytes estimate (default bf16)")
    p.add_argument("--list-passes", action="store_true", help="list the planner's passes (SPEC optional)")

    p = sub.add_parser("show", help="the code a backend generates for SPEC at given shapes",
                       description="Print what the backend generates: the lowered plan (torch) or the kernel "
                                   "source (triton).")
    p.add_argument("spec", metavar="SPEC", help="YAML spec file")
    _shape_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (triton on CUDA when available, else torch), torch or triton")
    p.add_argument("--dtype", type=_dtype, default="bf16", help="input dtype (default bf16)")
    p.add_argument("--device", type=_device, help="device to generate for (default cuda if available, else cpu)")

    p = sub.add_parser("run", help="run SPEC on random inputs: time, TFLOP/s, error vs the float64 reference",
                       description="Run SPEC on random q, k, v: median time per call (forward, forward+backward), "
                                   "useful TFLOP/s and the max abs error of out, lse and gradients against the "
                                   "float64 reference.")
    p.add_argument("spec", metavar="SPEC", help="YAML spec file")
    p.add_argument("--seq-len", "-n", type=_positive_int, metavar="N",
                   help=f"sequence length (default: 2 x the largest segment length, capped at "
                        f"{RUN_SEQ_CAP['cpu']} on cpu and {RUN_SEQ_CAP['cuda']} on cuda)")
    p.add_argument("--heads", type=_positive_int, metavar="H", help="query heads (default: 8, or more if the "
                                                                     "spec has more branches)")
    p.add_argument("--head-dim", type=_positive_int, default=64, metavar="D", help="head dimension (default 64)")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--kv-heads", type=_positive_int, metavar="HKV", help="key/value heads (default: --heads)")
    p.add_argument("--dtype", type=_dtype, help="input dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="auto, torch or triton (default auto)")
    p.add_argument("--device", type=_device, help="default cuda if available, else cpu")
    p.add_argument("--repeats", type=_positive_int, default=10, help="timed calls per measurement (default 10)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for the random inputs (default 0)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the float64 reference")

    p = sub.add_parser("draw", help="picture of which keys each query attends to (PNG, SVG, PDF)",
                       description="Draw the pattern: one panel per set of heads sharing a pattern (grouped: per "
                                   "branch; all: per distinct head offset pattern, or per branch with "
                                   "--per-branch); queries on y, keys on x.")
    p.add_argument("spec", metavar="SPEC", help="YAML spec file")
    p.add_argument("--seq-len", "-n", type=_positive_int, required=True, metavar="N",
                   help="sequence length to draw (at most 4096: the picture is N x N)")
    p.add_argument("--out", "-o", required=True, help="output file; format from the suffix (.png, .svg, .pdf)")
    p.add_argument("--heads", type=_positive_int, metavar="H",
                   help="heads (default: one per branch in grouped mode; 8 in all mode)")
    p.add_argument("--per-branch", action="store_true",
                   help="all mode: one panel per (branch, offset) instead of one per set of heads (grouped mode "
                        "always draws one panel per branch)")
    p.add_argument("--scale", type=_positive_int, default=1, metavar="K",
                   help="draw a copy with every segment length divided by K, to see the structure of long "
                        "segments at a drawable N (said so in the title)")
    for name, sub_parser in sub.choices.items():
        sub_parser.set_defaults(_parser=sub_parser)
    return parser


_COMMANDS = {"validate": cmd_validate, "plan": cmd_plan, "show": cmd_show, "run": cmd_run, "draw": cmd_draw}


def _one_line(e: BaseException) -> str:
    from .spec import SpecError
    if isinstance(e, SpecError):
        head = f"invalid attention spec{f' ({e.source})' if e.source else ''}"
        return f"{head}: " + "; ".join(e.problems)
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage error)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported with the subcommand's usage line, not the top-level one
            args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # usage errors (2), --help and --version (0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    command = _COMMANDS[args.command]
    try:
        if args.command == "validate":
            return command(args)
        return command(args, args._parser)
    except SystemExit as e:  # parser.error inside a command
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every error: one clean line, no traceback
        from .lowering import BackendError
        from .planner import PlanError
        from .spec import SpecError
        from .draw import DrawError
        known = (SpecError, PlanError, BackendError, DrawError, CLIError)
        prefix = "" if isinstance(e, known) else f"{type(e).__name__}: "
        print(f"{PROG} {args.command}: error: {prefix}{_one_line(e)}", file=sys.stderr)
        return 1
