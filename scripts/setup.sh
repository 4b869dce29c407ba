#!/usr/bin/env bash
# Creates .venv with torch (installed first, explicitly) and personaplex.
# Usage: scripts/setup.sh [--test]   (--test adds the test extras and the moshi oracle)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# A plain `torch` requirement would pull a multi-GB CUDA build: pin the CPU wheel unless
# a torch is already there (a GPU machine brings its own).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
if [ "${1:-}" = "--test" ]; then
    $PIP install -q -e ".[test,server]"
    # Upstream moshi is the test oracle. It pins torch<2.10, so it comes without its deps.
    $PIP install -q --no-deps "moshi==0.2.13"
else
    $PIP install -q -e ".[server]"
fi
