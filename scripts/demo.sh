#!/usr/bin/env bash
# Set everything up, then run the demo (scripts/demo.py): calibrate-noise, record and
# detect through the real capture path, from a simulated pump room to an alert.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/python" "$root/scripts/demo.py"
