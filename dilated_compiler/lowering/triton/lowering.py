"""The Triton lowering: a plan -> generated Triton kernels (see :mod:`.generator`) + launchers.

Per pass, one launch covers every branch, segment, head and tile of the plan, driven by a tile table
(:mod:`.tables`):

* forward: ``dilated_fwd`` (grouped: out/lse directly; all: per-branch out_b/lse_b, then ``dilated_merge``);
  on Hopper GPUs, calls (causal or not; head_dim 64 or 128) whose segments are whole 128-row tiles run
  ``gluon_fwd`` instead, a warp-specialised persistent kernel written in Gluon (:mod:`.gluon_hopper`; same tile
  table, same results; in "all" mode it writes the per-branch results and ``dilated_merge`` follows);
* backward: ``dilated_bwd_dq`` (which also computes delta = rowsum(dO * O) - dlse of its rows), then
  ``dilated_bwd_dkdv``. Recomputes the probabilities; nothing of size N*w is ever stored. Grouped calls that run
  ``gluon_fwd`` run ``gluon_bwd_dq`` and ``gluon_bwd_dkdv`` instead (same structure, same results); in "all" mode
  each runs once over all branches in phases, a branch after another adding into fp32 buffers
  (``gluon_hopper.ALL_MODE_BACKWARD``), where the tl kernels add over the branches with atomics; a dilation-1
  branch among others goes last and writes the gradients in the inputs' dtype (``ALL_MODE_FINAL_PHASE``). Under
  grouped-query attention ``gluon_bwd_dkdv`` walks the kv heads' key tiles (:func:`.tables.kv_tile_table`), each
  over the query heads that read its rows, where the tl kernels add each query head's share with atomics; grouped
  mode with a kv head's query heads in several branches runs dk/dv in a phase per branch, adding into float32
  (``gluon_hopper.SPLIT_BACKWARD``; off, the tl backward runs such calls).

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported; for tests). Producing the source (``source()``) needs neither.

Memory traffic: on GPUs with a tensor memory accelerator (compute capability 9.0 and up) tiles move through
tensor descriptors over the strided rows (the kernels' [Note: TMA]); outputs that the kernels fill completely
(gaps included, [Note: zero fill]) are allocated without a memset.

Precision: fp16/bf16 use the tensor cores with fp32 accumulation; fp32 inputs use exact fp32 products
(``input_precision="ieee"``, on the FMA units: slow), or TF32 tensor-core products (``"tf32"``, errors about 2e-3
relative) where torch's setting for float32 matmuls allows TF32 (:func:`..base.float32_products`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os

import torch
import triton  # noqa: F401  (an ImportError here keeps the backend unregistered)

from ...planner import Plan
from ..base import BackendError, aux_shape, float32_products, register_lowering, softmax_scale
from . import autotune, gluon_hopper
from .autotune import TileConfig, candidates, interpreting
from .diskcache import load_module
from .generator import generate_source, generator_fingerprint
from .tables import (branch_heads, kv_tile_heads, kv_tile_table, persistent_order, selected_rows, spans_cover,
                     tile_table, whole_groups_reason)

__all__ = ["TritonLowering"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
FLOAT32_DOTS = ("ieee", "tf32")  # float32 products: exact, or on the TF32 tensor cores (base.float32_products)
_ROWS_PER_PROGRAM = 64  # rows of the elementwise merge kernel


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device and its current stream (and TMA scratch is allocated there): make
    it the inputs' device for the call, as torch's own operators do."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the row-major strides the kernels assume (they pass one tensor's strides for several):
    ``contiguous()`` leaves any stride on a dimension of size 1 (batch 1 of a (seq, batch, ...) layout
    transposed, one head of a (B, H, N, D) one), which addresses the same elements as the row-major one, so
    such a tensor is restrided without a copy."""
    t = t.contiguous()
    strides, step = [], 1
    for n in reversed(t.shape):
        strides.append(step)
        step *= n
    strides = tuple(reversed(strides))
    return t if t.stride() == strides else t.as_strided(t.shape, strides)


def _uninitialized(shape, dtype, device) -> torch.Tensor:
    """Outputs the kernels write in full (tests replace this to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if not interpreting() else "cpu")


def _ensure_allocator() -> None:
    """Kernels that make tensor descriptors need Triton's scratch allocator; set ours unless one is set."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:
        pass
    triton.set_allocator(_scratch)


@contextlib.contextmanager
def _scratch_kept():
    """Yields whether Triton's scratch allocations made inside the block (the Gluon kernels' tensor descriptors, read
    by their copies for as long as the kernel runs) stay referenced until the block ends. Where a launch may overlap
    the one before it ([Note: overlap]), the caching allocator must not hand that launch's scratch to the next one
    in the stream before both have run. Yields False (nothing kept) where Triton has no allocator hook."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:
        yield False
        return
    inner = _allocator.get()
    inner = _scratch if isinstance(inner, NullAllocator) else inner
    kept = []

    def keep(size: int, alignment: int, stream):
        buf = inner(size, alignment, stream)
        kept.append(buf)
        return buf
    token = _allocator.set(keep)
    try:
        yield True
    finally:
        _allocator.reset(token)


@functools.lru_cache(maxsize=None)
def _tma_supported(device: torch.device) -> bool:
    if device.type == "cpu":
        return interpreting()
    return torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(triton.language, "make_tensor_descriptor")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# set to False (tests, experiments) to run the pointer-load path everywhere
USE_TMA = True
# set to False (or DILATED_COMPILER_GLUON=0) to run the generated tl forward where the Gluon one would run
USE_GLUON = os.environ.get("DILATED_COMPILER_GLUON", "1") != "0"
# the Gluon forward's tiles (gluon_hopper.BLOCK_M x BLOCK_N): its tile table and zero-fill spans
_GLUON_TILES = TileConfig(gluon_hopper.BLOCK_M, gluon_hopper.BLOCK_N, 4, 2)
# the Gluon backward's tiles: 128-row query tiles (dq) and key tiles (dk/dv), inner steps of 64 rows
_GLUON_BWD_TILES = TileConfig(gluon_hopper.BWD_BLOCK, gluon_hopper.BWD_STEP, 4, 2)


_MAX_BATCH = 65535  # the kernels' grids are (tiles, batch); CUDA's limit on a grid's second dimension


class TritonLowering:
    """A plan lowered to generated Triton kernels. See the module docstring."""

    name = "triton"

    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype, float32_dot: str | None = None):
        """``float32_dot``: the products' input_precision for float32 inputs, ``"ieee"`` or ``"tf32"`` (default:
        ``base.float32_products()``, which follows torch's setting for float32 matmuls)."""
        if not plan.is_concrete:
            raise ValueError("the triton lowering needs a plan with concrete shapes")
        if device.type not in ("cuda", "cpu"):
            raise BackendError(f"backend 'triton' runs on CUDA devices (or CPU under TRITON_INTERPRET=1); "
                               f"got {device.type!r}")
        if dtype not in _DTYPES:
            hint = " (float64 runs on CPU, with backend 'torch')" if dtype == torch.float64 else ""
            raise BackendError(f"backend 'triton' supports dtypes {[str(d) for d in _DTYPES]}; got {dtype}{hint}")
        D = int(plan.head_dim)
        if D > _MAX_HEAD_DIM:
            raise BackendError(f"backend 'triton' supports head_dim up to {_MAX_HEAD_DIM}; got {D}")
        if int(plan.batch) > _MAX_BATCH:
            raise BackendError(f"backend 'triton' launches one grid row per batch element (CUDA allows "
                               f"{_MAX_BATCH}); got batch {int(plan.batch)}: split the batch, or use backend 'torch'")
        self.plan = plan
        self.device = device
        self.dtype = dtype
        self.spec = plan.spec
        self.scale = softmax_scale(plan)
        self.causal = plan.spec.causal
        self.merge = plan.spec.head_assignment == "all"
        self.heads, self.kv_heads = int(plan.heads), int(plan.kv_heads)
        self.gqa = self.heads // self.kv_heads
        self._split = not self.merge and whole_groups_reason(plan, self.gqa) is not None   # see _split_groups
        self.head_dim = D
        self.block_d = max(16, _next_pow2(D))
        float32_dot = float32_products() if float32_dot is None else float32_dot
        if float32_dot not in FLOAT32_DOTS:
            raise BackendError(f"float32_dot must be one of {FLOAT32_DOTS}; got {float32_dot!r}")
        self.dot_precision = float32_dot if dtype == torch.float32 else None
        self.specialisation = {
            "heads": self.heads, "kv_heads": self.kv_heads, "GQA": self.gqa, "HEAD_DIM": D,
            "BLOCK_D": self.block_d, "dtype": str(dtype).replace("torch.", ""), "CAUSAL": self.causal,
            "mode": self.spec.head_assignment, "scale": f"{self.scale:.8g}",
            "dot": self.dot_precision or "native",
        }
        self._text = generate_source(self.spec, self.specialisation, self.dot_precision)
        key_src = "|".join([self.spec.key, repr(sorted(self.specialisation.items())), generator_fingerprint(),
                            torch.__version__, triton.__version__])
        self.cache_key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
        self._module = None
        self._gluon_text = gluon_hopper.gluon_source(self.spec, self.specialisation)
        self._gluon_key = hashlib.sha256("|".join([key_src, gluon_hopper.source_fingerprint(), "gluon"]).encode()
                                         ).hexdigest()[:24]
        self._gluon_module = None
        self._gluon_reasons: dict[tuple, str | None] = {}
        self._tables: dict[tuple, torch.Tensor] = {}
        self._configs: dict[str, TileConfig] = {}
        self._covers: dict[tuple, bool] = {}

    # ---- plumbing -----------------------------------------------------------------------------------------
    @property
    def kernels(self):
        if self._module is None:
            self._module = load_module(self.cache_key, self._text)
        return self._module

    @property
    def gluon_kernels(self):
        if self._gluon_module is None:
            self._gluon_module = load_module(self._gluon_key, self._gluon_text)
        return self._gluon_module

    def gluon_unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_kpm: bool,
                          *more: torch.Tensor) -> str | None:
        """None if the Gluon kernels (:mod:`.gluon_hopper`) run this call (contiguous q, k, v and, for the
        backward, out and its gradient in ``more``), else why not. Besides alignment, forward and backward have the
        same reasons."""
        if not USE_GLUON:
            return "turned off (DILATED_COMPILER_GLUON=0)"
        if any(t.data_ptr() % 16 for t in (q, k, v, *more)):
            return ("q, k and v must start on 16 bytes (tensor descriptors)" if not more else
                    "q, k, v, out and its gradient must start on 16 bytes (tensor descriptors)")
        key = (q.device, tuple(q.shape), q.dtype, has_kpm)
        if key not in self._gluon_reasons:
            self._gluon_reasons[key] = gluon_hopper.unsupported_reason(
                spec=self.spec, seq_len=q.shape[1], heads=self.heads, kv_heads=self.kv_heads,
                head_dim=self.head_dim, dtype=q.dtype, device=q.device,
                table=self._table("q", _GLUON_TILES, q.device).cpu(), has_kpm=has_kpm,
                triton_version=triton.__version__)
        return self._gluon_reasons[key]

    def _launch_gluon_fwd(self, q, k, v, out, lse, zfill, consumer_regs=gluon_hopper.CONSUMER_REGS, stages=None):
        """Grouped: out (B, N, H, D), lse (B, H, N). "all" mode: each branch's, out (G, B, N, H, D) and lse
        (G, B, H, N), which dilated_merge combines."""
        table, grid, dilations = self._gluon_launch_args("q", _GLUON_TILES, q)
        B, N, H, D = q.shape
        og, lg = (out.stride(0), lse.stride(0)) if self.merge else (0, 0)
        lse_b = lse[0] if self.merge else lse
        return self.gluon_kernels.gluon_fwd[grid](
            q, k, v, out, lse, table, dilations, table.shape[0], B, N, H, self.scale * math.log2(math.e),
            q.stride(0), k.stride(0), og, lg, lse_b.stride(0), lse_b.stride(1), HEAD_DIM=D,
            BLOCK_M=gluon_hopper.BLOCK_M, BLOCK_N=gluon_hopper.BLOCK_N, STAGES=stages or gluon_hopper.FWD_STAGES[D],
            ZFILL=zfill, CAUSAL=self.causal, CONSUMER_REGS=consumer_regs, num_warps=4, MERGE=self.merge,
            GQA=self.gqa)

    def _gluon_launch_args(self, kind: str, tiles: TileConfig, q: torch.Tensor):
        """A Gluon kernel's tile table (in persistent order), persistent grid (at most one program per SM, then
        batch) and padded dilations."""
        key = ("persistent", kind, tiles.block, tiles.partner, q.device)
        if key not in self._tables:
            table = self._table(kind, tiles, q.device).cpu()
            programs = min(table.shape[0], _sm_count(q.device))
            self._tables[key] = (persistent_order(table, programs, tiles.partner, self._tile_heads(kind, table))
                                 .to(q.device), programs)
        table, programs = self._tables[key]
        return table, (programs, q.shape[0]), self._gluon_dilations(q.device)

    def _tile_heads(self, kind: str, table: torch.Tensor) -> torch.Tensor | None:
        """The query heads each row of a "kv" table walks (its tiles' work is that many walks), else None."""
        return kv_tile_heads(self.plan, table, self.gqa) if kind == "kv" and self.gqa > 1 else None

    def _gluon_dilations(self, device: torch.device) -> torch.Tensor:
        """The branches' dilations padded to gluon_hopper.MAX_BRANCHES (the kernels' RB); sets the allocator the
        kernels' tensor descriptors need."""
        key = ("gluon dilations", device)
        if key not in self._tables:
            self._tables[key] = torch.tensor(gluon_hopper.padded_dilations(self.spec), dtype=torch.int32,
                                             device=device)
        _ensure_allocator()
        return self._tables[key]

    def _all_mode_phases(self, device: torch.device):
        """"all" mode's backward phases: (order, ACC, SEL, SEL_KV). With gluon_hopper.ALL_MODE_FINAL_PHASE and a
        branch of dilation 1 among two or more, that branch goes last and writes the gradients in the inputs' dtype
        (ACC 3 or 4), reading the float32 buffers where an earlier phase wrote (SEL, (H, N) uint8, for dq; SEL_KV,
        (Hkv, N), for dk and dv). The earlier phases: first a branch whose rows include every other earlier
        branch's, storing (ACC 3; then the buffers need no zeroing), else all adding into zeros (ACC 4); the rest in
        spec order. Otherwise :meth:`_all_mode_order` (ACC 2 where its first phase stores, else 1) and both SELs
        None."""
        key = ("all mode phases", device)
        if key not in self._tables:
            dil = [int(b.dilation) for b in self.spec.branches]
            if self._final_phase():
                rows = selected_rows(self.plan)
                last = dil.index(1)
                assert bool(rows[last].all()), "a dilation-1 branch selects every row"
                earlier = [i for i in range(len(dil)) if i != last]
                union = rows[earlier].any(dim=0)
                first = next((i for i in earlier if not bool((union & ~rows[i]).any())), None)
                if first is None:
                    order, acc = [(i, False) for i in earlier], 4
                else:
                    order, acc = [(first, True)] + [(i, False) for i in earlier if i != first], 3
                sel = union.to(torch.uint8).contiguous()
                # dK and dV of kv head h // GQA: written earlier where any of its query heads' rows were
                sel_kv = union.view(self.kv_heads, self.gqa, -1).any(dim=1).to(torch.uint8).contiguous()
                self._tables[key] = (order + [(last, False)], acc, sel.to(device), sel_kv.to(device))
            else:
                order = self._all_mode_order()
                self._tables[key] = (order, 2 if order[0][1] else 1, None, None)
        return self._tables[key]

    def _split_groups(self) -> bool:
        """Grouped mode under grouped-query attention where some kv head's query heads span two branches: dK and
        dV of its rows add over tiles of several branches, so the Gluon dk/dv launch runs in phases (SPLIT)."""
        return self._split

    def _head_ends(self, device: torch.device) -> torch.Tensor:
        """Grouped mode: one past each branch's last query head, padded to gluon_hopper.MAX_BRANCHES (HEAD_END)."""
        key = ("head ends", device)
        if key not in self._tables:
            ends = [end for _, end in branch_heads(self.plan)]
            self._tables[key] = torch.tensor(ends + [0] * (gluon_hopper.MAX_BRANCHES - len(ends)), dtype=torch.int32,
                                             device=device)
        return self._tables[key]

    def _final_phase(self) -> bool:
        """Whether "all" mode's Gluon backward ends with a dilation-1 branch writing the gradients (ACC 3, 4)."""
        dil = [int(b.dilation) for b in self.spec.branches]
        return gluon_hopper.ALL_MODE_FINAL_PHASE and 1 in dil and len(dil) > 1

    def _all_mode_order(self) -> list[tuple[int, bool]]:
        """"all" mode's backward phases: (branch, store), a branch of dilation 1 first (in "all" mode it selects
        every row of every head, so its phase stores into the fp32 buffers, which then need no zeroing; the Gluon
        kernels run only where every segment's selected rows are whole tiles), the others adding."""
        dil = [int(b.dilation) for b in self.spec.branches]
        first = dil.index(1) if 1 in dil else None
        rest = [(i, False) for i in range(len(dil)) if i != first]
        return ([(first, True)] if first is not None else []) + rest

    def _gluon_phased_args(self, kind: str, tiles: TileConfig, q: torch.Tensor, order: list[tuple[int, bool]]):
        """"all" mode's backward launch ([Note: phases] in the kernels): the branches' tile tables one after
        another in ``order``, each in persistent order; the phase boundaries (row offsets, one more than phases);
        and the programs, at most one per SM (the launch is cooperative: all of them resident at once)."""
        B = q.shape[0]
        key = ("phased", kind, tiles.block, tiles.partner, tuple(order), B, q.device)
        if key not in self._tables:
            full = self._table(kind, tiles, q.device).cpu()
            heads = self._tile_heads(kind, full)
            rows = [full[:, 1] == branch for branch, _ in order]
            programs = min(max(int(r.sum()) for r in rows) * B, _sm_count(q.device))
            parts = [persistent_order(full[r], programs, tiles.partner, None if heads is None else heads[r])
                     for r in rows]
            bounds = torch.tensor([0] + [p.shape[0] for p in parts], dtype=torch.int64).cumsum(0).to(torch.int32)
            self._tables[key] = torch.cat(parts).to(q.device), bounds.to(q.device), programs
        return self._tables[key]

    def _backward_launch(self, kind: str, q: torch.Tensor, phased):
        """(table, grid, dilations, phases, phase count, phase counters, ACC, SEL, launch options) of a Gluon
        backward launch (``kind`` "q": dq; "kv": dk/dv, :func:`kv_tile_table`): grouped (``phased`` None) or "all"
        mode's phased one (``phased`` from :meth:`_all_mode_phases`; tables from :meth:`_gluon_phased_args`)."""
        if phased is None:
            table, grid, dilations = self._gluon_launch_args(kind, _GLUON_BWD_TILES, q)
            return table, grid, dilations, table, 1, table, 0, None, {}  # phases, counters: unread placeholders
        order, acc, sel_q, sel_kv = phased
        sel = sel_q if kind == "q" else sel_kv
        table, phases, programs = self._gluon_phased_args(kind, _GLUON_BWD_TILES, q, order)
        counters = torch.zeros(len(order), dtype=torch.int32, device=q.device)
        return (table, (programs, 1), self._gluon_dilations(q.device), phases, len(order), counters, acc, sel,
                {"launch_cooperative_grid": True})

    def _launch_gluon_dq(self, q, k, v, dout, out, dq, lse, delta, dlse, zfill,
                         consumer_regs=gluon_hopper.DQ_CONSUMER_REGS, stages=None, phased=None, dq_final=None,
                         overlap=None) -> int:
        """``phased`` given ("all" mode, :meth:`_all_mode_phases`): one launch over every branch's tiles, a phase
        per branch in its order, into ``dq`` (float32) as its ACC says; ACC 3 and 4 write the results to
        ``dq_final``. ``overlap`` (grouped mode only): a zeroed int32 counter on which the launch lets a dk/dv
        launch overlap its last wave ([Note: overlap]). Returns the arrivals that dk/dv waits for on the counter
        (0 where nothing was launched)."""
        table, grid, dilations, phases, nph, bar, acc, sel, options = self._backward_launch("q", q, phased)
        if acc >= 3:
            options = {**options, "DQF": dq_final, "SEL": sel}
        if overlap is not None:
            if phased is not None:
                raise ValueError("overlap is for grouped mode's launches, not phased ones")
            bar, options = overlap, {**options, "OVERLAP": True}
        if table.shape[0] == 0:
            return 0
        B, N, H, D = q.shape
        self.gluon_kernels.gluon_bwd_dq[grid](
            q, k, v, dout, out, dq, lse, delta, dlse if dlse is not None else lse, table, dilations, table.shape[0],
            B, N, H, phases, nph, bar, self.scale * math.log2(math.e), self.scale, q.stride(0), lse.stride(0),
            lse.stride(1), k.stride(0), HEAD_DIM=D, BLOCK_M=gluon_hopper.BWD_BLOCK, BLOCK_N=gluon_hopper.BWD_STEP,
            STAGES=stages or gluon_hopper.DQ_STAGES[D], ZFILL=zfill,
            HAS_DLSE=dlse is not None, CAUSAL=self.causal, CONSUMER_REGS=consumer_regs, num_warps=4,
            ACC=acc, PHASED=phased is not None, GQA=self.gqa, **options)
        return 2 * grid[0] * grid[1]  # each program's two consumers

    def _launch_gluon_dkdv(self, q, k, v, dout, dk, dv, ld, zfill, consumer_regs=gluon_hopper.DKDV_CONSUMER_REGS,
                           stages=None, phased=None, dk_final=None, dv_final=None, overlap=None):
        """``ld``: lse and delta in one (2, B, H, N) buffer. ``phased``: as for :meth:`_launch_gluon_dq`, into
        ``dk`` and ``dv`` (and ``dk_final``, ``dv_final``); in grouped mode where a kv head's query heads span
        branches (:meth:`_split_groups`), a phase per branch adding into float32 ``dk`` and ``dv`` (ACC 1, SPLIT).
        Tiles of kv heads (:func:`kv_tile_table`). ``overlap`` (grouped mode only): (counter, arrivals) from the dq
        launch just before, which this one overlaps ([Note: overlap])."""
        table, grid, dilations, phases, nph, bar, acc, sel, options = self._backward_launch("kv", q, phased)
        if acc >= 3:
            options = {**options, "DKF": dk_final, "DVF": dv_final, "SEL": sel}
        if phased is not None and self._split_groups():
            options = {**options, "HEAD_END": self._head_ends(q.device), "SPLIT": True}
        if overlap is not None:
            if phased is not None:
                raise ValueError("overlap is for grouped mode's launches, not phased ones")
            bar, arrivals = overlap
            options = {**options, "OVERLAP": True, "DQ_ARRIVALS": arrivals, "launch_pdl": True}
        if table.shape[0] == 0:
            return
        B, N, H, D = q.shape
        return self.gluon_kernels.gluon_bwd_dkdv[grid](
            q, k, v, dout, dk, dv, ld, table, dilations, table.shape[0], B, N, H, phases, nph, bar,
            self.scale * math.log2(math.e), self.scale, q.stride(0), ld.stride(0), ld.stride(1), ld.stride(2),
            k.stride(0), HEAD_DIM=D, BLOCK_N=gluon_hopper.BWD_BLOCK, BLOCK_M=gluon_hopper.BWD_STEP,
            STAGES=stages or gluon_hopper.DKDV_STAGES[D], ZFILL=zfill, CAUSAL=self.causal,
            CONSUMER_REGS=consumer_regs, num_warps=4, ACC=acc, PHASED=phased is not None, GQA=self.gqa, **options)

    def _check_device(self, t: torch.Tensor) -> None:
        if t.device.type == "cuda":
            return
        if t.device.type == "cpu" and interpreting():
            if self.dtype == torch.bfloat16:
                # the interpreter multiplies bfloat16 bit patterns as if they were numbers: tl.dot on bfloat16 is off
                # by orders of magnitude there (triton-lang/triton#11584), so the result would be silently wrong
                raise BackendError(
                    "backend 'triton' under Triton's interpreter (TRITON_INTERPRET=1) cannot run bfloat16: the "
                    "interpreter computes bfloat16 matrix products wrongly. On CPU use float16 or float32 with "
                    "backend 'triton', or backend 'torch' (or 'auto') for bfloat16; bfloat16 runs on CUDA.")
            return
        raise BackendError(
            f"backend 'triton' runs on CUDA tensors; got {t.device.type} tensors. (CPU tensors run only under "
            "Triton's interpreter: TRITON_INTERPRET=1 set before triton is imported, for tests.) "
            "Use backend='torch' or 'auto' on CPU.")

    def _table(self, kind: str, cfg: TileConfig, device: torch.device) -> torch.Tensor:
        """kind "q", "k" (:func:`tile_table`) or "kv" (the Gluon dk/dv kernel's, :func:`kv_tile_table`)."""
        key = (kind, cfg.block, cfg.partner, device)
        t = self._tables.get(key)
        if t is None:
            if kind == "kv":
                t = kv_tile_table(self.plan, cfg.block, cfg.partner, self.gqa).to(device)
            else:
                t = tile_table(self.plan, kind, cfg.block, cfg.partner).to(device)
            self._tables[key] = t
        return t

    def _zfill(self, kind: str, cfg: TileConfig, device: torch.device) -> bool:
        key = (kind, cfg.block, cfg.partner)
        if key not in self._covers:
            self._covers[key] = spans_cover(self.plan, self._table(kind, cfg, device).cpu(),
                                            self.gqa if kind == "kv" else 1)
        return self._covers[key]

    def _tma(self, *tensors: torch.Tensor) -> bool:
        """Tensor descriptors need 16-byte aligned bases and row strides (see [Note: TMA])."""
        if not USE_TMA or not _tma_supported(tensors[0].device):
            return False
        esize = tensors[0].element_size()
        if (self.head_dim * esize) % 16:
            return False
        if not all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 for t in tensors):
            return False
        _ensure_allocator()
        return True

    def _tune_key(self, pass_name: str, batch: int, has_kpm: bool) -> str:
        return "|".join([pass_name, generator_fingerprint()[:8], f"triton{triton.__version__}", self.spec.key,
                         f"D{self.head_dim}",
                         self.specialisation["dtype"], self.specialisation["dot"],
                         f"gqa{self.gqa > 1}", f"kpm{has_kpm}",
                         autotune.shape_bucket(int(self.plan.seq_len), batch * self.heads)])

    def _config(self, pass_name: str, device: torch.device, batch: int, has_kpm: bool, time_one) -> TileConfig:
        key = self._tune_key(pass_name, batch, has_kpm)
        cfg = self._configs.get(key)
        if cfg is None:
            configs = candidates(pass_name, self.head_dim, self.dtype.itemsize, self.dot_precision)
            dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"
            cfg = autotune.choose(dev_name, key, configs, time_one)
            self._configs[key] = cfg
        return cfg

    @staticmethod
    def _bench(fn) -> float:
        from triton.testing import do_bench
        return do_bench(fn, warmup=5, rep=25, return_mode="median")

    def _kpm(self, key_padding_mask, q):
        if key_padding_mask is None:
            key = ("no key padding mask", q.device)  # a placeholder pointer the kernels do not read (HAS_KPM off)
            if key not in self._tables:
                self._tables[key] = torch.zeros(1, dtype=torch.uint8, device=q.device)
            return self._tables[key], False
        return _dense(key_padding_mask).view(torch.uint8), True

    # ---- forward ------------------------------------------------------------------------------------------
    def _launch_fwd(self, cfg, q, k, v, kpm, has_kpm, out, lse, zfill=False):
        table = self._table("q", cfg, q.device)
        T = table.shape[0]
        if T == 0:
            return
        B, N, H, D = q.shape
        if self.merge:
            stride_og, stride_lg = out.stride(0), lse.stride(0)
            ob, lb = out[0], lse[0]
        else:
            stride_og, stride_lg = 0, 0
            ob, lb = out, lse
        return self.kernels.dilated_fwd[(T, B)](
            q, k, v, kpm, out, lse, table, self.scale * math.log2(math.e),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            stride_og, ob.stride(0), ob.stride(1), ob.stride(2), stride_lg, lb.stride(0), lb.stride(1), N,
            HEAD_DIM=D, BLOCK_D=self.block_d, BLOCK_M=cfg.block, BLOCK_N=cfg.partner, GQA=self.gqa,
            CAUSAL=self.causal, HAS_KPM=has_kpm, MERGE=self.merge, TMA=cfg.tma and self._tma(q, k, v, out),
            ZFILL=zfill, **cfg.launch_options())

    def forward(self, q, k, v, key_padding_mask=None):
        self._check_device(q)
        with _on_device(q.device):
            return self._forward(q, k, v, key_padding_mask)

    def _forward(self, q, k, v, key_padding_mask):
        q, k, v = _dense(q), _dense(k), _dense(v)
        B, N, H, D = q.shape
        kpm, has_kpm = self._kpm(key_padding_mask, q)
        G = self.spec.num_branches
        aux = torch.full(aux_shape(self.spec, B, H, N), float("-inf"), dtype=torch.float32, device=q.device)
        if self.merge:
            # per-branch results; the merge reads a branch's rows only where its lse (aux) is finite
            dest, dest_lse = _uninitialized((G, B, N, H, D), q.dtype, q.device), aux
        else:
            dest_lse = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device)

        if self.gluon_unsupported(q, k, v, has_kpm) is None:
            if self.merge:  # each branch's out and lse, then dilated_merge
                self._launch_gluon_fwd(q, k, v, dest, dest_lse, False)
                return self._merge(dest, aux) + (aux,)
            zfill = self._zfill("q", _GLUON_TILES, q.device)
            out = _uninitialized(q.shape, q.dtype, q.device) if zfill else torch.zeros_like(q)
            self._launch_gluon_fwd(q, k, v, out, dest_lse, zfill)
            return out, dest_lse, aux

        def time_one(cfg):
            d = dest if self.merge else torch.zeros_like(q)
            return self._bench(lambda: self._launch_fwd(cfg, q, k, v, kpm, has_kpm, d, dest_lse))

        cfg = self._config("fwd", q.device, B, has_kpm, time_one)
        if not self.merge:
            # the kernel writes every row (gaps included) where the tiles' spans cover them; else a memset
            zfill = self._zfill("q", cfg, q.device)
            out = _uninitialized(q.shape, q.dtype, q.device) if zfill else torch.zeros_like(q)
            self._launch_fwd(cfg, q, k, v, kpm, has_kpm, out, dest_lse, zfill)
            return out, dest_lse, aux
        self._launch_fwd(cfg, q, k, v, kpm, has_kpm, dest, dest_lse)
        return self._merge(dest, aux) + (aux,)

    def _merge(self, dest, aux):
        """"all" mode: out and lse from the branches' (dest (G, B, N, H, D), aux (G, B, H, N))."""
        G, B, N, H, D = dest.shape
        out = torch.empty(dest.shape[1:], dtype=dest.dtype, device=dest.device)
        lse = torch.empty((B, H, N), dtype=torch.float32, device=dest.device)
        R = B * N * H
        self.kernels.dilated_merge[(triton.cdiv(R, _ROWS_PER_PROGRAM),)](
            dest, aux, out, lse, R, N, H, dest.stride(0), aux.stride(0),
            G=G, HEAD_DIM=D, BLOCK_D=self.block_d, BLOCK_R=_ROWS_PER_PROGRAM, num_warps=4)
        return out, lse

    # ---- backward -----------------------------------------------------------------------------------------
    def _launch_dq(self, cfg, q, k, v, kpm, has_kpm, dout, out, dlse, lse, delta, dq, atomic, zfill=False):
        table = self._table("q", cfg, q.device)
        if table.shape[0] == 0:
            return
        B, N, H, D = q.shape
        assert out.stride() == q.stride() == dout.stride()
        has_dlse = dlse is not None
        return self.kernels.dilated_bwd_dq[(table.shape[0], B)](
            q, k, v, kpm, dout, out, dlse if has_dlse else lse, lse, delta, dq, table,
            self.scale * math.log2(math.e), self.scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), lse.stride(0),
            lse.stride(1), N,
            HEAD_DIM=D, BLOCK_D=self.block_d, BLOCK_M=cfg.block, BLOCK_N=cfg.partner, GQA=self.gqa,
            CAUSAL=self.causal, HAS_KPM=has_kpm, ATOMIC=atomic, TMA=cfg.tma and self._tma(q, k, v, dout, out, dq),
            ZFILL=zfill, HAS_DLSE=has_dlse, **cfg.launch_options())

    def _launch_dkdv(self, cfg, q, k, v, kpm, has_kpm, dout, lse, delta, dk, dv, atomic, zfill=False):
        table = self._table("k", cfg, q.device)
        if table.shape[0] == 0:
            return
        B, N, H, D = q.shape
        return self.kernels.dilated_bwd_dkdv[(table.shape[0], B)](
            q, k, v, kpm, dout, lse, delta, dk, dv, table, self.scale * math.log2(math.e), self.scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), lse.stride(0),
            lse.stride(1), N,
            HEAD_DIM=D, BLOCK_D=self.block_d, BLOCK_M=cfg.partner, BLOCK_N=cfg.block, GQA=self.gqa,
            CAUSAL=self.causal, HAS_KPM=has_kpm, ATOMIC=atomic, TMA=cfg.tma and self._tma(q, k, v, dout, dk, dv),
            ZFILL=zfill, **cfg.launch_options())

    def backward(self, dout, dlse, q, k, v, out, lse, aux, key_padding_mask=None):
        self._check_device(q)
        with _on_device(q.device):
            return self._backward(dout, dlse, q, k, v, out, lse, aux, key_padding_mask)

    def _backward(self, dout, dlse, q, k, v, out, lse, aux, key_padding_mask):
        q, k, v, out, lse = _dense(q), _dense(k), _dense(v), _dense(out), _dense(lse)
        dout = _dense(dout.to(q.dtype))
        B, N, H, D = q.shape
        kpm, has_kpm = self._kpm(key_padding_mask, q)
        dlse = _dense(dlse.to(torch.float32)) if dlse is not None else None
        # delta = rowsum(dO * O) - dlse of every selected row: written by the dq kernel, read by the dk/dv kernel
        if ((not self.merge or gluon_hopper.ALL_MODE_BACKWARD)
                and (not self._split_groups() or gluon_hopper.SPLIT_BACKWARD)
                and self.gluon_unsupported(q, k, v, has_kpm, out, dout) is None):
            # lse and delta side by side: the dk/dv kernel copies both per step with one asynchronous copy
            ld = torch.empty((2, B, H, N), dtype=torch.float32, device=q.device)
            ld[0].copy_(lse)
            if self.merge:
                # one launch per pass, a phase per branch, each phase adding into fp32 buffers once the one before
                # has (a row is in one tile of a branch); dq's launch writes the delta that dk/dv's then reads.
                # Where a phase stores first, the buffers need no zeroing; where a dilation-1 branch ends the
                # launch (ACC 3, 4), it writes the gradients in the inputs' dtype (see _all_mode_phases)
                phased = self._all_mode_phases(q.device)
                acc = phased[1]
                alloc = _uninitialized if acc in (2, 3) else torch.zeros
                dq, dk, dv = (alloc(t.shape, dtype=torch.float32, device=q.device) for t in (q, k, v))
                if acc >= 3:
                    dqf, dkf, dvf = (_uninitialized(t.shape, dtype=t.dtype, device=q.device) for t in (q, k, v))
                    self._launch_gluon_dq(q, k, v, dout, out, dq, ld[0], ld[1], dlse, False, phased=phased,
                                          dq_final=dqf)
                    self._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, False, phased=phased, dk_final=dkf,
                                            dv_final=dvf)
                    return dqf, dkf, dvf
                self._launch_gluon_dq(q, k, v, dout, out, dq, ld[0], ld[1], dlse, False, phased=phased)
                self._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, False, phased=phased)
                return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
            # written in full where the tiles' spans cover every row (zero fill), else into zeros
            zfill_q = self._zfill("q", _GLUON_BWD_TILES, q.device)
            dq = (_uninitialized if zfill_q else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
            if self._split_groups():
                self._launch_gluon_dq(q, k, v, dout, out, dq, ld[0], ld[1], dlse, zfill_q)
                # a kv head's query heads in several branches: a phase per branch adds its share into float32
                dk, dv = (torch.zeros(k.shape, dtype=torch.float32, device=q.device) for _ in range(2))
                order = [(i, False) for i in range(self.spec.num_branches)]
                self._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, False, phased=(order, 1, None, None))
                return dq, dk.to(k.dtype), dv.to(v.dtype)
            zfill_kv = self._zfill("kv", _GLUON_BWD_TILES, q.device)
            dk = (_uninitialized if zfill_kv else torch.zeros)(k.shape, dtype=k.dtype, device=q.device)
            dv = (_uninitialized if zfill_kv else torch.zeros)(k.shape, dtype=k.dtype, device=q.device)
            with _scratch_kept() as kept:
                # [Note: overlap] dk/dv starts on the SMs that dq's last wave leaves idle: the two launches follow
                # each other in the stream, with nothing between them
                counter = (torch.zeros(1, dtype=torch.int32, device=q.device)
                           if kept and gluon_hopper.BWD_OVERLAP else None)
                arrivals = self._launch_gluon_dq(q, k, v, dout, out, dq, ld[0], ld[1], dlse, zfill_q,
                                                 overlap=counter)
                self._launch_gluon_dkdv(q, k, v, dout, dk, dv, ld, zfill_kv,
                                        overlap=(counter, arrivals) if counter is not None and arrivals else None)
            return dq, dk, dv
        delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
        atomic_q = self.merge
        atomic_kv = self.merge or self.gqa > 1
        dq_dtype = torch.float32 if atomic_q else q.dtype
        dkv_dtype = torch.float32 if atomic_kv else k.dtype
        common = (q, k, v, kpm, has_kpm, dout)

        def time_dq(cfg):
            s = torch.zeros(q.shape, dtype=dq_dtype, device=q.device)
            return self._bench(lambda: self._launch_dq(cfg, *common, out, dlse, lse, delta, s, atomic_q))

        # atomic outputs accumulate into zeros; the others are written in full where the spans cover every row
        cfg_q = self._config("dq", q.device, B, has_kpm, time_dq)
        zfill_q = not atomic_q and self._zfill("q", cfg_q, q.device)
        dq = (_uninitialized if zfill_q else torch.zeros)(q.shape, dtype=dq_dtype, device=q.device)
        self._launch_dq(cfg_q, *common, out, dlse, lse, delta, dq, atomic_q, zfill_q)

        def time_dkdv(cfg):
            sk = torch.zeros(k.shape, dtype=dkv_dtype, device=q.device)
            sv = torch.zeros_like(sk)
            return self._bench(lambda: self._launch_dkdv(cfg, *common, lse, delta, sk, sv, atomic_kv))

        cfg_kv = self._config("dkdv", q.device, B, has_kpm, time_dkdv)
        zfill_kv = not atomic_kv and self._zfill("k", cfg_kv, q.device)
        alloc_kv = _uninitialized if zfill_kv else torch.zeros
        dk = alloc_kv(k.shape, dtype=dkv_dtype, device=q.device)
        dv = alloc_kv(k.shape, dtype=dkv_dtype, device=q.device)
        self._launch_dkdv(cfg_kv, *common, lse, delta, dk, dv, atomic_kv, zfill_kv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    # ---- for people ---------------------------------------------------------------------------------------
    def source(self) -> str:
        """The plan, the launches and the generated kernels. Needs no GPU and compiles nothing."""
        B = int(self.plan.batch)
        lines = [self.plan.explain(), "",
                 f"# triton lowering: module dc_{self.cache_key}.py in the disk cache (written when the kernels "
                 "first run)",
                 "# launches (default tile configs; autotuning on a GPU may pick others):"]
        cfg_f, cfg_kv, cfg_q = (candidates(p, self.head_dim, self.dtype.itemsize, self.dot_precision)[0]
                                for p in ("fwd", "dkdv", "dq"))
        for name, kind, cfg in (("dilated_fwd", "q", cfg_f), ("dilated_bwd_dq", "q", cfg_q),
                                ("dilated_bwd_dkdv", "k", cfg_kv)):
            T = tile_table(self.plan, kind, cfg.block, cfg.partner).shape[0]
            lines.append(f"#   {name:<18} grid=({T} tiles, B={B})  tiles {cfg}")
        if self.merge:
            lines.append("#   dilated_merge      one program per 64 (row, head) pairs")
        facts = dict(heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=self.dtype)
        gluon = gluon_hopper.spec_reason(self.spec, **facts) is None
        if gluon and not USE_GLUON:
            gluon = False
            lines.append("#   the Hopper (Gluon) kernels are turned off (DILATED_COMPILER_GLUON=0): the tl kernels "
                         "below run on every GPU")
        if gluon:
            if self.merge:
                backward = ("; gluon_bwd_dq and gluon_bwd_dkdv (one launch each, a phase per branch adding into "
                            "float32 buffers; "
                            + ("a dilation-1 branch last, writing the gradients in the inputs' dtype) "
                               if self._final_phase() else "then cast) ")
                            + "run instead of dilated_bwd_dq and dilated_bwd_dkdv"
                            + ("" if gluon_hopper.ALL_MODE_BACKWARD else " (off here)"))
            else:
                backward = ("; gluon_bwd_dq and gluon_bwd_dkdv run instead of dilated_bwd_dq and dilated_bwd_dkdv "
                            "(the backward also needs out and its gradient on 16 bytes)")
                if self._split_groups() and gluon_hopper.SPLIT_BACKWARD:
                    backward += (f"; {whole_groups_reason(self.plan, self.gqa)}, so gluon_bwd_dkdv runs a phase per "
                                 "branch adding into float32 dk and dv, then cast")
                elif self._split_groups():
                    backward = (f"; the backward runs dilated_bwd_dq and dilated_bwd_dkdv "
                                f"({whole_groups_reason(self.plan, self.gqa)}, and gluon_bwd_dkdv's phased form for "
                                "that is off: gluon_hopper.SPLIT_BACKWARD)")
                elif gluon_hopper.BWD_OVERLAP:
                    backward += ("; gluon_bwd_dkdv starts on the SMs that gluon_bwd_dq's last wave leaves idle "
                                 "(programmatic dependent launch, waiting for dq's delta: [Note: overlap])")
            lines.append(f"#   on a Hopper GPU (compute capability 9.0, triton {gluon_hopper.CHECKED_TRITON[0]}x), "
                         f"when N is a multiple of every dilation, every segment's selected rows a multiple of "
                         f"{gluon_hopper.BLOCK_N}, q, k and v start on 16 bytes and no key padding mask is given, "
                         "gluon_fwd (after the tl kernels) runs instead of dilated_fwd" + backward)
        lines.append("")
        text = "\n".join(lines) + "\n" + self._text
        return text + ("\n\n" + self._gluon_text if gluon else "")


@register_lowering("triton")
def lower_triton(plan: Plan, device: torch.device, dtype: torch.dtype) -> TritonLowering:
    return TritonLowering(plan, device, dtype)
