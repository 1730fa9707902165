#!/usr/bin/env bash
# Rebuild the bundled separators on the CPU (about an hour on 2 cores):
#
#   models/separator/plant-<sha8>.th        per microphone (mono): pump, fan, motor, valve;
#                                           trained on isolated machines at one microphone
#   models/separator/plant_array-<sha8>.th  the demo's room: pump, fan and motor where they
#                                           stand, 4 microphones in (train_separator.array)
#
# Each simulates its training set (data/separator-training[-array], ignored by git), then
# trains with the recipe in scripts/plant[_array]_separator.yaml: a fixed number of steps,
# so a rebuild gives the same model unless the time budget there (a guard for a slower
# machine) stops it first.
#
#   bash scripts/build_demo_separator.sh [mono|array]   (default: both)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
sc="$root/.venv/bin/signalcraft"
which="${1:-both}"
case "$which" in mono|array|both) ;; *) echo "usage: $0 [mono|array]" >&2; exit 2 ;; esac
if [[ "$which" != array ]]; then
  data="$root/data/separator-training"
  rm -rf "$data"
  "$sc" simulate --training-set --out "$data" --clips 24 --seed 0
  "$sc" --config "$root/scripts/plant_separator.yaml" train-separator "$data"
fi
if [[ "$which" != mono ]]; then
  data="$root/data/separator-training-array"
  rm -rf "$data"
  # The demo's room (scripts/demo.py): each machine alone, recorded where it stands.
  "$sc" simulate --training-set --machines pump,fan,motor --mics 4 --out "$data" --clips 24 --seed 0
  "$sc" --config "$root/scripts/plant_array_separator.yaml" train-separator "$data"
fi
