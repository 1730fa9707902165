#!/usr/bin/env bash
# Soak test (scripts/soak.py): `signalcraft record` for 10 minutes of real-time paced
# input from a JACK dummy server, `signalcraft detect` every minute; reports lost
# frames, segments exported and scored, and the RSS of `record` to docs/benchmarks.md.
# Sets up first (JACK included). Arguments go to scripts/soak.py, e.g.
#   bash scripts/soak.sh                 # the 10-minute soak, written to the report
#   bash scripts/soak.sh --minutes 2     # a trial: printed only
#   bash scripts/soak.sh --help
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" --bench
exec "$root/.venv/bin/python" "$root/scripts/soak.py" "$@"
