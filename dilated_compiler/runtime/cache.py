"""The compiled-plan cache: (spec key, backend, shapes, dtype, device) -> lowered plan. Thread-safe bounded LRU."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import NamedTuple

import torch

from ..lowering import get_lowering
from ..lowering.base import float32_products
from ..planner import build_plan
from ..spec import AttentionSpec

__all__ = ["CacheInfo", "cache_info", "clear_cache", "set_cache_size", "lowered", "register_spec", "spec_for"]


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


_SPECS: dict[str, AttentionSpec] = {}  # spec key -> spec; tiny, never evicted
_lock = threading.Lock()
_cache: "OrderedDict[tuple, object]" = OrderedDict()
_stats = {"hits": 0, "misses": 0}


def _checked_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} (the number of compiled plans kept) must be an integer >= 1; got {value!r}")
    return value


def _size_from_env(variable: str = "DILATED_COMPILER_CACHE_SIZE") -> int:
    text = os.environ.get(variable, "128")
    try:
        return _checked_size(int(text), variable)
    except ValueError:
        raise ValueError(f"{variable} (the number of compiled plans kept) must be an integer >= 1; got {text!r}"
                         ) from None


_maxsize: "int | None" = None  # read from the environment at first use, so a bad value fails a call, not the import


def _limit() -> int:
    """The cache's size; call with _lock held."""
    global _maxsize
    if _maxsize is None:
        _maxsize = _size_from_env()
    return _maxsize


def register_spec(spec: AttentionSpec) -> str:
    key = spec.key
    with _lock:
        _SPECS.setdefault(key, spec)
    return key


def spec_for(key: str) -> AttentionSpec:
    try:
        return _SPECS[key]
    except KeyError:
        raise KeyError(f"no spec registered under key {key!r}; build the module with compile_attention") from None


def lowered(spec_key: str, backend: str, q_shape: tuple, kv_heads: int, dtype: torch.dtype,
            device: torch.device):
    """The lowered plan for these inputs, compiled on first use and cached."""
    # float32 products' precision follows torch's setting (lowering.base.float32_products) when the plan is compiled
    key = (spec_key, backend, tuple(q_shape), kv_heads, dtype, device,
           float32_products() if dtype == torch.float32 else None)
    with _lock:
        _limit()  # a bad DILATED_COMPILER_CACHE_SIZE is reported before any work
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return hit
    B, N, H, D = q_shape
    plan = build_plan(spec_for(spec_key), N, H, D, batch=B, kv_heads=kv_heads,
                      dtype_bytes=torch.empty((), dtype=dtype).element_size())
    result = get_lowering(backend)(plan, device, dtype)
    # filed under the precision the lowering compiled with (it reads the setting itself): if another thread changed
    # the setting since the lookup above, the plan still goes under the key it matches
    used = getattr(result, "dot_precision", None)
    if used is not None:
        key = key[:-1] + (used,)
    with _lock:
        _stats["misses"] += 1
        _cache[key] = result
        _cache.move_to_end(key)
        while len(_cache) > _limit():
            _cache.popitem(last=False)
    return result


def cache_info() -> CacheInfo:
    with _lock:
        return CacheInfo(_stats["hits"], _stats["misses"], _limit(), len(_cache))


def clear_cache() -> None:
    with _lock:
        _cache.clear()
        _stats["hits"] = _stats["misses"] = 0


def set_cache_size(maxsize: int) -> None:
    global _maxsize
    maxsize = _checked_size(maxsize, "cache size")
    with _lock:
        _maxsize = maxsize
        while len(_cache) > _maxsize:
            _cache.popitem(last=False)
