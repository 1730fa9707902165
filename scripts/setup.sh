#!/usr/bin/env bash
# Set up signalcraft in ./.venv: system audio library, CPU torch, the package and its
# test tools. Safe to run again: a second run only checks and returns in seconds.
#
#   bash scripts/setup.sh            # used by scripts/demo.sh and scripts/test.sh
#   PYTHON=python3.12 bash scripts/setup.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
torch_pin="torch==2.13.0"

say() { printf 'setup: %s\n' "$*" >&2; }

# 1. PortAudio, which sounddevice loads at import time.
if ! ldconfig -p 2>/dev/null | grep -q 'libportaudio\.so\.2'; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        say "installing libportaudio2 (Debian package)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends libportaudio2 >/dev/null
    else
        say "PortAudio (libportaudio.so.2) is missing and this user cannot install it."
        say "Ask an administrator to run: sudo apt-get install -y libportaudio2"
        exit 1
    fi
fi

# 2. The virtual environment, rebuilt only when what it is built from changes.
stamp="$venv/.signalcraft-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/constraints.txt" "$0" | sha256sum | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    say "environment up to date ($venv)"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch first, alone: a bare torch requirement resolved later would pull the CUDA build.
say "installing $torch_pin"
"${pip[@]}" install "$torch_pin"
say "installing signalcraft and its dependencies"
"${pip[@]}" install -c "$root/scripts/constraints.txt" -e "$root[test]"
"$venv/bin/python" -c "import signalcraft.audio_backend as b; b.torchaudio; import sounddevice" \
    || { say "the installed environment does not import; see the error above"; exit 1; }
echo "$want" > "$stamp"
say "done: $venv"
