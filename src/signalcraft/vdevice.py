"""A virtual ALSA capture device that replays known samples through PortAudio.

For the demo, the tests and the benchmarks on machines without a sound card. ALSA's
``file`` plugin reads a raw file as the capture stream; a ``plug`` device in front of it
makes it an ordinary input device that PortAudio lists and opens. The file is read from
its start each time a stream opens, as fast as it is asked for (not paced in real time),
and past its end it repeats stale data: make it longer than the capture.

ALSA finds the definition through ``$XDG_CONFIG_HOME/alsa/asoundrc``: the returned
environment must be in place before PortAudio starts (before ``import sounddevice``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEVICE_NAME = "signalcraft_vmic"

_ASOUNDRC = """\
# Written by signalcraft.vdevice: a capture device replaying {raw}
pcm.{name}_file {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{raw}"
    format "raw"
}}
pcm.{name} {{
    type plug
    slave {{ pcm "{name}_file"  format S16_LE  channels {channels}  rate {rate} }}
}}
"""


def raw_path(folder: Path) -> Path:
    """The raw file the device replays."""
    return Path(folder) / "capture_s16le.raw"


def install(folder: Path, channels: int, sample_rate: int, name: str = DEVICE_NAME) -> dict[str, str]:
    """Define the device in ``folder`` and return the environment that makes ALSA see it.

    The device replays ``raw_path(folder)``; write it with ``set_samples`` before a
    stream opens (it can be rewritten between streams).
    """
    folder = Path(folder).resolve()
    (folder / "alsa").mkdir(parents=True, exist_ok=True)
    text = _ASOUNDRC.format(raw=raw_path(folder), name=name, channels=channels, rate=sample_rate)
    (folder / "alsa" / "asoundrc").write_text(text)
    return {"XDG_CONFIG_HOME": str(folder)}


def set_samples(folder: Path, samples: np.ndarray) -> None:
    """Make the device replay ``samples``: int16, shape = (channels, frames)."""
    if samples.dtype != np.int16 or samples.ndim != 2:
        raise ValueError(f"expected int16 (channels, frames), got {samples.dtype} {samples.shape}")
    np.ascontiguousarray(samples.T).astype("<i2").tofile(raw_path(folder))


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1) -> int16, clipped."""
    return np.clip(np.round(audio * 2**15), -(2**15), 2**15 - 1).astype(np.int16)
