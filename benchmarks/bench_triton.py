"""Benchmark the Triton lowering against what users would pick instead, on one GPU, in one run.

Per case: time (median, triton.testing.do_bench) and useful TFLOP/s (plan.flops, plan.flops_backward: only the
(query, key) pairs the pattern attends to) of

* triton      this project, backend="triton"
* naive       what a user writes by hand (grouped mode): strided views of each branch's rows, public
              F.scaled_dot_product_attention per branch (cuDNN / flash as torch picks), scatter into the output
* torch       this project's backend="torch" (strided views + memory-efficient SDPA with lse per attend op +
              scatter or log-sum-exp merge; the only baseline here that also computes "all" mode)
* pregathered SDPA over segments gathered beforehand into contiguous tensors (the gather is not timed); in
              "all" mode "pregathered-unmerged": the branches' SDPAs without the log-sum-exp merge
* flex        FlexAttention with the pattern as mask_mod (block mask and kernel compiled; "OOM" when it does
              not fit)
* dense       dense SDPA over the whole sequence (cuDNN and the default SDPA backend), same heads

and the ratios between them. Each fwd+bwd step drops the last step's gradients first (no form adds into old
ones, and none holds two sets). Also: peak memory of fwd+bwd against the tensors that must exist (q, k, v, out,
their gradients, lse), and fwd+bwd at N = 1M tokens.

    PYTHONPATH=. python benchmarks/bench_triton.py [--out DIR] [--quick]   # writes DIR/<GPU>-triton-run-<time>.md
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from dilated_compiler import AttentionSpec, Branch, build_plan, compile_attention

FOUR = ((2048, 1), (4096, 2), (8192, 4), (16384, 8))
H = 16
LINES: list[str] = []
RESULT_FILE: list[Path] = []  # written after every line, so a run cut short still leaves its results
ONLY: list[str] = []  # --only


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    if RESULT_FILE:
        RESULT_FILE[0].write_text("\n".join(LINES) + "\n")


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def fwd_bwd(fn, leaves, dout):
    """One fwd+bwd step that first drops the leaves' gradients, so that no call (timed, warm-up or the first)
    adds into the last one's: every form does the same work and holds one set of gradients."""
    def step():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(fn(), dout)
    return step


def attempt(fn):
    """ms, or 'OOM' / 'error: ...'."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # report, keep benchmarking the rest
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:80]
        return f"error ({msg})"
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def spec_for(pairs, mode, causal):
    return AttentionSpec(tuple(Branch(w, r) for w, r in pairs), head_assignment=mode, causal=causal)


def inputs(N, D, dtype, grad=True):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, N, H, D, device="cuda", dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]


def module_step(N, heads=H, causal=False, mode="grouped", pairs=FOUR):
    """The module of ``pairs`` (w, r), four-branch by default (backend="triton", head assignment ``mode``) over
    random bf16 q, k, v (batch 1, D = 128) that need gradients. Returns (attn, q, k, v, dout, step); step() runs one
    fwd+bwd and clears the gradients."""
    attn = compile_attention(spec_for(pairs, mode, causal), backend="triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn_like(q)

    def step():
        attn(q, k, v).backward(dout)
        for t in (q, k, v):
            t.grad = None
    return attn, q, k, v, dout, step


def time_module(attn, N, D, dtype):
    q, k, v = inputs(N, D, dtype)
    dout = torch.randn_like(q)
    with torch.no_grad():
        fwd = bench(lambda: attn(q, k, v))
    fb = fwd_bwd(lambda: attn(q, k, v), (q, k, v), dout)
    fb()  # compile/tune the backward outside the timing
    return fwd, bench(fb)


def naive_attention(q, k, v, spec):
    """Grouped-mode dilated attention as a user writes it: strided views, public SDPA, scatter (N divisible by
    every segment length)."""
    B, N, Hq, D = q.shape
    G = spec.num_branches
    out = torch.zeros_like(q)
    start = 0
    for i, b in enumerate(spec.branches):
        size = Hq // G + (1 if i < Hq % G else 0)
        w, r, off = b.segment_length, b.dilation, i % b.dilation
        hs = slice(start, start + size)
        start += size

        def rows(x):
            return x.view(B * (N // w), w, Hq, D)[:, off::r, hs].transpose(1, 2)

        y = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), is_causal=spec.causal)
        out.view(B * (N // w), w, Hq, D)[:, off::r, hs] = y.transpose(1, 2)
    return out


def time_naive(spec, N, D, dtype):
    q, k, v = inputs(N, D, dtype)
    dout = torch.randn_like(q)
    with torch.no_grad():
        f = bench(lambda: naive_attention(q, k, v, spec))
    fb = fwd_bwd(lambda: naive_attention(q, k, v, spec), (q, k, v), dout)
    fb()
    return f, bench(fb)


def pregathered_inputs(spec, N, D, dtype):
    """Per branch, q, k, v as contiguous (segments, heads, rows, D) tensors (made beforehand), and the gradients
    of the outputs."""
    G = spec.num_branches
    tensors = []
    g = torch.Generator(device="cuda").manual_seed(1)
    for i, b in enumerate(spec.branches):
        heads = H if spec.head_assignment == "all" else H // G + (1 if i < H % G else 0)
        S, L = -(-N // b.segment_length), b.segment_length // b.dilation
        t = [torch.randn(S, heads, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3)]
        tensors.append(t)
    return tensors, [torch.randn_like(t[0]) for t in tensors]


def pregathered_forward(tensors, causal=False):
    """The pre-gathered form's forward: public SDPA on each branch's (q, k, v) of :func:`pregathered_inputs`."""
    def fwd():
        return [F.scaled_dot_product_attention(*t, is_causal=causal) for t in tensors]
    return fwd


def time_pregathered(spec, N, D, dtype):
    """SDPA per branch over contiguous (segments, heads, rows, D) tensors made beforehand."""
    tensors, douts = pregathered_inputs(spec, N, D, dtype)
    fwd = pregathered_forward(tensors, spec.causal)
    with torch.no_grad():
        f = bench(fwd)
    return f, bench(fwd_bwd(fwd, [x for t in tensors for x in t], douts))


def time_flex(spec, N, D, dtype):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    G = spec.num_branches
    assert spec.head_assignment == "grouped"
    ws = torch.tensor([b.segment_length for b in spec.branches], device="cuda")
    rs = torch.tensor([b.dilation for b in spec.branches], device="cuda")
    group = torch.tensor([i for i in range(G) for _ in range(H // G)], device="cuda")

    def mask_mod(b, h, qi, kv):
        gi = group[h]
        w, r = ws[gi], rs[gi]
        off = gi % r
        same = (qi // w) == (kv // w)
        sel = (((qi % w) - off) % r == 0) & (((kv % w) - off) % r == 0) & ((qi % w) >= off) & ((kv % w) >= off)
        ok = same & sel
        if spec.causal:
            ok = ok & (kv <= qi)
        return ok

    # compiled: uncompiled, create_block_mask evaluates the mask_mod into a dense (H, N, N) bool tensor first
    # (64 GiB at N = 64K), so the run would measure the mask's construction running out of memory, not flex.
    # torch.compile(create_block_mask) is what its deprecated _compile=True flag calls (torch 2.11 and later)
    try:
        bm = torch.compile(create_block_mask)(mask_mod, 1, H, N, N, device="cuda")
    except torch.OutOfMemoryError:
        raise RuntimeError("building the block mask ran out of memory") from None
    flex = torch.compile(flex_attention)
    leaves = inputs(N, D, dtype)
    q, k, v = [t.transpose(1, 2) for t in leaves]
    dout = torch.randn_like(q)
    with torch.no_grad():
        f = bench(lambda: flex(q, k, v, block_mask=bm))
    fb = fwd_bwd(lambda: flex(q, k, v, block_mask=bm), leaves, dout)
    fb()
    return f, bench(fb)


def time_dense(N, D, dtype, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    leaves = inputs(N, D, dtype)
    q, k, v = [t.transpose(1, 2) for t in leaves]
    dout = torch.randn_like(q)
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    with sdpa_kernel(be):
        with torch.no_grad():
            f = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        fb = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), leaves, dout)
        fb()
        return f, bench(fb)


def fmt(ms, flops):
    if not isinstance(ms, float):
        return ms
    return f"{ms:.3f} ms ({flops / ms / 1e9:.0f})"


def ratio(a, b):
    return f"{b / a:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def run_case(label, pairs, mode, causal, N, D, dtype, others=("naive", "torch", "pregathered"), flex=False,
             dense=()):
    if ONLY and not any(o in f"{label} {mode} causal={causal} N={N} D={D} {dtype}" for o in ONLY):
        return
    spec = spec_for(pairs, mode, causal)
    plan = build_plan(spec, N, H, D)
    ff, fb_flops = float(plan.flops), float(plan.flops + plan.flops_backward)
    res = {"triton": attempt(lambda: time_module(compile_attention(spec, backend="triton"), N, D, dtype))}
    try:
        from dilated_compiler.runtime.cache import lowered
        low = lowered(spec.key, "triton", (1, N, H, D), H, dtype, torch.device("cuda", torch.cuda.current_device()))
        print(f"  tile configs {label} {mode} causal={causal} N={N} D={D} {dtype}: "
              + ", ".join(f"{k.split('|')[0]}={v}" for k, v in low._configs.items()), flush=True)
    except Exception as e:  # informational only
        print(f"  (no tile configs: {e})")
    if "naive" in others and mode == "grouped":
        res["naive"] = attempt(lambda: time_naive(spec, N, D, dtype))
    if "torch" in others:
        res["torch"] = attempt(lambda: time_module(compile_attention(spec, backend="torch"), N, D, dtype))
    if "pregathered" in others:
        # in "all" mode it runs each branch's SDPA over all heads but does not merge them (public SDPA returns
        # no lse): less work than this project's op, which merges
        res["pregathered" if mode == "grouped" else "pregathered-unmerged"] = attempt(
            lambda: time_pregathered(spec, N, D, dtype))
    if flex:
        res["flex"] = attempt(lambda: time_flex(spec, N, D, dtype))
    dense_flops = 4 * N * N * H * D / (2 if causal else 1)
    for be in dense:
        res[f"dense-{be}"] = attempt(lambda: time_dense(N, D, dtype, causal, be))
    dt = str(dtype).replace("torch.", "")
    head = f"| {label} | {mode}{' causal' if causal else ''} | {N // 1024}K | {D} | {dt} |"
    for what, idx in (("fwd", 0), ("fwd+bwd", 1)):
        cells = []
        for name, r in res.items():
            ms = r[idx] if isinstance(r, tuple) else r
            flops = (dense_flops * (1 if idx == 0 else 3.5)) if name.startswith("dense") else (ff if idx == 0 else fb_flops)
            cells.append(f"{name}: {fmt(ms, flops)}")
        t = res["triton"][idx] if isinstance(res["triton"], tuple) else None
        rats = [f"{name}/triton {ratio(t, r[idx] if isinstance(r, tuple) else None)}"
                for name, r in res.items() if name != "triton"]
        emit(f"{head} {what} | " + "; ".join(cells) + " | " + "; ".join(rats) + " |")
    return res


def memory_case(pairs, mode, N, D, dtype):
    spec = spec_for(pairs, mode, False)
    attn = compile_attention(spec, backend="triton")
    q, k, v = inputs(N, D, dtype)
    dout = torch.randn_like(q)
    attn(q, k, v).backward(dout)  # compile and tune first
    q.grad = k.grad = v.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, lse = attn(q, k, v, return_lse=True)
    torch.autograd.backward(out, dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    el = q.element_size()
    must = out.numel() * el + 3 * q.numel() * el + lse.numel() * 4
    return base, peak, must


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="main cases only")
    ap.add_argument("--only", action="append", default=[],
                    help="run only the cases whose description ('four-branch grouped causal=False N=65536 D=64 "
                         "torch.bfloat16') contains this text (repeatable); skips the memory and 1M sections")
    args = ap.parse_args()
    ONLY.extend(args.only)
    name = torch.cuda.get_device_name()
    short = "H100" if "H100" in name else "H200" if "H200" in name else name.replace(" ", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a file of its own per run: the GPU's curated results file (<GPU>-triton.md, the history of what was tried)
    # is never overwritten
    RESULT_FILE.append(out / f"{short}-triton-run-{time.strftime('%Y%m%d-%H%M%S')}.md")
    emit(f"# Triton lowering benchmark on {name}")
    emit(f"torch {torch.__version__}, triton {__import__('triton').__version__}; batch 1, {H} heads; "
         f"four-branch = w {[w for w, _ in FOUR]} r {[r for _, r in FOUR]}; median of do_bench; "
         "cells: time (useful TFLOP/s); ratios: other time / triton time (>1: triton faster)")
    emit()
    emit("| case | mode | N | D | dtype | pass | results | ratios |")
    emit("|---|---|---|---|---|---|---|---|")
    t0 = time.time()
    bf = torch.bfloat16
    run_case("four-branch", FOUR, "grouped", False, 65536, 128, bf)
    run_case("dense segment", ((16384, 1),), "grouped", False, 16384, 128, bf, dense=("cudnn", "flash"))
    run_case("four-branch", FOUR, "grouped", False, 16384, 128, bf, flex=not args.quick)
    run_case("four-branch", FOUR, "all", False, 65536, 128, bf)
    run_case("four-branch", FOUR, "grouped", True, 65536, 128, bf)
    emit()
    emit(f"(cases took {time.time() - t0:.0f} s)")
    emit()
    if ONLY:
        args.quick = False  # the selected cases, wherever they are listed
    else:
        memory_and_million()
    more_cases(args.quick)
    emit()
    emit(f"(all cases took {time.time() - t0:.0f} s)")


def memory_and_million():
    bf = torch.bfloat16
    emit("## Memory, fwd+bwd, four-branch grouped, bf16, D=128")
    for N in (65536,):
        r = attempt(lambda: memory_case(FOUR, "grouped", N, 128, bf))
        if isinstance(r, tuple):
            base, peak, must = r
            emit(f"N={N}: peak allocated during fwd+bwd {peak / 2**20:.0f} MiB; held before (q, k, v, dout) "
                 f"{base / 2**20:.0f} MiB; added by fwd+bwd {(peak - base) / 2**20:.0f} MiB; "
                 f"out + dq + dk + dv + lse = {must / 2**20:.0f} MiB")
        else:
            emit(f"N={N}: {r}")
    emit()
    emit("## 1M tokens, four-branch grouped, bf16, 16 heads, D=128")
    N = 1 << 20

    def million():
        torch.cuda.reset_peak_memory_stats()
        spec = spec_for(FOUR, "grouped", False)
        plan = build_plan(spec, N, H, 128)
        f, b = time_module(compile_attention(spec, backend="triton"), N, 128, bf)
        return f, b, float(plan.flops), float(plan.flops + plan.flops_backward)
    r = attempt(million)
    if isinstance(r, tuple):
        emit(f"N={N}: fwd {fmt(r[0], r[2])}, fwd+bwd {fmt(r[1], r[3])}; peak memory "
             f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    else:
        emit(f"N={N}: {r}")


def more_cases(quick):
    bf, fp = torch.bfloat16, torch.float16
    emit()
    emit("## More cases")
    emit("| case | mode | N | D | dtype | pass | results | ratios |")
    emit("|---|---|---|---|---|---|---|---|")
    if not quick:
        run_case("four-branch", FOUR, "grouped", False, 262144, 128, bf)
        run_case("four-branch", FOUR, "all", False, 16384, 128, bf)
        run_case("four-branch", FOUR, "all", False, 262144, 128, bf, others=("pregathered",))
        run_case("four-branch", FOUR, "all", True, 65536, 128, bf)
        run_case("dense segment", ((16384, 1),), "grouped", True, 16384, 128, bf, dense=("cudnn",))
        run_case("four-branch", FOUR, "grouped", False, 65536, 64, bf)
        run_case("dense segment", ((16384, 1),), "grouped", False, 16384, 64, bf, dense=("cudnn",))
        run_case("four-branch", FOUR, "grouped", False, 65536, 128, fp)
        run_case("dense segment", ((16384, 1),), "grouped", False, 16384, 128, fp, dense=("cudnn",))
        run_case("four-branch", FOUR, "grouped", False, 65536, 128, bf, others=(), flex=True)


if __name__ == "__main__":
    main()
