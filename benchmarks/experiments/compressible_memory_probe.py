"""Probe: do the zero rows cost less when the outputs live in compressible memory?

In grouped mode out, dq, dk and dv are zero where a head's branch selects no row: 570 MB a fwd+bwd step for the
four-branch pattern at 64K, which SDPA over pre-gathered segments does not write (``zero_rows_probe.py``: 80-95% of
the 2% between the two). Memory made by ``cuMemCreate`` with ``CU_MEM_ALLOCATION_COMP_GENERIC`` is compressed by the
memory system where a device supports it, so runs of zeros might cost less DRAM traffic. The probe

1. reports whether the device offers compressible memory (and whether an allocation asked for it got it);
2. times ``zero_()``, copies of the step's own ``out`` (its zero rows in place) and of random data, and a read back,
   into plain (caching allocator) and compressible buffers of the size of q;
3. times the main case's fwd and fwd+bwd with out, dq, dk and dv allocated in a ``torch.cuda.MemPool``, plain or
   over an allocator making compressible memory (forms ``pool-plain``, ``pool-comp``), against the lowering as it
   is and the pre-gathered SDPA; it first checks that the compressible form's out and gradients are bitwise the
   lowering's.

    PYTHONPATH=. python benchmarks/experiments/compressible_memory_probe.py [--rounds 3] [--heat 6] [--measure 3]

Answer (H100 80GB HBM3, torch 2.11, stop 46; benchmarks/results/H100-triton.md, "Stop 46"): the device offers
compressible memory and granted it to every allocation. In it the step's fwd+bwd took 3.853 ms against 3.880 for
the lowering (0.993x in each of 3 rounds; the plain pool 3.885), the forward 0.917 against 0.924; the pre-gathered
SDPA 3.795 and 0.910. So compression takes back about a third of the gap (27 of 85 us). Not adopted: 0.7% of the
step, no target reached by it, and it would put the op's user-visible outputs in a pool of their own made through
torch's private allocator hook (or a compiled allocator shim) and libcuda. An earlier form of this probe handed out
tensors from a ring the probe kept references to: AccumulateGrad then copies each gradient instead of keeping it
(4.29 ms a step), hence the MemPool.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import target_rounds as tr  # noqa: E402

from dilated_compiler.lowering.triton import lowering as L  # noqa: E402

_ATTR_VMM, _ATTR_COMPRESSION = 102, 107  # CU_DEVICE_ATTRIBUTE_{VIRTUAL_MEMORY_MANAGEMENT,GENERIC_COMPRESSION}_SUPPORTED


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _Prop(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _Access(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class Driver:
    """The few CUDA driver calls a compressible allocation needs (cuMemCreate, cuMemMap, ...)."""

    def __init__(self, device: int):
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.dev = device
        self.prop = _Prop()
        self.prop.type = 1            # CU_MEM_ALLOCATION_TYPE_PINNED
        self.prop.location.type = 1   # CU_MEM_LOCATION_TYPE_DEVICE
        self.prop.location.id = device
        self.prop.allocFlags.compressionType = 1  # CU_MEM_ALLOCATION_COMP_GENERIC
        gran = ctypes.c_size_t()
        self.check("cuMemGetAllocationGranularity", ctypes.byref(gran), ctypes.byref(self.prop), 1)
        self.granularity = gran.value

    def check(self, name, *args):
        rc = getattr(self.cu, name)(*args)
        if rc != 0:
            raise RuntimeError(f"{name} returned CUresult {rc}")

    def attribute(self, attr: int) -> int:
        v = ctypes.c_int()
        self.check("cuDeviceGetAttribute", ctypes.byref(v), attr, self.dev)
        return v.value

    def alloc(self, nbytes: int) -> tuple[int, bool]:
        """A mapped compressible allocation of at least ``nbytes``: (address, whether compression was granted)."""
        size = -(-nbytes // self.granularity) * self.granularity
        h = ctypes.c_ulonglong()
        self.check("cuMemCreate", ctypes.byref(h), ctypes.c_size_t(size), ctypes.byref(self.prop),
                   ctypes.c_ulonglong(0))
        got = _Prop()
        self.check("cuMemGetAllocationPropertiesFromHandle", ctypes.byref(got), h)
        ptr = ctypes.c_ulonglong()
        self.check("cuMemAddressReserve", ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0),
                   ctypes.c_ulonglong(0), ctypes.c_ulonglong(0))
        self.check("cuMemMap", ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), h, ctypes.c_ulonglong(0))
        acc = _Access()
        acc.location.type, acc.location.id, acc.flags = 1, self.dev, 3  # PROT_READWRITE
        self.check("cuMemSetAccess", ptr, ctypes.c_size_t(size), ctypes.byref(acc), ctypes.c_size_t(1))
        return ptr.value, got.allocFlags.compressionType == 1

    def tensor(self, shape, dtype) -> tuple[torch.Tensor, bool]:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        ptr, granted = self.alloc(nbytes)

        class _Array:
            __cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}

        t = torch.as_tensor(_Array(), device=f"cuda:{self.dev}")
        assert t.data_ptr() == ptr
        return t.view(dtype).view(shape), granted


def ms(fn, reps=20) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def bandwidth(drv, ref_out) -> None:
    shape, dtype = ref_out.shape, ref_out.dtype
    nbytes = ref_out.numel() * dtype.itemsize
    rnd = torch.randn(shape, dtype=dtype, device="cuda")
    plain = torch.empty(shape, dtype=dtype, device="cuda")
    comp, granted = drv.tensor(shape, dtype)
    print(f"compressible buffer of {nbytes / 2**20:.0f} MiB: compression granted = {granted}")
    zero_frac = float((ref_out == 0).float().mean())
    print(f"the step's out: {zero_frac:.3f} of its elements are zero")
    print("| operation | plain ms | compressible ms | plain GB/s (dst bytes) | compressible GB/s |")
    print("|---|---|---|---|---|")
    for name, op in (("zero_()", lambda d: d.zero_()), ("copy_(out)", lambda d: d.copy_(ref_out)),
                     ("copy_(randn)", lambda d: d.copy_(rnd))):
        tp, tc = ms(lambda: op(plain)), ms(lambda: op(comp))
        print(f"| {name} | {tp:.3f} | {tc:.3f} | {nbytes / tp / 1e6:.0f} | {nbytes / tc / 1e6:.0f} |")
    plain.copy_(ref_out)
    comp.copy_(ref_out)
    assert torch.equal(plain, comp)
    tp = ms(lambda: plain.sum(dtype=torch.float32))
    tc = ms(lambda: comp.sum(dtype=torch.float32))
    print(f"| sum() after copy_(out) | {tp:.3f} | {tc:.3f} | {nbytes / tp / 1e6:.0f} | {nbytes / tc / 1e6:.0f} |")
    del rnd, plain


def pool_alloc(pool):
    """An ``_uninitialized`` that takes its tensors from ``pool`` (the caching allocator's reuse, in a pool)."""
    def alloc(shape, dtype=None, device=None):
        with torch.cuda.use_mem_pool(pool):
            return torch.empty(shape, dtype=dtype, device=device)
    return alloc


@contextlib.contextmanager
def allocating(alloc):
    """The lowering's ``_uninitialized`` (out, dq, dk and dv) replaced by ``alloc`` while it runs."""
    real = L._uninitialized
    L._uninitialized = alloc
    try:
        yield
    finally:
        L._uninitialized = real


def compressible_pool(drv):
    """A torch.cuda.MemPool whose segments are compressible allocations (torch's private allocator hook: a probe)."""
    log = compressible_pool.log = []
    alloc_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)
    free_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)

    @alloc_t
    def c_alloc(size, device, stream):
        ptr, granted = drv.alloc(size)
        log.append((size >> 20, granted))
        return ptr

    @free_t
    def c_free(ptr, size, device, stream):  # the probe keeps its segments until it exits
        pass

    allocator = torch._C._cuda_customAllocator(ctypes.cast(c_alloc, ctypes.c_void_p).value,
                                               ctypes.cast(c_free, ctypes.c_void_p).value)
    pool = torch.cuda.MemPool(allocator)
    compressible_pool.keep = (c_alloc, c_free, allocator)
    return pool


def main():
    args = tr.sustained_args(heat=6.0)
    torch.cuda.init()
    torch.empty(1, device="cuda")
    drv = Driver(torch.cuda.current_device())
    vmm, comp = drv.attribute(_ATTR_VMM), drv.attribute(_ATTR_COMPRESSION)
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}; virtual memory management {vmm}, "
          f"generic compression {comp}; granularity {drv.granularity} bytes")
    if not comp:
        print("the device offers no compressible memory: nothing to measure")
        return

    case = tr.main_case()
    _, attn, q, k, v, dout = case
    with torch.no_grad():
        ref_out = attn(q, k, v)
    bandwidth(drv, ref_out)

    comp_pool = compressible_pool(drv)
    alloc_plain = pool_alloc(torch.cuda.MemPool())
    alloc_comp = pool_alloc(comp_pool)

    def grads(alloc):
        res = {}

        def run():
            out = attn(q, k, v)
            res["out"] = out.clone()
            res["grads"] = [g.clone() for g in torch.autograd.grad(out, (q, k, v), dout)]
        with allocating(alloc) if alloc else contextlib.nullcontext():
            run()
        return res
    ref, got = grads(None), grads(alloc_comp)
    assert torch.equal(ref["out"], got["out"]), "out differs in compressible memory"
    assert all(torch.equal(a, b) for a, b in zip(ref["grads"], got["grads"])), "gradients differ"
    print(f"compressible form: out, dq, dk, dv bitwise the lowering's; pool allocations so far {compressible_pool.log}")
    del ref, got

    tr.sustained_forms(case, {"pool-plain": lambda: allocating(alloc_plain),
                              "pool-comp": lambda: allocating(alloc_comp)}, args)
    print(f"compressible pool: segments made (MiB, compression granted) {compressible_pool.log}")


if __name__ == "__main__":
    main()
