"""The signalcraft demo: a simulated pump room through the real capture path.

Writes a four-microphone recording of a synthetic room (noise only) and plant (a pump
and a fan in that room), replays them through a virtual ALSA capture device that
PortAudio opens like any USB interface, and runs the real commands against it:

    signalcraft calibrate-noise       (machines off: the room alone)
    signalcraft record --repeat 3     (machines on)

Everything goes to ./demo/ (recreated on each run). Run it with scripts/demo.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from signalcraft import vdevice

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
SAMPLE_RATE = 16000  # Hz
MICS = 4
# Each machine's gain at each microphone: the pump sits near mics 1-2, the fan near 3-4.
PUMP_GAIN = np.array([1.0, 0.6, 0.25, 0.15])
FAN_GAIN = np.array([0.15, 0.3, 0.7, 1.0])


def room(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Factory background: brown-ish noise, independent per mic. shape = (MICS, samples)."""
    white = rng.standard_normal((MICS, round(seconds * SAMPLE_RATE)))
    return 0.02 * np.cumsum(white, axis=1) / np.sqrt(np.arange(1, white.shape[1] + 1)) + 0.01 * white


def machines(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A pump (25 Hz shaft, 7-vane pass, 100 Hz hum) and a fan (12 Hz x 9 blades)."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pump = sum(a * np.sin(2 * np.pi * f * t) for f, a in [(25, 0.05), (100, 0.08), (175, 0.06), (350, 0.03)])
    pump = pump + 0.02 * rng.standard_normal(t.size) * (1 + 0.5 * np.sin(2 * np.pi * 175 * t))
    fan = sum(a * np.sin(2 * np.pi * f * t) for f, a in [(108, 0.07), (216, 0.04), (324, 0.02)])
    fan = fan + 0.015 * rng.standard_normal(t.size)
    return PUMP_GAIN[:, None] * pump + FAN_GAIN[:, None] * fan


def signalcraft(*args: str, env: dict) -> None:
    print(f"\n$ signalcraft {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "signalcraft", "--config", str(DEMO / "config.yaml"), *args],
                   env=env, check=True)


def main() -> None:
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    (DEMO / "config.yaml").write_text(
        f"capture:\n  device: {vdevice.DEVICE_NAME}\n  channels: [1, 2, 3, 4]\n"
        "  # The virtual device delivers its whole file at once, not in real time:\n"
        "  # buffer all of it rather than drop what processing has not reached.\n"
        "  queue_seconds: 120\n"
        "noise:\n  dir: noise_samples\noutput:\n  dir: output\n"
    )
    env = {**os.environ, **vdevice.install(DEMO / "device", MICS, SAMPLE_RATE)}
    rng = np.random.default_rng(2026)

    # The virtual device replays its file from the top for every stream, and repeats
    # stale data past the end: each file is a little longer than what is captured.
    vdevice.set_samples(DEMO / "device", vdevice.to_int16(room(12, rng)))
    signalcraft("calibrate-noise", env=env)
    vdevice.set_samples(DEMO / "device", vdevice.to_int16(room(32, rng) + machines(32, rng)))
    signalcraft("record", "--repeat", "3", env=env)

    print(f"\nDemo finished. Noise clips: {DEMO / 'noise_samples'}\nSegments:    {DEMO / 'output'}")


if __name__ == "__main__":
    main()
