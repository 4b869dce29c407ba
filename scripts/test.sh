#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# Ray Serve for tests/server/test_cluster.py (`serve --replicas`).
.venv/bin/python -m pip install -q -e ".[cluster]"
if [ -f scripts/system-deps.sh ]; then bash scripts/system-deps.sh; fi
exec .venv/bin/python -m pytest "$@"
