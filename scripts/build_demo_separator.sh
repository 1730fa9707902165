#!/usr/bin/env bash
# Rebuild models/separator/plant-<sha8>.th, the separator the demo uses: simulate a
# training set of isolated pumps, fans, motors and valves (plus factory background),
# then train a small Demucs model on it on the CPU (about 20 minutes on 2 cores).
#
#   bash scripts/build_demo_separator.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
sc="$root/.venv/bin/signalcraft"
data="$root/data/separator-training"
rm -rf "$data"
"$sc" simulate --training-set --out "$data" --clips 24 --seed 0
"$sc" --config "$root/scripts/plant_separator.yaml" train-separator "$data"
