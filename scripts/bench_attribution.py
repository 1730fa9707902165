"""Attribution: when one machine develops a fault, which machines does signalcraft alarm?

The end-to-end figure of separation plus detection, run as a plant engineer runs
signalcraft. A simulated pump room (the demo's: a pump, a fan and a motor, four
microphones; one installation, a new recording every segment) is calibrated once per
separator: noise clips of the room alone, then `process` and `detect` over
CALIBRATION segments of normal running (the default of detect.calibration_segments,
10 minutes), so the detector trains itself. Each case then starts from a copy of that
calibrated project, `process`es TEST_SEGMENTS more segments and reads `detect --csv`:

- one case per machine and fault kind it can have (simulate.FAULTS), the fault present
  through every test segment;
- normal running, as calibrated;
- normal running on a busy shift: knocks, clanks and forklift beeps BUSY_FACTOR times
  as often as during calibration.

Per case: which assets have at least one WARNING or CRITICAL row (any microphone), and
how many CRITICAL rows fall on the faulty machine. Separators compared side by side in
the same run: the array model (all microphones in, every source at every microphone,
then its spatial filter, the room's power capped at its level in the noise clips but
for its transients: separation.room_headroom 1), the same calibrated on only
SHORT_CALIBRATION segments (looser levels: what a short calibration flatters), the
same scored without room masking (detect.room_mask_db null: the cells where the room
was loud are scored as they are), the same capped at 4 times the room's level and
uncapped (null), the array model scored without `detect.attribution` (a stream's rise
left out where another stream of its microphone gained more, its drop where another's
new sound covers it, its rise in the bands where a machine that clearly changed rose
too or which the array cannot tell from it), the same network without the filter
(separation.spatial_iterations 0), the per-microphone model, if given, and no
separation (one `mix` stream per microphone: it can say that something is wrong, never
which machine).

    python scripts/bench_attribution.py [--array plant_array] [--mono plant] [--repo models/separator]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from benchlib import ROOT, write_section
from signalcraft import simulate, vdevice
from signalcraft.config import DetectConfig
from signalcraft.noise import NoiseClip, save_clips

SR = 16000  # Hz
MICS = 4
SEGMENT_S = 10.0
ROOM = ("pump", "fan", "motor")
ASSETS = {"P-101": "pump", "F-201": "fan", "M-301": "motor"}
ASSET_OF = {kind: asset for asset, kind in ASSETS.items()}
UNIT = 7  # the installation: machine designs and operating points, the room
# Segments of normal running the detector calibrates on: the product's default
# (detect.calibration_segments), as a plant engineer runs it.
CALIBRATION = DetectConfig().calibration_segments
SHORT_CALIBRATION = 12  # the comparison row's: how far a short calibration flatters
TEST_SEGMENTS = 6
BUSY_FACTOR = 5
SIGNALCRAFT = [sys.executable, "-m", "signalcraft"]


def run(config: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*SIGNALCRAFT, "--config", str(config), *args], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, cwd=config.parent)
    if result.returncode not in (0, 3, 4):
        sys.exit(f"signalcraft {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def recording(seed: int, faults=(), event_rate_hz: float = simulate.EVENT_RATE_HZ) -> np.ndarray:
    """One segment of the room, int16 shape = (MICS, samples): a new recording (seed) of
    the same installation (UNIT), the background at its fixed level."""
    scene = simulate.default_scene(machines=ROOM, n_mics=MICS, faults=faults, seconds=SEGMENT_S, sample_rate=SR,
                                   seed=seed, unit=UNIT, snr_db=None, event_rate_hz=event_rate_hz)
    return vdevice.to_int16(simulate.render(scene).mixture)


def stage(segments: list[np.ndarray], folder: Path, start: float) -> list[Path]:
    """WAV files that `process` dates one after the other (modification time less length)."""
    import soundfile as sf

    folder.mkdir(parents=True)
    out = []
    for k, audio in enumerate(segments):
        path = folder / f"{k:04d}.wav"
        sf.write(path, audio.T, SR, subtype="PCM_16")
        t = start + SEGMENT_S * (k + 1)
        os.utime(path, (t, t))
        out.append(path)
    return out


def calibrated_project(work: Path, repo: Path, model: Optional[str], separation: Optional[dict] = None,
                       detect: Optional[dict] = None) -> Path:
    """A project folder calibrated on CALIBRATION normal segments (or
    ``detect["calibration_segments"]``); returns its config. ``separation``, ``detect``:
    more settings of those sections."""
    work.mkdir(parents=True)
    n = (detect or {}).get("calibration_segments", CALIBRATION)
    settings = {
        "capture": {"channels": list(range(1, MICS + 1)), "sample_rate": SR, "segment_seconds": SEGMENT_S},
        "noise": {"dir": "noise_samples"},
        "separation": ({"repo": str(repo), "model": model, "assets": ASSETS, **(separation or {})} if model
                       else {"model": None}),
        "detect": {"model": "detector.pt", "calibration_segments": n, **(detect or {})},
        "output": {"dir": "out"},
        "log": {"file": None},
    }
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    room = simulate.render(simulate.default_scene(machines=(), n_mics=MICS, seconds=30.0, sample_rate=SR,
                                                  seed=99, unit=UNIT, snr_db=None)).mixture
    now = dt.datetime.now(dt.timezone.utc)
    save_clips([NoiseClip(np.ascontiguousarray(room[m]), SR, m + 1, "simulated room", now) for m in range(MICS)],
               work / "noise_samples")
    base = time.time() - 3600 * 24
    run(config, "process", *map(str, stage([recording(1000 + k) for k in range(n)], work / "cal", base)))
    run(config, "detect", str(work / "out"))
    return config


def case(calibrated: Path, work: Path, segments: list[np.ndarray]) -> list[dict]:
    """`detect --csv` rows for ``segments`` processed into a copy of the calibrated project."""
    shutil.copytree(calibrated.parent, work, ignore=shutil.ignore_patterns("cal"))
    config = work / "config.yaml"
    run(config, "process", *map(str, stage(segments, work / "test", time.time() - 3600 * 12)))
    return list(csv.DictReader(io.StringIO(run(config, "detect", str(work / "out"), "--csv").stdout)))


def cases() -> list[tuple[str, Optional[str], list]]:
    """(case name, faulty asset or None, its segment recipes: (seed, faults, event rate))."""
    out = []
    seed = 5000
    for kind in ROOM:
        for fault, kinds in simulate.FAULTS.items():
            if kind in kinds:
                recipes = [(seed + k, [(kind, simulate.Fault(fault))], simulate.EVENT_RATE_HZ)
                           for k in range(TEST_SEGMENTS)]
                out.append((f"{ASSET_OF[kind]} ({kind}) {fault}", ASSET_OF[kind], recipes))
                seed += 100
    out.append(("normal running", None, [(seed + k, [], simulate.EVENT_RATE_HZ) for k in range(TEST_SEGMENTS)]))
    seed += 100
    for rep in range(3):
        out.append((f"busy shift {rep + 1} (events x{BUSY_FACTOR})", None,
                    [(seed + k, [], BUSY_FACTOR * simulate.EVENT_RATE_HZ) for k in range(TEST_SEGMENTS)]))
        seed += 100
    return out


def flagged(rows: list[dict], status: str) -> set[str]:
    return {r["source"] for r in rows if r["status"] == status}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=ROOT / "models" / "separator", help="model folder")
    parser.add_argument("--array", default="plant_array", help="array separator in --repo")
    parser.add_argument("--mono", default=None, help="per-microphone separator in --repo (optional)")
    parser.add_argument("--quick", action="store_true",
                        help="one fault case and one busy shift, to check the set-up (not for the figures)")
    args = parser.parse_args()

    # (label, model, more separation settings, more detect settings): the array model as
    # `record` runs it and `detect` scores it, the same calibrated for less time, without
    # room masking or without attribution in `detect`, its network without the spatial
    # filter, and the references.
    separators = [(f"array model `{args.array}`", args.array, None, None),
                  (f"array model `{args.array}`, calibrated on {SHORT_CALIBRATION} segments", args.array, None,
                   {"calibration_segments": SHORT_CALIBRATION}),
                  (f"array model `{args.array}`, detect.room_mask_db null", args.array, None,
                   {"room_mask_db": None}),
                  (f"array model `{args.array}`, separation.room_headroom 4", args.array, {"room_headroom": 4.0},
                   None),
                  (f"array model `{args.array}`, separation.room_headroom null", args.array,
                   {"room_headroom": None}, None),
                  (f"array model `{args.array}`, detect.attribution off", args.array, None, {"attribution": False}),
                  (f"array network `{args.array}` alone", args.array, {"spatial_iterations": 0}, None)]
    if args.mono:
        separators.append((f"per-microphone model `{args.mono}`", args.mono, None, None))
    separators.append(("no separation", None, None, None))
    all_cases = cases()
    if args.quick:
        all_cases = [all_cases[0], all_cases[-1]]
    results: dict[str, list] = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for j, (label, model, more, detect) in enumerate(separators):
            calibrated = calibrated_project(Path(tmp) / f"cal-{j}", args.repo, model, more, detect)
            results[label] = []
            for k, (name, faulty, recipes) in enumerate(all_cases):
                segments = [recording(s, f, r) for s, f, r in recipes]
                rows = case(calibrated, Path(tmp) / f"case-{j}-{k}", segments)
                crit = Counter(r["source"] for r in rows if r["status"] == "CRITICAL")
                results[label].append((name, faulty, flagged(rows, "WARNING") | set(crit), set(crit), crit))
                print(f"{label} | {name}: CRITICAL {dict(crit)}, WARNING {sorted(flagged(rows, 'WARNING'))}",
                      flush=True)
    minutes = (time.monotonic() - began) / 60

    def summary(label: str) -> tuple[str, bool]:
        res = results[label]
        faulty_runs = [r for r in res if r[1]]
        crit_rows = sum(sum(r[4].values()) for r in faulty_runs)
        on_faulty = sum(r[4].get(r[1], 0) for r in faulty_runs)
        healthy = sum(1 for r in faulty_runs if (r[3] & set(ASSETS)) - {r[1]})
        found = sum(1 for r in faulty_runs if r[1] in r[3])
        quiet = [r for r in res if not r[1]]
        quiet_crit = sum(1 for r in quiet if r[3])
        quiet_warn = max((len(r[2]) for r in quiet), default=0)
        share = on_faulty / crit_rows if crit_rows else float("nan")
        ok = crit_rows > 0 and share >= 0.95 and healthy == 0 and quiet_crit == 0 and quiet_warn <= 1
        named = label != "no separation"
        line = (f"| {label} | {found}/{len(faulty_runs)} | {on_faulty}/{crit_rows} ({100 * share:.0f}%) | "
                f"{f'{healthy}/{len(faulty_runs)}' if named else 'none named'} | {quiet_crit}/{len(quiet)} | "
                f"{quiet_warn if named else 'none named'} |")
        return line, ok

    def cell(assets: set[str]) -> str:
        return ", ".join(sorted(assets)) or "-"

    detail = []
    for label in results:
        detail.append(f"\n{label}:\n\n| case | CRITICAL (rows) | WARNING or CRITICAL |\n|---|---|---|")
        for name, faulty, any_flag, crit, counts in results[label]:
            detail.append(f"| {name} | {', '.join(f'{a} ({n})' for a, n in sorted(counts.items())) or '-'} | "
                          f"{cell(any_flag)} |")
    lines = [summary(label) for label in results]
    body = f"""## Attribution: which machine alarms (scripts/bench_attribution.py)

The demo's room (P-101 pump, F-201 fan, M-301 motor, {MICS} microphones, factory background
at its fixed level, denoising on) through `process` and `detect` (attribution on unless
said otherwise): calibrated on
{CALIBRATION} normal segments of {SEGMENT_S:g} s, then {TEST_SEGMENTS} segments per case, each case from
the same calibrated state. {len([c for c in all_cases if c[1]])} fault cases (every machine with every fault it can
have, present in every test segment), one normal case and 3 busy shifts (background
events x{BUSY_FACTOR}). Run time {minutes:.1f} min. Rows are (microphone, asset) streams.

| separator | faulty machine CRITICAL | CRITICAL rows on the faulty machine | fault cases with CRITICAL on a healthy machine | normal cases with any CRITICAL | most assets flagged in a normal case |
|---|---|---|---|---|---|
{chr(10).join(line for line, _ in lines)}

Without separation the only stream is `mix`, so no row names a machine: its CRITICAL
rows count as not on the faulty one.
{chr(10).join(detail)}

Target (at least 95% of CRITICAL rows on the faulty machine, none on a healthy one; in
normal cases no CRITICAL and WARNING on at most one asset):
{'; '.join(f"{label} {'met' if ok else 'NOT met'}" for label, (_, ok) in zip(results, lines))}.
"""
    print(body)
    print(f"written to {write_section('bench_attribution', body)}")


if __name__ == "__main__":
    main()
