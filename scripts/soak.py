"""Soak: many random specs and shapes against the float64 reference, for longer than the test suite can afford.

The test suite runs a fixed, small number of hypothesis examples per test (derandomized on the GPU). This script
draws from the same strategies (tests/conftest.py), a fresh seed for each round of 10 examples, until a time
budget is spent, and checks out, lse and the gradients of q, k and v of each example as the tests do; outputs the
Triton lowering fills by itself start as NaN. The first failing example is printed by hypothesis (shrunk first,
unless --no-shrink); the exit status is then 1.

    python scripts/soak.py --backend torch --seconds 60                       # any machine
    TRITON_INTERPRET=1 python scripts/soak.py --backend triton --seconds 600  # the kernels, interpreted on CPU
    python scripts/soak.py --backend triton --device cuda --dtype bfloat16 --seconds 300 --verbose --no-shrink
    python scripts/soak.py --backend triton --device cuda --cases gluon --seconds 300   # Hopper kernels
    python scripts/soak.py --backend torch --dtype bfloat16 --gpu-bounds --seconds 600  # GPU-sized, on CPU

``--cases gluon`` draws specs of whole 128-row tiles (grouped and "all"), which the Hopper (Gluon) kernels take,
and fails an example where other Gluon kernels ran than expected (all three; the forward alone under grouped-query
attention, whose backward runs the tl kernels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import (attention_cases, gluon_cases, gluon_kernels_for, poison_uninitialized,  # noqa: E402
                      record_gluon_calls, run_case)

# the strategies' bounds per place: the CPU paths on tiny shapes (the interpreter runs milliseconds per tile)
_GPU = dict(max_dilation=9, max_kv_heads=4, max_seq=2000, head_dims=(16, 64, 96, 128), max_segment=1024)
CASES = {
    ("torch", "cpu"): dict(max_dilation=9, max_kv_heads=4, max_seq=130, head_dims=(1, 3, 8, 16, 24), max_segment=64),
    ("triton", "cpu"): dict(max_dilation=5, max_kv_heads=2, max_seq=48, head_dims=(3, 8, 16)),
    ("torch", "cuda"): _GPU,
    ("triton", "cuda"): _GPU,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["torch", "triton"], required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float64", "float32", "float16", "bfloat16"], default=None,
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--cases", choices=["any", "gluon"], default="any")
    ap.add_argument("--gpu-bounds", action="store_true",
                    help="draw at the GPU's bounds (longer sequences and segments, head_dim up to 128) on any "
                         "device: e.g. the torch lowering in bfloat16 on CPU, to see the tolerances on GPU-sized cases")
    ap.add_argument("--seconds", type=float, default=60.0, help="stop drawing new examples after this long")
    ap.add_argument("--no-shrink", action="store_true",
                    help="report the first failing example as drawn (shrinking recompiles kernels per example)")
    ap.add_argument("--verbose", action="store_true", help="print each example before running it")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    if args.cases == "gluon" and (args.backend, args.device) != ("triton", "cuda"):
        ap.error("--cases gluon needs --backend triton --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here")

    calls = {}
    if args.backend == "triton":
        monkeypatch = pytest.MonkeyPatch()
        lowering_module = poison_uninitialized(monkeypatch)
        if args.cases == "gluon":
            calls = record_gluon_calls(lowering_module, monkeypatch)

    strategy = (gluon_cases(modes=("grouped", "all")) if args.cases == "gluon"
                else attention_cases(**(_GPU if args.gpu_bounds else CASES[(args.backend, args.device)])))
    ran = []

    phases = [Phase.explicit, Phase.generate] if args.no_shrink else list(Phase)

    @given(case=strategy)
    @settings(max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck), phases=phases)
    def soak(case):
        before = {name: len(c) for name, c in calls.items()}
        if args.verbose:
            print(f"{time.monotonic() - start:.0f} s: {case}", flush=True)
        run_case(case, args.backend, dtype=dtype, device=args.device)
        if calls:
            launched = tuple(name for name, c in calls.items() if len(c) > before[name])
            assert launched == gluon_kernels_for(case), (f"the Gluon kernels that ran, {launched}, are not those "
                                                         f"expected, {gluon_kernels_for(case)}, for {case}")
        ran.append(case["spec"].head_assignment)

    # rounds of 10 examples, each round from a fresh random seed, until the time is spent
    start = last = time.monotonic()
    while time.monotonic() - start < args.seconds:
        n = len(ran)
        try:
            soak()
        except Exception:
            print(f"FAILED after {n} passing examples", flush=True)
            raise
        if time.monotonic() - last > 30:
            last = time.monotonic()
            print(f"{len(ran)} passed so far ({last - start:.0f} s)", flush=True)
    print(f"{len(ran)} examples passed ({ran.count('grouped')} grouped, {ran.count('all')} all) in "
          f"{time.monotonic() - start:.0f} s: backend {args.backend}, device {args.device}, {dtype}, cases "
          f"{args.cases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
