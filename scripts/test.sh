#!/usr/bin/env bash
# Set everything up, then run the test suite. CI runs exactly this (.ci/run).
#
# The whole suite runs once on the real clock, then the tests that compare times with
# "now" (retention, leftovers, detect, report, the segment store) run again with the
# clock moved more than a year ahead (faketime), so a test that depends on today's date
# fails here rather than on some later day.
#
# Extra arguments go to pytest and run only that selection, once, e.g.
#   bash scripts/test.sh -k capture
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" --test
cd "$root"
python="$root/.venv/bin/python"
if [ "$#" -gt 0 ]; then
    exec "$python" -m pytest "$@"
fi
"$python" -m pytest
echo "test: again with the clock moved 400 days ahead (faketime)" >&2
exec faketime -f '+400d' "$python" -m pytest -q tests/test_housekeeping.py tests/test_segments.py \
    tests/test_detect.py tests/test_store.py
