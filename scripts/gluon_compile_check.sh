#!/usr/bin/env bash
# Compile the Gluon kernels for sm_90a (no GPU needed) with the Triton release they are checked on
# (gluon_hopper.CHECKED_TRITON), in a second environment, .venv-gluon: triton 3.6 with the CPU build of torch.
# Runs tests/test_gluon_compile.py there (which the main environment, with a newer triton, skips).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-gluon/bin/python ]; then
    "$PYTHON" -m venv .venv-gluon
fi
PY=.venv-gluon/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q "torch==2.13.0" "triton==3.6.0"
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import torch, triton; print(f'gluon check: torch {torch.__version__}, triton {triton.__version__}')"
"$PY" -m pytest -q tests/test_gluon_compile.py
