"""The signalcraft demo: a simulated pump room through the real capture path, to an alert.

`signalcraft simulate` renders a four-microphone plant room: a pump, a fan and a motor
in factory background. The recordings are replayed through a virtual ALSA capture
device that PortAudio opens like any USB interface, and the real commands run against
it, as cron would run them:

    signalcraft calibrate-noise          (machines off: the room alone)
    signalcraft record --repeat 18       (machines on: denoise, separate, log-mel,
                                          export; after 14 segments the pump
                                          develops a bearing fault)
    signalcraft detect output            (the first 12 segments calibrate the detector,
                                          the next two are NORMAL, then the pump goes
                                          WARNING and CRITICAL: exit 4)
    signalcraft report output            (the HTML page: demo/output/report/index.html)

The virtual device delivers its whole recording at once, not in real time, so the
demo's config sizes the capture and processing queues to hold all of it
(capture.queue_seconds, pipeline.queue_segments): nothing is dropped, nothing warns.
One recording and one `record` run keep the segments' clock times contiguous.

The separator is models/separator/plant_array-*.th, an array model trained on this room
(each machine recorded alone where it stands) by scripts/build_demo_separator.sh.
Everything else goes to ./demo/ (recreated on each run). Run it with scripts/demo.sh.
"""

from __future__ import annotations

import json
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
FAULTY = "pump"
FAULT = "bearing"
CALIBRATION = 12  # segments of normal operation the detector calibrates on (2 minutes)
NORMAL_SEGMENTS = CALIBRATION + 2
FAULT_SEGMENTS = 4  # CRITICAL needs 3 of the last 5 segments over the level
SEGMENT_S = 10.0


def recordings(seconds: float, fault_from_s: float) -> tuple:
    """int16 (MICS, samples) recordings of the room alone and of the running plant, its
    pump with a bearing fault from ``fault_from_s``.

    Both scenes keep the background at its fixed level (snr None) with the same seed, so
    the room in the noise recording is the room under the machines. The virtual device
    replays its file from the top for every stream and repeats stale data past the end:
    each recording is a little longer than what is captured."""
    common = dict(n_mics=MICS, seconds=seconds + 2.0, sample_rate=SAMPLE_RATE, seed=SEED, snr_db=None)
    room = simulate.render(simulate.default_scene(machines=(), **common)).mixture
    fault = simulate.Fault(FAULT, start_s=fault_from_s)
    plant = simulate.render(simulate.default_scene(machines=MACHINES, faults=[(FAULTY, fault)], **common)).mixture
    return vdevice.to_int16(room), vdevice.to_int16(plant)


def signalcraft(*args: str, env: dict, ok: tuple[int, ...] = (0,)) -> int:
    print(f"\n$ signalcraft {' '.join(args)}", flush=True)
    # In ./demo, as a user in the project folder: `output` is demo/output.
    code = subprocess.run([sys.executable, "-m", "signalcraft", "--config", str(DEMO / "config.yaml"), *args],
                          env=env, cwd=DEMO).returncode
    if code not in ok:
        sys.exit(f"signalcraft {args[0]} failed (exit {code})")
    return code


def main() -> None:
    models = ROOT / "models" / "separator"
    if not list(models.glob("plant_array-*.th")):
        sys.exit(f"no separator in {models}: run scripts/build_demo_separator.sh to build it")
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    (DEMO / "config.yaml").write_text(
        f"capture:\n  device: {vdevice.DEVICE_NAME}\n  channels: [1, 2, 3, 4]\n"
        "  # The virtual device delivers its whole file at once, not in real time:\n"
        "  # buffer all of it rather than drop what processing has not reached.\n"
        "  queue_seconds: 300\n"
        "pipeline:\n  # Likewise: let finished segments wait for the processing worker, none dropped.\n"
        f"  queue_segments: {NORMAL_SEGMENTS + FAULT_SEGMENTS + 2}\n"
        f"noise:\n  dir: noise_samples\nseparation:\n  repo: {models}\n"
        "  # An array model: all four microphones in, each machine at each microphone out.\n"
        "  model: plant_array\n"
        "  assets: {P-101: pump, F-201: fan, M-301: motor}\n"
        f"detect:\n  model: detector.pt\n  calibration_segments: {CALIBRATION}\n"
        "output:\n  dir: output\n"
        "log:\n  file: signalcraft.log\n"
    )
    env = {**os.environ, **vdevice.install(DEMO / "device", MICS, SAMPLE_RATE)}
    room, plant = recordings((NORMAL_SEGMENTS + FAULT_SEGMENTS) * SEGMENT_S, fault_from_s=NORMAL_SEGMENTS * SEGMENT_S)
    vdevice.set_samples(DEMO / "device", room)
    signalcraft("calibrate-noise", env=env)
    vdevice.set_samples(DEMO / "device", plant)
    print(f"\nThe plant runs normally for {NORMAL_SEGMENTS} segments; then the pump ({FAULTY}, asset P-101) "
          "develops a bearing fault.", flush=True)
    signalcraft("record", "--repeat", str(NORMAL_SEGMENTS + FAULT_SEGMENTS), env=env)
    code = signalcraft("detect", "output", env=env, ok=(0, 3, 4))
    signalcraft("-q", "report", "output", env=env)

    summary = json.loads((DEMO / "output" / "report" / "summary.json").read_text())
    states = {status: [m["source"] for m in summary["machines"] if m["status"] == status]
              for status in ("CRITICAL", "WARNING")}
    verdict = "; ".join(f"{status}: {', '.join(names)}" for status, names in states.items() if names) or \
        "no alert (every machine sounded normal)"
    print(f"\nDemo finished: detect exited {code}. {verdict}.\n"
          f"Report:      {DEMO / 'output' / 'report' / 'index.html'}\n"
          f"Noise clips: {DEMO / 'noise_samples'}\n"
          f"Segments:    {DEMO / 'output'} (mic_<N>/<asset>.pt, 1x240x240 log-mel, and manifest.json)\n"
          f"State:       {DEMO / 'output' / 'signalcraft.sqlite'}\nLog:         {DEMO / 'signalcraft.log'}")


if __name__ == "__main__":
    main()
