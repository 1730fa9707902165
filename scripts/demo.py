"""The signalcraft demo: a simulated pump room through the real capture path.

`signalcraft simulate` renders a four-microphone plant room: a pump, a fan and a motor
in factory background, the pump developing a bearing fault in the last segment. The
recordings are replayed through a virtual ALSA capture device that PortAudio opens
like any USB interface, and the real commands run against it:

    signalcraft calibrate-noise       (machines off: the room alone)
    signalcraft record --repeat 3     (machines on: denoise, separate, log-mel, export)

The separator is models/separator/plant-*.th, built by scripts/build_demo_separator.sh.
Everything else goes to ./demo/ (recreated on each run). Run it with scripts/demo.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from signalcraft import simulate, vdevice

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo"
SAMPLE_RATE = 16000  # Hz
MICS = 4
SEED = 7
MACHINES = ("pump", "fan", "motor")
FAULT = ("pump", simulate.Fault("bearing", start_s=20.0))  # the third 10 s segment


def room_and_plant(seconds: float) -> tuple:
    """int16 (MICS, samples) recordings of the room alone and of the running plant.

    Both scenes keep the background at its fixed level (snr None) with the same seed, so
    the room in the noise recording is the room under the machines."""
    common = dict(n_mics=MICS, seconds=seconds, sample_rate=SAMPLE_RATE, seed=SEED, snr_db=None)
    room = simulate.render(simulate.default_scene(machines=(), **common)).mixture
    plant = simulate.render(simulate.default_scene(machines=MACHINES, faults=[FAULT], **common)).mixture
    return vdevice.to_int16(room), vdevice.to_int16(plant)


def signalcraft(*args: str, env: dict) -> None:
    print(f"\n$ signalcraft {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "signalcraft", "--config", str(DEMO / "config.yaml"), *args],
                   env=env, check=True)


def main() -> None:
    models = ROOT / "models" / "separator"
    if not list(models.glob("plant-*.th")):
        sys.exit(f"no separator in {models}: run scripts/build_demo_separator.sh to build it")
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    (DEMO / "config.yaml").write_text(
        f"capture:\n  device: {vdevice.DEVICE_NAME}\n  channels: [1, 2, 3, 4]\n"
        "  # The virtual device delivers its whole file at once, not in real time:\n"
        "  # buffer all of it rather than drop what processing has not reached.\n"
        "  queue_seconds: 120\n"
        f"noise:\n  dir: noise_samples\nseparation:\n  repo: {models}\n  model: plant\n"
        "output:\n  dir: output\n"
    )
    env = {**os.environ, **vdevice.install(DEMO / "device", MICS, SAMPLE_RATE)}
    # The virtual device replays its file from the top for every stream, and repeats
    # stale data past the end: each recording is a little longer than what is captured.
    room, plant = room_and_plant(seconds=32.0)
    vdevice.set_samples(DEMO / "device", room)
    signalcraft("calibrate-noise", env=env)
    vdevice.set_samples(DEMO / "device", plant)
    signalcraft("record", "--repeat", "3", env=env)

    print(f"\nDemo finished. Noise clips: {DEMO / 'noise_samples'}\nSegments:    {DEMO / 'output'}\n"
          "Each segment holds mic_<N>/<source>.pt (1x240x240 log-mel) and manifest.json; the pump "
          "has a bearing fault in the last one.")


if __name__ == "__main__":
    main()
