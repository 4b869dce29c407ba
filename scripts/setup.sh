#!/usr/bin/env bash
# Creates .venv with torch (installed first, explicitly) and personaplex.
# Usage: scripts/setup.sh [--test]   (--test adds the test extras, the moshi oracle and, on a
# CPU torch, Triton for its kernel interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=".venv/bin/python -m pip"
STEPS=$([ "${1:-}" = "--test" ] && echo 5 || echo 3)
step() { echo "==> [$1/$STEPS] $2" >&2; }

step 1 "virtual environment .venv"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# A plain `torch` requirement would pull a multi-GB CUDA build: pin the CPU wheel unless
# a torch is already there (a GPU machine brings its own).
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    step 2 "torch ${TORCH_VERSION:-2.13.0} (CPU build, about 200 MB: a minute or two)"
    $PIP install --progress-bar on "torch==${TORCH_VERSION:-2.13.0}"
else
    step 2 "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed: kept"
fi
if [ "${1:-}" = "--test" ]; then
    step 3 "personaplex with the test and server extras"
    $PIP install --progress-bar on -e ".[test,server]"
    # Upstream moshi is the test oracle. It pins torch<2.10, so it must stay out of .venv
    # (pip would report its pins as conflicts on every later install): it goes, without its
    # dependencies, into .oracle/, which only the tests put on sys.path (tests/fixtures/oracle.py).
    step 4 "test oracle moshi 0.2.13 into .oracle/"
    $PIP uninstall -y -q moshi 2>/dev/null || true  # left in .venv by an older setup
    [ -d .oracle/moshi ] || $PIP install -q --no-deps --target .oracle "moshi==0.2.13"
    # Without a GPU, the kernel tests run our Triton kernels in Triton's interpreter
    # (tests/gpu/common.py). A CUDA torch brings its own Triton, pinned: leave that one alone.
    if .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
        step 5 "Triton ${TRITON_VERSION:-3.9.0}, for the kernel tests' interpreter (about 290 MB)"
        $PIP install --progress-bar on "triton==${TRITON_VERSION:-3.9.0}" ||
            echo "    (no Triton wheel for this machine: the kernel tests will be skipped)" >&2
    else
        step 5 "Triton: the CUDA torch's own is kept"
    fi
else
    step 3 "personaplex with the server extras"
    $PIP install --progress-bar on -e ".[server]"
fi
echo "==> done: .venv/bin/personaplex" >&2
