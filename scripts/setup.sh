#!/usr/bin/env bash
# Set up a virtual environment in .venv with dilated-compiler and its test dependencies.
#
# torch: if the interpreter already has a torch (e.g. a GPU machine's CUDA build), that one is used: the venv
# is made with --system-site-packages and nothing replaces it. Otherwise torch==2.13.0 is installed, pinned (an
# unpinned `torch` would pull the newest multi-GB CUDA build): on the CI machine pip's configuration finds a local
# CPU wheel of that version; elsewhere install the CPU build first (README, Quick start) and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
PY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1

if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: using the existing torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
    echo "setup: installing torch==2.13.0 (pinned; the CPU build where pip's configuration provides it)"
    "$PY" -m pip install -q "torch==2.13.0"
fi

# The package with test and Triton extras (Triton runs the generated kernels on CPU via TRITON_INTERPRET=1).
"$PY" -m pip install -q -e ".[test,triton]"
"$PY" -c "import torch, dilated_compiler; print(f'setup: dilated-compiler {dilated_compiler.__version__}, torch {torch.__version__}')"
