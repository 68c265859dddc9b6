"""Tile configurations and a small autotuner whose choices are cached per device and shape bucket.

Tile sizes change the tile tables, so this is not ``triton.autotune``: each candidate gets its own tables and
is timed on the real inputs the first time a (device, pass, shape bucket) is seen; the winner is kept in memory
and in ``autotune-<device>.json`` in the disk cache folder. Under the interpreter (or with
``DILATED_COMPILER_AUTOTUNE=0``) the first candidate is used, untimed.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Callable, NamedTuple

from triton.runtime.errors import OutOfResources

from .diskcache import cache_dir, read_verified, with_checksum, write_atomic

__all__ = ["TileConfig", "candidates", "choose"]


class TileConfig(NamedTuple):
    block: int          # rows of the program's own tile (query tile for fwd/dq, key tile for dkdv)
    partner: int        # rows of the tiles its inner loop walks
    num_warps: int
    num_stages: int
    tma: bool = True    # tiles through tensor descriptors where the GPU and the tensors allow, else pointer loads
    maxnreg: int = 0    # register cap per thread (0: the compiler's choice); a cap can let two programs share an SM

    def __str__(self) -> str:
        text = f"{self.block}x{self.partner}/w{self.num_warps}/s{self.num_stages}/{'tma' if self.tma else 'ptr'}"
        return text + (f"/r{self.maxnreg}" if self.maxnreg else "")

    def launch_options(self) -> dict:
        """Triton launch options of this config."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            opts["maxnreg"] = self.maxnreg
        return opts


INTERPRETER_CONFIG = TileConfig(16, 16, 1, 1)


def _c(block, partner, warps, stages, path="tma", maxnreg=0):
    return TileConfig(block, partner, warps, stages, path == "tma", maxnreg)


# (pass, head_dim bucket) -> candidates, best first guess first. Kept small on purpose: each is compiled and
# timed once per (device, pass, shape bucket). The D=128 lists come from benchmarks/tune_triton.py on an H100
# (results in benchmarks/results/H100-triton.md).
_CANDIDATES = {
    ("fwd", 64): [_c(128, 64, 4, 3), _c(128, 128, 8, 3), _c(128, 64, 4, 3, "ptr")],
    ("fwd", 128): [_c(128, 128, 8, 3), _c(128, 64, 8, 3, "ptr"), _c(64, 64, 4, 3)],
    ("fwd", 256): [_c(64, 64, 4, 2, "ptr"), _c(64, 64, 4, 2), _c(64, 32, 4, 2, "ptr"), _c(32, 32, 4, 2, "ptr")],
    ("dkdv", 64): [_c(64, 32, 4, 3), _c(128, 64, 8, 3), _c(64, 64, 4, 3)],
    ("dkdv", 128): [_c(64, 32, 4, 3), _c(64, 32, 4, 4), _c(128, 32, 8, 3)],
    ("dkdv", 256): [_c(64, 32, 4, 2, "ptr"), _c(64, 32, 4, 2), _c(32, 32, 4, 2, "ptr")],
    ("dq", 64): [_c(128, 64, 8, 3, "ptr"), _c(128, 64, 8, 3), _c(128, 32, 4, 4, "ptr")],
    ("dq", 128): [_c(128, 64, 8, 3, "ptr"), _c(128, 64, 8, 3), _c(128, 128, 8, 2, "ptr")],
    ("dq", 256): [_c(64, 32, 4, 2, "ptr"), _c(64, 32, 4, 2), _c(32, 32, 4, 2, "ptr")],
}

# float32 inputs: exact products (input_precision="ieee") run on the FMA units with their operands in registers,
# so the tiles are small and spread over 8 warps. Float32 had taken the 16-bit lists of twice its head_dim, which
# spilled thousands of instructions (at D = 256 ptxas took 1 to 3 minutes a kernel); these compile in 2 to 7 s
# with few spills or none (pointer loads; tensor descriptors, tried second at D = 256, spill more). On an H100
# (benchmarks/tune_triton.py --float32, N = 8K, stop 37) the first of each list against the old first config:
# D = 64 fwd 3.06 / 26.6 ms, dk/dv 10.2 / 48.4, dq 4.95 / 4.70; D = 128 fwd 9.7 / 74.4, dk/dv 19.1 / 122.6,
# dq 18.2 / 101.2 (benchmarks/results/H100-triton.md).
_CANDIDATES_FP32 = {
    ("fwd", 64): [_c(64, 32, 8, 2, "ptr"), _c(64, 16, 8, 2, "ptr")],
    ("fwd", 128): [_c(32, 16, 8, 2, "ptr"), _c(64, 16, 8, 2, "ptr")],
    ("fwd", 256): [_c(32, 16, 8, 2, "ptr"), _c(32, 16, 8, 2)],
    ("dkdv", 64): [_c(64, 16, 8, 2, "ptr"), _c(32, 32, 8, 2, "ptr")],
    ("dkdv", 128): [_c(32, 16, 8, 2, "ptr"), _c(64, 16, 8, 2, "ptr")],
    ("dkdv", 256): [_c(32, 16, 8, 2, "ptr"), _c(32, 16, 8, 2)],
    ("dq", 64): [_c(64, 32, 8, 2, "ptr"), _c(64, 16, 8, 2, "ptr")],
    ("dq", 128): [_c(32, 16, 8, 2, "ptr"), _c(64, 16, 8, 2, "ptr")],
    ("dq", 256): [_c(32, 16, 8, 2, "ptr"), _c(32, 16, 8, 2)],
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# float32 inputs whose products run on the TF32 tensor cores (input_precision="tf32", where torch's setting for
# float32 matmuls allows it: base.float32_products). On an H100 (tune_triton.py --float32 --dot tf32, N = 8K,
# stop 38) the first configs ran at 90-133 useful TFLOP/s (D = 64: fwd 0.302 ms, dk/dv 0.640, dq 0.352; D = 128:
# 0.691, 1.477, 0.863), against 5-10 for exact products. D = 256 (stop 39, same script): fwd 64x32/w4 2.16 ms,
# dk/dv 64x16/w8 6.93, dq 64x16/w4 3.27 (35-58 TFLOP/s), against 18.9, 38.7 and 37.1 for exact products.
_CANDIDATES_TF32 = {
    ("fwd", 64): [_c(128, 64, 8, 3), _c(128, 128, 8, 2)],
    ("fwd", 128): [_c(128, 64, 8, 2), _c(128, 32, 8, 2)],
    ("fwd", 256): [_c(64, 32, 4, 2), _c(64, 16, 4, 2)],
    ("dkdv", 64): [_c(128, 32, 8, 2), _c(64, 32, 4, 3)],
    ("dkdv", 128): [_c(128, 32, 8, 2), _c(64, 16, 4, 2)],
    ("dkdv", 256): [_c(64, 16, 8, 2), _c(32, 16, 8, 2, "ptr")],
    ("dq", 64): [_c(128, 64, 8, 2), _c(128, 32, 8, 3)],
    ("dq", 128): [_c(128, 32, 8, 2), _c(64, 64, 4, 2)],
    ("dq", 256): [_c(64, 16, 4, 2), _c(64, 16, 8, 2)],
}


def candidates(pass_name: str, head_dim: int, element_size: int = 2, dot: str | None = None) -> list[TileConfig]:
    """The tile configs to try for a pass, by head_dim bucket (64, 128, 256): the 16-bit lists, or for 4-byte
    (float32) elements lists of their own, by the products' precision ``dot`` (``"ieee"``, the default for
    float32, or ``"tf32"``)."""
    if interpreting():
        return [INTERPRETER_CONFIG]
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    if element_size != 4:
        table = _CANDIDATES
    else:
        table = _CANDIDATES_TF32 if dot == "tf32" else _CANDIDATES_FP32
    return list(table[(pass_name, bucket)])


def shape_bucket(seq_len: int, heads_times_batch: int) -> str:
    return f"N{1 << max(0, (seq_len - 1).bit_length())}_BH{1 << max(0, (heads_times_batch - 1).bit_length())}"


_lock = threading.Lock()
_memory: dict[str, dict[str, list[int]]] = {}


def _file(device_name: str):
    return cache_dir() / f"autotune-{re.sub(r'[^A-Za-z0-9_.-]+', '_', device_name)}.json"


def _read(device_name: str) -> dict[str, list[int]]:
    """The device's file as written last (any process), or {} where it is missing or fails its checksum."""
    body = read_verified(_file(device_name))
    try:
        data = json.loads(body) if body is not None else {}
    except ValueError:
        data = {}
    return data if isinstance(data, dict) else {}


def _load(device_name: str) -> dict[str, list[int]]:
    if device_name not in _memory:
        _memory[device_name] = _read(device_name)
    return _memory[device_name]


def choose(device_name: str, key: str, configs: list[TileConfig], time_one: Callable[[TileConfig], float]
           ) -> TileConfig:
    """The cached choice for ``key``, or the fastest of ``configs`` by ``time_one``, which returns ms, or raises
    triton's ``OutOfResources`` for a config that does not fit the device (that config is skipped). Any other
    error propagates: a candidate that fails for another reason is a defect, not a slower choice."""
    if len(configs) == 1 or os.environ.get("DILATED_COMPILER_AUTOTUNE", "1") == "0":
        return configs[0]
    with _lock:
        known = _load(device_name).get(key)
    if known is not None and TileConfig(*known) in configs:
        return TileConfig(*known)
    best, best_ms, skipped = None, float("inf"), []
    for cfg in configs:
        try:
            ms = time_one(cfg)
        except OutOfResources as e:  # more shared memory or registers than this device has
            skipped.append(f"{cfg}: {e}")
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no tile configuration fits {device_name} for {key}: " + "; ".join(skipped))
    with _lock:
        # what other processes wrote since this one read the file, then this choice (a process that writes
        # between this read and this write still loses its entry, and then only costs re-tuning)
        data = {**_read(device_name), **_load(device_name), key: list(best)}
        _memory[device_name] = data
        try:
            write_atomic(_file(device_name), with_checksum(json.dumps(data, indent=1, sort_keys=True)))
        except OSError:
            pass  # a read-only cache folder only costs re-tuning in the next process
    return best
