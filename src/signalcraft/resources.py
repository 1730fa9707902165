"""Loading and checking what the chain needs from disk: the noise clips and the
separator. One place, used by `record`, `process` (through ``chain.Chain``) and `doctor`,
so that they agree on what is wrong and say it the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from .config import Config
from .errors import NoiseClipError


@dataclasses.dataclass(frozen=True)
class ClipCheck:
    """The noise clips of a set of channels: ``clips`` in channel order when all are
    usable (else None), and one line per problem (``problems``: missing, damaged, of
    another channel or rate; ``other_device``: recorded on another device, usable)."""

    clips: Optional[list]  # noise.NoiseClip per channel
    problems: list[str]
    other_device: list[str]


def check_noise_clips(config: Config, channels: Sequence[int], sample_rate: int,
                      device: Optional[str] = None) -> ClipCheck:
    """Check the noise clip of every channel in ``channels`` (1-based device channels)
    for spectral gating at ``sample_rate``; ``device``: the name the clips should have
    been recorded on (None: not checked)."""
    from .noise import clip_path, load_clip

    clips, problems, other_device = [], [], []
    for channel in channels:
        path = clip_path(config.noise.dir, channel)
        if not path.is_file():
            problems.append(f"{path.name} missing")
            continue
        try:
            clip = load_clip(path)
        except NoiseClipError as e:
            problems.append(f"{path.name}: {e.problem}" if e.problem else str(e))
            continue
        if clip.channel != channel:
            problems.append(f"{path.name} holds channel {clip.channel}, expected channel {channel}")
        elif clip.sample_rate != sample_rate:
            problems.append(f"{path.name} is recorded at {clip.sample_rate} Hz, the audio is {sample_rate} Hz")
        else:
            clips.append(clip)
            if device is not None and clip.device != device:
                other_device.append(f"{path.name} ({clip.device!r})")
    return ClipCheck(clips if not problems else None, problems, other_device)


def load_noise_clips(config: Config, channels: Sequence[int], sample_rate: int) -> list:
    """The noise clips of ``channels``, in order.

    Raises
    ------
    NoiseClipError
        Any clip missing, damaged, of another channel or of another sample rate; the
        message names each and says how to record them again.
    """
    from .noise import clip_path

    checked = check_noise_clips(config, channels, sample_rate)
    if checked.clips is None:
        again = any(clip_path(config.noise.dir, channel).exists() for channel in channels)  # replaced only with --force
        raise NoiseClipError(f"{config.noise.dir}: {'; '.join(checked.problems)}. Record the noise clips with the "
                             f"machines off: `signalcraft calibrate-noise{' --force' * again}`.")
    return checked.clips


def load_separator(config: Config, mics: int, sample_rate: int):
    """The separator of ``separation`` for ``mics`` microphones at ``sample_rate``.

    Raises
    ------
    ModelError
        The model is missing, damaged, or an array model for another number of
        microphones.
    EdgeError
        compute.runtime is onnxruntime and the model's export is missing or stale.
    """
    from .separate import ModelError, load_separator as load

    separator = load(config.separation, sample_rate, config.compute.runtime, config.compute.precision)
    array = separator.info.audio_channels
    if array > 1 and array != mics:
        raise ModelError(
            f"separator {config.separation.model} was trained on an array of {array} microphones, but "
            f"{mics} microphone channels are recorded. Record the channels it was trained on "
            "(capture.channels), or train a model for these with train_separator.array: true."
        )
    return separator
