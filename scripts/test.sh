#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Ray Serve for tests/server/test_cluster.py (`serve --replicas`).
.venv/bin/python -m pip install -q -e ".[cluster]"
if [ -f scripts/system-deps.sh ]; then bash scripts/system-deps.sh; fi
# LiveKit's PersonaPlex plugin (tests/server/test_livekit.py) gets its own venv: it brings
# livekit-agents and its pins, which must stay out of the project's environment.
if [ ! -x .venv-livekit/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv-livekit
    .venv-livekit/bin/python -m pip install -q --no-cache-dir "livekit-plugins-nvidia[personaplex]==1.8.9"
fi
exec .venv/bin/python -m pytest "$@"
