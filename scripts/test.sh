#!/usr/bin/env bash
# Set everything up, then run the test suite. CI runs exactly this (.ci/run).
# Extra arguments go to pytest, e.g. scripts/test.sh -k capture
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
