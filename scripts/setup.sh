#!/usr/bin/env bash
# Set up signalcraft in ./.venv: system audio library, CPU torch, the package and its
# test tools. Safe to run again: a second run only checks and returns in seconds.
#
#   bash scripts/setup.sh            # used by scripts/demo.sh
#   bash scripts/setup.sh --test     # also faketime, Chromium and Mosquitto, for the test suite (scripts/test.sh)
#   bash scripts/setup.sh --bench    # also JACK and Mosquitto, for the paced and publishing benchmarks
#   PYTHON=python3.12 bash scripts/setup.sh
set -euo pipefail

bench=0
testing=0
case "${1:-}" in
    "") ;;
    --test) testing=1 ;;
    --bench) bench=1 ;;
    *) echo "usage: $0 [--test | --bench]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
torch_pin="torch==2.13.0"

say() { printf 'setup: %s\n' "$*" >&2; }

# Install a Debian package unless `present` (a shell test) already holds.
apt_install() {
    local package="$1" present="$2"
    eval "$present" && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        say "installing $package (Debian package)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "$package" >/dev/null
    else
        say "$package is missing and this user cannot install it."
        say "Ask an administrator to run: sudo apt-get install -y $package"
        exit 1
    fi
}

# 1. PortAudio, which sounddevice loads at import time; faketime for the tests that run
#    with the clock moved ahead, Chromium for the report's page and Mosquitto for the
#    publisher's broker; JACK for the paced benchmarks.
apt_install libportaudio2 "ldconfig -p 2>/dev/null | grep -q 'libportaudio\.so\.2'"
if [ "$testing" = 1 ]; then
    apt_install faketime "command -v faketime >/dev/null"
    apt_install chromium "command -v chromium >/dev/null"  # the report page's rendering test
    apt_install mosquitto "command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto"  # the MQTT tests' broker
fi
if [ "$bench" = 1 ]; then
    apt_install jackd2 "command -v jackd >/dev/null"
    apt_install mosquitto "command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto"  # scripts/bench_publish.py
fi
extras="test"
[ "$bench" = 1 ] && extras="test,bench"

# 2. The virtual environment, rebuilt only when what it is built from changes.
stamp="$venv/.signalcraft-setup"
want="$( (cat "$root/pyproject.toml" "$root/scripts/constraints.txt" "$0"; echo "$extras") | sha256sum | cut -c1-16)"
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    say "environment up to date ($venv)"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi
pip_install() {
    # Some pip configurations warn once per package about unused index folders; hide those.
    "$venv/bin/python" -m pip --disable-pip-version-check -q install "$@" 2>&1 \
        | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}
# torch first, alone: a bare torch requirement resolved later would pull the CUDA build.
say "installing $torch_pin"
pip_install "$torch_pin"
say "installing signalcraft and its dependencies"
pip_install -c "$root/scripts/constraints.txt" -e "$root[$extras]"
"$venv/bin/python" -c "import signalcraft.audio_backend as b; b.torchaudio; import sounddevice" \
    || { say "the installed environment does not import; see the error above"; exit 1; }
echo "$want" > "$stamp"
say "done: $venv"
