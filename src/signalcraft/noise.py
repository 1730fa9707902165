"""Room-noise calibration: record with the machines off, check levels, save one clip per
channel.

A clip is ``<noise.dir>/channel_<C>.pt`` (C: the 1-based device channel), a dict of plain
data: ``clip`` (float32 tensor, shape = (samples,)), ``sample_rate``, ``channel``,
``device``, ``recorded_at`` (ISO 8601, UTC) and ``format``. It loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .capture import DeviceCapture
from .config import Config, NoiseConfig
from .errors import ConfigError, NoiseClipError
from .files import backup_path, load_failure, save_torch, temp_path

log = logging.getLogger(__name__)

CLIP_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class NoiseClip:
    """Room noise recorded on one channel with the machines off.

    ``audio``: float32, shape = (samples,). ``channel``: 1-based device channel.
    """

    audio: np.ndarray
    sample_rate: int
    channel: int
    device: str
    recorded_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class Levels:
    """Level statistics of one channel."""

    rms_dbfs: float  # RMS relative to full scale, dB; -inf for digital silence
    peak: float  # max |x|
    clipped_fraction: float  # fraction of samples with |x| >= clip_level


def levels(audio: np.ndarray, clip_level: float) -> Levels:
    """Levels of a float32 signal, shape = (samples,)."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return Levels(
        rms_dbfs=20 * np.log10(rms) if rms > 0 else float("-inf"),
        peak=float(np.max(np.abs(audio))) if audio.size else 0.0,
        clipped_fraction=float(np.mean(np.abs(audio) >= clip_level)) if audio.size else 0.0,
    )


def check_clip(audio: np.ndarray, config: NoiseConfig) -> list[str]:
    """Problems that make ``audio`` (shape = (samples,)) unusable as a noise clip: a dead
    channel, clipping, or samples that are not numbers. Empty if the clip is fine."""
    bad = int(np.count_nonzero(~np.isfinite(audio)))
    if bad:
        return [f"{bad} samples are not finite (NaN or infinity): the interface or its driver is faulty"]
    lv = levels(audio, config.clip_level)
    problems = []
    if lv.peak == 0.0:
        problems.append("digital silence (every sample is zero): is the microphone connected and the channel unmuted?")
    elif lv.rms_dbfs < config.dead_rms_dbfs:
        problems.append(
            f"dead channel: RMS {lv.rms_dbfs:.1f} dBFS is below noise.dead_rms_dbfs "
            f"({config.dead_rms_dbfs:g} dBFS): check the cable and phantom power"
        )
    if lv.clipped_fraction > config.max_clipped_fraction:
        problems.append(
            f"clipping: {lv.clipped_fraction:.2%} of samples reach {config.clip_level:g} of full scale "
            f"(limit {config.max_clipped_fraction:.2%}): lower the input gain"
        )
    return problems


def together(clips: Sequence[NoiseClip]) -> Optional[np.ndarray]:
    """The clips as one recording of all their channels, float32, shape = (channels,
    samples), when they were recorded at once (one `calibrate-noise`: same start and
    length); else None."""
    if not clips or len({(c.recorded_at, c.audio.shape[-1], c.sample_rate) for c in clips}) != 1:
        return None
    return np.stack([c.audio for c in clips])


def clip_path(noise_dir: Path, channel: int) -> Path:
    """Where the clip of 1-based device channel ``channel`` lives."""
    return Path(noise_dir) / f"channel_{channel}.pt"


def save_clip(clip: NoiseClip, noise_dir: Path) -> Path:
    """Write one clip atomically; an existing clip is kept as a backup (``backup_path``)."""
    return save_clips([clip], noise_dir)[0]


def save_clips(clips: Sequence[NoiseClip], noise_dir: Path) -> list[Path]:
    """Write a set of clips all or nothing: every clip is first written in full under a
    temporary name, and only then are the old clips moved to their backups
    (``backup_path``: every earlier clip is kept) and the new ones renamed into place.
    A failure while writing (a full disk) leaves the old set."""
    noise_dir = Path(noise_dir)
    noise_dir.mkdir(parents=True, exist_ok=True)
    staged = []
    try:
        for clip in clips:
            path = clip_path(noise_dir, clip.channel)
            tmp = temp_path(path)  # cleared by remove_leftovers if this run is killed
            save_torch(tmp, _clip_data(clip))
            staged.append((tmp, path))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        if path.exists():
            os.replace(path, backup_path(path))
        os.replace(tmp, path)
    return [path for _, path in staged]


def _clip_data(clip: NoiseClip) -> dict:
    import torch

    return {
        "format": CLIP_FORMAT,
        "clip": torch.from_numpy(np.ascontiguousarray(clip.audio, dtype=np.float32)),
        "sample_rate": clip.sample_rate,
        "channel": clip.channel,
        "device": clip.device,
        "recorded_at": clip.recorded_at.isoformat(),
    }


def load_clip(path: Path) -> NoiseClip:
    """Read a clip written by ``save_clip``.

    Raises
    ------
    NoiseClipError
        Missing, unreadable or not a signalcraft noise clip; the message names the file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise NoiseClipError(f"{path}: noise clip not found. Record one with `signalcraft calibrate-noise`.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        audio = data["clip"].numpy().astype(np.float32, copy=False)
        if audio.ndim != 1 or data.get("format") != CLIP_FORMAT:
            raise ValueError("unexpected layout")
        clip = NoiseClip(
            audio=audio,
            sample_rate=int(data["sample_rate"]),
            channel=int(data["channel"]),
            device=str(data["device"]),
            recorded_at=dt.datetime.fromisoformat(data["recorded_at"]),
        )
    except Exception as e:  # torch raises many types for a damaged file
        raise _unusable(path, f"not a readable noise clip ({load_failure(e)})") from None
    bad = int(np.count_nonzero(~np.isfinite(clip.audio)))
    if bad:
        raise _unusable(path, f"{bad} of {clip.audio.size} samples are not finite (NaN or infinity): the clip would "
                              "silence its channel")
    return clip


def _unusable(path: Path, problem: str) -> NoiseClipError:
    """The error for a clip that cannot be used, keeping ``problem`` on it."""
    return NoiseClipError(f"{path}: {problem}. Record it again with `signalcraft calibrate-noise --force`.", problem)


def calibrate(
    config: Config,
    seconds: Optional[float] = None,
    force: bool = False,
    stop: Optional[threading.Event] = None,
) -> list[tuple[Path, Levels]]:
    """Record the room on every configured channel and save one clip per channel.

    Nothing is saved unless every channel passes ``check_clip``; existing clips are
    replaced only with ``force``.

    Returns
    -------
    list of (path, levels), one per channel, in channel order.

    Raises
    ------
    ConfigError
        Clips exist and ``force`` is False (checked before recording).
    NoiseClipError
        A channel is dead or clipping; the message lists every such channel.
    DeviceError
        From capture.
    """
    seconds = seconds if seconds is not None else config.noise.seconds
    shortest = 2 * config.denoise.n_fft / config.capture.sample_rate  # spectral gating needs two windows
    if seconds < shortest:
        raise ConfigError(f"--seconds / noise.seconds: {seconds:g} s is too short; spectral gating with "
                          f"denoise.n_fft {config.denoise.n_fft} needs at least {shortest:.2f} s (use several seconds).")
    capture = DeviceCapture(config.capture, segment_frames=round(seconds * config.capture.sample_rate), stop=stop)
    existing = [p for p in (clip_path(config.noise.dir, c) for c in capture.channels) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"noise clips already exist: {', '.join(map(str, existing))}. Pass --force to replace "
            "them (each old clip is kept as .pt.<time>.bak)."
        )
    log.info("recording %.1f s of room noise; the machines must be off", seconds)
    with capture:
        segment = next(iter(capture.segments(1)), None)
    if segment is None:
        return []  # stopped by a signal before the recording was complete
    problems = _problems(segment.audio, segment.channels, config.noise)
    if problems:
        raise NoiseClipError(
            "noise recording rejected, nothing saved:\n" + "\n".join(f"  channel {c}: {p}" for c, p in problems)
        )
    # Every recorded channel is checked (a dead reference microphone cancels nothing), but
    # only the machine microphones are gated, so only theirs are saved.
    clips = [NoiseClip(segment.audio[row], segment.sample_rate, channel, segment.device, segment.start_time)
             for row, channel in enumerate(segment.channels) if channel in capture.channels]
    for row, channel in enumerate(segment.channels):
        if channel in capture.reference_channels:
            log.info("reference channel %d: %.1f dBFS RMS (checked; references need no noise clip)", channel,
                     levels(segment.audio[row], config.noise.clip_level).rms_dbfs)
    paths = save_clips(clips, config.noise.dir)
    return [(path, levels(clip.audio, config.noise.clip_level)) for path, clip in zip(paths, clips)]


def _problems(audio: np.ndarray, channels: Sequence[int], config: NoiseConfig) -> list[tuple[int, str]]:
    return [(c, p) for row, c in enumerate(channels) for p in check_clip(audio[row], config)]
