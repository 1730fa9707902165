#!/usr/bin/env bash
# Set everything up, then run the demo (scripts/demo.py): calibrate-noise and
# record --repeat 3 through the real capture path from a simulated pump room.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/python" "$root/scripts/demo.py"
