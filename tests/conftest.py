"""Shared fixtures: a virtual ALSA capture device, a project folder, the CLI as a process.

The device is defined once per session, before anything imports sounddevice (PortAudio
reads ALSA's configuration when it starts); each test writes the samples it replays.
"""

from __future__ import annotations

import atexit
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


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120):
    """Run `python -m signalcraft ARGS` as a real process; returns CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "signalcraft", *args],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )


def tiny_demucs(sources=("pump", "fan"), samplerate: int = SAMPLE_RATE, audio_channels: int = 1):
    """A real Demucs model with random weights, small enough for a unit test."""
    import torch
    from demucs.demucs import Demucs

    torch.manual_seed(0)
    return Demucs(sources=list(sources), audio_channels=audio_channels, samplerate=samplerate,
                  channels=4, depth=2, segment=1)


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """A model folder holding 'tiny' (sources pump and fan) in demucs' packaged format."""
    from signalcraft.separate import save_model

    repo = tmp_path / "models"
    save_model(tiny_demucs(), repo, "tiny")
    return repo
