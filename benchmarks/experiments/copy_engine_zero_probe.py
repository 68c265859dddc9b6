"""Probe: can the zero rows be written off the SMs, by 2D memsets on a second stream, under the kernels?

In grouped mode out, dq, dk and dv are zero where a head's branch selects no row: 570 MB a fwd+bwd step for the
four-branch pattern at 64K, which SDPA over pre-gathered segments does not write. The kernels write them now (the
zero fill: TMA stores of a zero tile), and ``zero_rows_probe.py`` found them 80-95% of the 2% between the step and
the pre-gathered SDPA. The kernels are bound by their matrix work, not by DRAM, so zeros written by the DMA (copy)
engines while the kernels run might cost nothing. The zero rows of a head group are a few arithmetic progressions
of rows (for this pattern, 11 per tensor: r - 1 residues per dilated group), each one ``cuMemsetD2D32Async``
(width: the group's heads, pitch: r rows).

The "memset" form runs the step with the zero fill off and out, dq, dk and dv taken from ``torch.empty``, and on a
second stream, waiting for the allocation, the memsets of their zero rows; the op's caller waits for that stream
before it returns. The probe

1. decomposes the zero rows (read from the lowering's out and dk) into memsets and checks that they cover exactly
   those rows;
2. times the memsets alone, a compute-bound matmul alone, and both at once on two streams (do the memsets run
   beside the SMs' work, and do they slow it?);
3. checks that the memset form's out, dq, dk and dv are bitwise the lowering's, with its tensors first filled with
   NaN (so a row neither the kernels nor the memsets wrote shows);
4. times the main case's fwd and fwd+bwd (lowering; "unwritten": zero fill off and nothing written there, as
   ``zero_rows_probe.py``; "memset"; the pre-gathered SDPA) at the steady clock, rounds rotated.

    PYTHONPATH=. python benchmarks/experiments/copy_engine_zero_probe.py [--rounds 3] [--heat 6] [--measure 3]

``--check-cpu`` checks step 1 without a GPU: for several small specs (default and explicit offsets, ragged N,
causal) the zero rows of the torch backend's out and dk, decomposed into memsets that must cover exactly them.

Answer (stop 48, H100, ``--rounds 2 --heat 4 --measure 3``, 145 s): no. The 11 memsets of a tensor cover exactly
its zero rows and the memset form is bitwise the lowering, but the memsets do not run free beside the SMs' work:
136 MiB took 0.118 ms alone, and next to an 8192^3 bf16 matmul (1.398 ms alone) the pair took 1.599 ms, more than
one after the other (1.516). The step: fwd 0.952 ms against the lowering's 0.918, fwd+bwd 3.996 against 3.852 (the
zeros unwritten: 3.778; the pre-gathered SDPA: 3.766). The memsets cost three times what the zero fill does; not
adopted. Figures in ``benchmarks/results/H100-triton.md``, stop 48.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_triton as bt  # noqa: E402
import target_rounds as tr  # noqa: E402
from compressible_memory_probe import ms  # noqa: E402
from zero_rows_probe import zeros_unwritten  # noqa: E402

from dilated_compiler import compile_attention  # noqa: E402
from dilated_compiler.lowering.triton import lowering as L  # noqa: E402


def memsets_for(zero: np.ndarray, row_bytes: int, heads: int) -> list[tuple[int, int, int, int]]:
    """The zero rows ``zero`` ((N, H) bool: token n of head h is zero) of a (1, N, H, D) tensor as 2D memsets
    (offset bytes, pitch bytes, width bytes, height): heads with the same column side by side are one group; a
    group's stride is the least gap between its selected tokens, and each residue's runs of zero tokens one memset."""
    calls, h = [], 0
    while h < heads:
        h1 = h + 1
        while h1 < heads and np.array_equal(zero[:, h1], zero[:, h]):
            h1 += 1
        col = zero[:, h]
        sel = np.flatnonzero(~col)
        s = int(np.diff(sel).min()) if len(sel) > 1 else 1
        for c in range(s):
            z = col[c::s]
            edges = np.flatnonzero(np.diff(np.concatenate(([0], z.astype(np.int8), [0]))))
            for a, b in zip(edges[::2], edges[1::2]):
                calls.append((int((c + a * s) * heads + h) * row_bytes, s * heads * row_bytes, (h1 - h) * row_bytes,
                              int(b - a)))
        h = h1
    return calls


def covered(calls, N: int, heads: int, row_bytes: int) -> np.ndarray:
    """The (N, H) rows the memsets ``calls`` write (the check of :func:`memsets_for`)."""
    m = np.zeros((N, heads), dtype=bool)
    for off, pitch, width, height in calls:
        r0, stride, nh = off // row_bytes, pitch // row_bytes, width // row_bytes
        for i in range(height):
            t, h = divmod(r0 + i * stride, heads)
            m[t, h:h + nh] = True
    return m


class Memsets:
    """``cuMemsetD2D32Async`` of a tensor's zero rows on a side stream that first waits for the current one."""

    def __init__(self, calls):
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.cu.cuMemsetD2D32Async.argtypes = [ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_uint, ctypes.c_size_t,
                                               ctypes.c_size_t, ctypes.c_void_p]
        self.calls, self.side = calls, torch.cuda.Stream()

    def issue(self, t: torch.Tensor, stream=None) -> None:
        stream = stream or self.side
        if stream is self.side:
            stream.wait_stream(torch.cuda.current_stream())
        base, handle = t.data_ptr(), ctypes.c_void_p(stream.cuda_stream)
        for off, pitch, width, height in self.calls:
            rc = self.cu.cuMemsetD2D32Async(base + off, pitch, 0, width // 4, height, handle)
            if rc != 0:
                raise RuntimeError(f"cuMemsetD2D32Async returned CUresult {rc}")

    def join(self) -> None:
        torch.cuda.current_stream().wait_stream(self.side)


class _Torch:
    """The lowering module's ``torch`` in the memset form: its zeros of q's shape (out, dq, dk, dv) are empty (or NaN,
    for the check) with their zero rows memset on the side stream."""

    def __init__(self, memsets, shape, fill):
        self.memsets, self.shape, self.fill = memsets, tuple(shape), fill

    def _made(self, shape, **kw):
        t = torch.full(shape, self.fill, **kw) if self.fill is not None else torch.empty(shape, **kw)
        if tuple(t.shape) == self.shape:
            self.memsets.issue(t)
        return t

    def zeros(self, shape, **kw):
        return self._made(shape, **kw) if tuple(shape) == self.shape else torch.zeros(shape, **kw)

    def zeros_like(self, t, **kw):
        return self._made(t.shape, dtype=kw.get("dtype", t.dtype), device=kw.get("device", t.device))

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def patched(module_torch, memsets):
    """The memset form while it runs: zero fill off, the lowering's ``torch`` replaced by ``module_torch``, and the
    op's forward and backward waiting for ``memsets``' stream before they return."""
    T = L.TritonLowering
    zfill, real, fwd, bwd = T._zfill, L.torch, T._forward, T._backward

    def joined(fn):
        def run(*a, **kw):
            res = fn(*a, **kw)
            memsets.join()
            return res
        return run
    T._zfill, L.torch, T._forward, T._backward = (lambda self, *a: False), module_torch, joined(fwd), joined(bwd)
    try:
        yield
    finally:
        T._zfill, L.torch, T._forward, T._backward = zfill, real, fwd, bwd


def overlap(memsets, like: torch.Tensor, calls) -> None:
    nbytes = sum(w * h for _, _, w, h in calls)
    t = torch.empty_like(like)
    main = torch.cuda.current_stream()
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    t_set = ms(lambda: memsets.issue(t, main))
    t_zero = ms(lambda: t.zero_())
    t_mm = ms(lambda: a @ b)

    def both():
        memsets.issue(t)
        a @ b
        memsets.join()
    t_both = ms(both)
    print(f"zero rows of one tensor: {len(calls)} memsets, {nbytes / 2**20:.0f} MiB in {t_set:.3f} ms "
          f"({nbytes / t_set / 1e6:.0f} GB/s); zero_() of all {t.numel() * t.element_size() / 2**20:.0f} MiB "
          f"{t_zero:.3f} ms")
    print(f"matmul 8192^3 bf16 alone {t_mm:.3f} ms; with the memsets on a second stream {t_both:.3f} ms "
          f"(serial would be {t_mm + t_set:.3f})")


def check_cpu() -> None:
    """The decomposition of step 1 on the torch backend's zero rows, for small specs of several kinds."""
    from dilated_compiler import AttentionSpec, Branch

    cases = {
        "four branches": ((Branch(64, 1), Branch(128, 2), Branch(256, 4), Branch(512, 8)), 8, 1024, False),
        "explicit offsets": ((Branch(96, 3, offset=2), Branch(192, 4, offset=1)), 6, 768, False),
        "ragged N": ((Branch(64, 1), Branch(128, 2), Branch(256, 4)), 6, 700, False),
        "causal": ((Branch(128, 1), Branch(256, 4)), 4, 512, True),
    }
    D = 4
    for name, (branches, H, N, causal) in cases.items():
        attn = compile_attention(AttentionSpec(branches, causal=causal), backend="torch")
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, N, H, D, generator=g, requires_grad=True) for _ in range(3))
        out = attn(q, k, v)
        dk = torch.autograd.grad(out, k, torch.randn(out.shape, generator=g))[0]
        for what, t in (("out", out), ("dk", dk)):
            zero = (t == 0).all(-1)[0].numpy()
            calls = memsets_for(zero, D * 2, H)
            assert np.array_equal(covered(calls, N, H, D * 2), zero), f"{name}: {what}'s memsets miss rows"
            print(f"{name}: {what} has {int(zero.sum())} zero rows of {zero.size}, {len(calls)} memsets cover them")


def main():
    if "--check-cpu" in sys.argv:
        return check_cpu()
    args = tr.sustained_args(heat=6.0)
    case = tr.main_case()
    _, attn, q, k, v, dout = case
    N, D = tr.N, tr.D

    def result():
        out = attn(q, k, v)
        return [out.clone()] + [g.clone() for g in torch.autograd.grad(out, (q, k, v), dout)]
    ref = result()
    zero_q = (ref[0] == 0).all(-1)[0].cpu().numpy()
    zero_k = (ref[2] == 0).all(-1)[0].cpu().numpy()
    assert np.array_equal(zero_q, zero_k), "the query and key rows' zero patterns differ: one memset list won't do"
    row_bytes = D * q.element_size()
    calls = memsets_for(zero_q, row_bytes, bt.H)
    assert np.array_equal(covered(calls, N, bt.H, row_bytes), zero_q), "the memsets do not cover the zero rows"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: zero rows {zero_q.mean():.3f} of (token, head) "
          f"rows, {len(calls)} memsets a tensor (offset, pitch, width, height): {calls}", flush=True)
    memsets = Memsets(calls)
    overlap(memsets, q, calls)

    with patched(_Torch(memsets, q.shape, float("nan")), memsets):
        got = result()
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, got):
        assert torch.equal(a, b), f"memset form: {name} differs from the lowering's"
    print("memset form (its tensors filled with NaN first): out, dq, dk, dv bitwise the lowering's", flush=True)
    del ref, got

    ms_torch = _Torch(memsets, q.shape, None)
    tr.sustained_forms(case, {"unwritten": zeros_unwritten, "memset": lambda: patched(ms_torch, memsets)}, args)


if __name__ == "__main__":
    main()
