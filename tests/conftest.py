"""Shared fixtures: a virtual ALSA capture device, a project folder, the CLI in this
process (``invoke``) and as a real process (``run_cli``), segments on disk.

The device is defined once per session, before anything imports sounddevice (PortAudio
reads ALSA's configuration when it starts); each test writes the samples it replays.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from signalcraft import vdevice

CHANNELS = 4
SAMPLE_RATE = 16000
SEGMENT_SECONDS = 0.5
SEGMENT_FRAMES = round(SEGMENT_SECONDS * SAMPLE_RATE)

_ALSA_DIR = Path(tempfile.mkdtemp(prefix="signalcraft-alsa-"))
atexit.register(shutil.rmtree, _ALSA_DIR, ignore_errors=True)
os.environ.update(vdevice.install(_ALSA_DIR, CHANNELS, SAMPLE_RATE))
# PortAudio probes each device when it starts: the replayed file must already exist.
vdevice.set_samples(_ALSA_DIR, np.zeros((CHANNELS, SAMPLE_RATE), np.int16))


class VirtualMic:
    """The replayed samples: int16, shape = (channels, frames)."""

    def __init__(self, samples: np.ndarray):
        self.set(samples)

    def set(self, samples: np.ndarray) -> None:
        self.samples = samples
        vdevice.set_samples(_ALSA_DIR, samples)

    def float32(self) -> np.ndarray:
        return self.samples.astype(np.float32) / 2**15


def known_samples(seconds: float = 8.0, seed: int = 0, amplitude: int = 12000) -> np.ndarray:
    """Random int16 noise, different on every channel, so any lost, repeated or swapped
    frame or channel shows up."""
    rng = np.random.default_rng(seed)
    return rng.integers(-amplitude, amplitude, size=(CHANNELS, round(seconds * SAMPLE_RATE)), dtype=np.int16)


@pytest.fixture
def vmic() -> VirtualMic:
    return VirtualMic(known_samples())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with a config.yaml for the virtual device; returns the config path."""
    config = {
        "capture": {
            "device": vdevice.DEVICE_NAME,
            "channels": list(range(1, CHANNELS + 1)),
            "segment_seconds": SEGMENT_SECONDS,
        },
        "noise": {"dir": "noise", "seconds": 1.0},
        "output": {"dir": "out"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclasses.dataclass
class Invoked:
    """What a command printed and its exit code (the fields of CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str, cwd: Path | None = None, env: dict | None = None) -> Invoked:
    """Run `signalcraft ARGS` in this process through click's CliRunner: the same
    command, options, logging and exit code as the installed script, without paying
    for a new interpreter. Use ``run_cli`` where the process is the point (signals,
    locks held by another process, SIGKILL, resource limits)."""
    from click.testing import CliRunner

    from signalcraft.cli import cli

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        try:
            result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False, prog_name="signalcraft")
        finally:
            for handler in root.handlers:  # the command's stderr and log file handlers
                if handler not in handlers:
                    handler.close()
            root.handlers[:], root.level = handlers, level
    return Invoked(result.exit_code, result.stdout, result.stderr)


SCRIPT = str(Path(sys.executable).with_name("signalcraft"))  # the installed entry point


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120):
    """Run the installed `signalcraft ARGS` as a real process; returns CompletedProcess."""
    return subprocess.run(
        [SCRIPT, *args],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def tiny_demucs(sources=("pump", "fan"), samplerate: int = SAMPLE_RATE, audio_channels: int = 1,
                resample: bool = True):
    """A real Demucs model with random weights, small enough for a unit test."""
    import torch
    from demucs.demucs import Demucs

    torch.manual_seed(0)
    return Demucs(sources=list(sources), audio_channels=audio_channels, samplerate=samplerate,
                  channels=4, depth=2, segment=1, resample=resample)


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """A model folder holding 'tiny' (sources pump and fan) in demucs' packaged format."""
    from signalcraft.separate import save_model

    repo = tmp_path / "models"
    save_model(tiny_demucs(), repo, "tiny")
    return repo


def segment_manifest(start: dt.datetime, mics: int = 1, sources=("mix",)):
    """A valid manifest for a hand-made segment starting at ``start`` (aware)."""
    from signalcraft import __version__
    from signalcraft.segments import Level, Manifest

    return Manifest(
        start_time_utc=start.astimezone(dt.timezone.utc), duration_s=10.0, sample_rate=SAMPLE_RATE,
        device="test", channels=tuple(range(1, mics + 1)), start_frame=0, overflows=0, dropped_frames=0,
        dropped_segments=0, reconnects=0,
        levels=tuple(Level(m, m + 1, -20.0, 0.5, 0.0) for m in range(mics)), denoise=None,
        separator={"name": None, "sources": list(sources)}, features={"n_mels": 240, "n_frames": 240},
        tensors={m: tuple(sources) for m in range(mics)}, signalcraft_version=__version__,
    )


def make_segment(output: Path, start: dt.datetime, size: int = 10_000) -> Path:
    """A real segment folder written by the product's writer: one (mic 0, mix) file of
    ``size`` bytes (not a tensor) and a manifest; returns the folder."""
    from signalcraft.segments import SegmentWriter

    with SegmentWriter(output, start) as w:
        w.save_tensor(0, "mix", b"\0" * size)
        return w.commit(segment_manifest(start))


@pytest.fixture
def berlin_fall_back(monkeypatch) -> dt.datetime:
    """Local time is Europe/Berlin for the test; returns the next instant (UTC, from
    ``clock.now()``) at which its clocks go back an hour, so the hour after it repeats
    the local times of the hour before."""
    import time
    from zoneinfo import ZoneInfo

    from signalcraft import clock

    berlin = ZoneInfo("Europe/Berlin")
    t = clock.now().replace(minute=0, second=0, microsecond=0)
    for _ in range(24 * 400):
        step = t + dt.timedelta(hours=1)
        if step.astimezone(berlin).utcoffset() < t.astimezone(berlin).utcoffset():
            break
        t = step
    else:
        raise AssertionError("Europe/Berlin has no fall-back within 400 days of the clock")
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield step
    monkeypatch.undo()
    time.tzset()


# A detect project: one pump at two microphones, no separation (source `mix`).
CALIBRATION = 12
SETTINGS = {
    "capture": {"channels": [1, 2]},
    "denoise": {"enabled": False},
    # No retention: the faketime run moves the clock 400 days past the files' times.
    "output": {"dir": "out", "keep_days": None},
    # WARNING on every segment above its level (not 3 of 5), so that one faulty segment
    # alerts and the tests of what an alert does need few segments; test_thresholds and
    # test_detect cover the default rule.
    "detect": {"calibration_segments": CALIBRATION, "model": "detector.pt",
               "alerts": {"warning_k": 1, "warning_n": 1}},
}
# The same project with the default alert rule (WARNING: 3 of the last 5 segments).
DEFAULT_ALERTS = {**SETTINGS, "detect": {k: v for k, v in SETTINGS["detect"].items() if k != "alerts"}}


UNIT = 3  # one installed pump, watched over time: every recording is of this unit


def scene_file(folder: Path, seed: int, fault: str | None = None) -> Path:
    """A 10 s two-microphone recording (``seed``) of the installed pump; ``fault`` from 0 s."""
    import soundfile as sf

    from signalcraft import simulate

    faults = [("pump", simulate.Fault(fault))] if fault else []
    rendering = simulate.render(simulate.default_scene(machines=("pump",), n_mics=2, faults=faults, seed=seed,
                                                       unit=UNIT))
    path = folder / f"scene-{seed}-{fault or 'normal'}.wav"
    sf.write(path, rendering.mixture.T, 16000, subtype="FLOAT")
    return path


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory):
    """A project whose detector calibrated itself on normal segments (one per session: a test
    that changes it takes ``copy``): (folder, config, first detect result, second)."""
    from signalcraft.config import config_from_dict
    from signalcraft.detect.run import detect
    from signalcraft.record import process_files

    root = tmp_path_factory.mktemp("detect")
    (root / "config.yaml").write_text(yaml.safe_dump(SETTINGS))
    config = config_from_dict(SETTINGS, root / "config.yaml")
    process_files(config, [scene_file(root, seed) for seed in range(CALIBRATION - 2)])
    first = detect(config, root / "out")
    process_files(config, [scene_file(root, seed) for seed in range(CALIBRATION - 2, CALIBRATION)])
    second = detect(config, root / "out")
    return root, config, first, second


def add_recordings(project: Path, config, seeds, fault=None, ending: dt.datetime | None = None) -> list[str]:
    """Process recordings (seeds) of the pump into the project's output; their folder
    names. ``ending``: the first recording ends then (its file's time), the next 10 s
    later, and so on; by default they end when written."""
    from signalcraft.record import process_files
    from signalcraft.segments import list_segments

    before = {s.name for s in list_segments(project / "out")}
    files = [scene_file(project, seed, fault) for seed in seeds]
    if ending is not None:
        for k, path in enumerate(files):
            t = (ending + dt.timedelta(seconds=10 * k)).timestamp()
            os.utime(path, (t, t))
    process_files(config, files)
    return [s.name for s in list_segments(project / "out") if s.name not in before]


@pytest.fixture
def copy(calibrated, tmp_path):
    """A copy of the calibrated project, for a test that changes it: (folder, config)."""
    from signalcraft.config import config_from_dict

    root, *_ = calibrated
    project = tmp_path / "p"
    shutil.copytree(root, project)
    return project, config_from_dict(SETTINGS, project / "config.yaml")
