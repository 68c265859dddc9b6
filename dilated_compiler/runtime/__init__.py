"""runtime: compile_attention, the compiled-plan cache and the registered custom op."""

from .cache import CacheInfo, cache_info, clear_cache, set_cache_size
from .module import BACKENDS, CompiledAttention, compile_attention, resolve_backend

__all__ = ["BACKENDS", "CacheInfo", "CompiledAttention", "cache_info", "clear_cache", "compile_attention",
           "resolve_backend", "set_cache_size"]
