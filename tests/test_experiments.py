"""Checks of benchmarks/experiments/ scripts that need neither a GPU nor Gluon (those that compile Gluon kernels are
checked in test_gluon_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_copy_engine_zero_probe_memsets_cover_the_zero_rows():
    """copy_engine_zero_probe.py's 2D memsets cover exactly the zero rows of out and dk (torch backend) for default
    and explicit offsets, ragged N and causal specs (``--check-cpu``), so its GPU form writes every zero it must."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "experiments" / "copy_engine_zero_probe.py"),
                          "--check-cpu"], cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert out.count("memsets cover them") == 8, out[-3000:]
