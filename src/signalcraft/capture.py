"""Audio sources that yield fixed-length Segments.

``DeviceCapture`` reads an input device through a sounddevice callback stream: the
callback only copies each block into a bounded queue; the calling thread assembles
segments with consecutive sample indices, so no frame is lost or duplicated between
segments. ``file_segments`` replays a multichannel WAV/FLAC file as the same Segments.

Arrays from PortAudio and soundfile are ``(frames, channels)``; they are transposed here,
once, to signalcraft's ``(channels, samples)`` float32.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import queue
import re
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import clock
from .config import CaptureConfig
from .errors import ConfigError, DeviceError, StorageError

log = logging.getLogger(__name__)

# Full scale of each integer sample format, to map samples to float32 in [-1, 1).
_FULL_SCALE = {"int16": 2.0**15, "int32": 2.0**31}
_POLL_SECONDS = 0.1  # how often the assembling thread checks for a stop request
_MIN_STALL_SECONDS = 1.0  # never call a device stalled sooner than this


@dataclasses.dataclass(frozen=True)
class Segment:
    """A fixed-length piece of multichannel audio.

    Attributes
    ----------
    audio : np.ndarray
        float32, shape = (channels, samples), values in [-1, 1).
    sample_rate : int
        Hz.
    start_time : datetime
        UTC time of the first sample.
    start_frame : int
        Index of the first sample counted from the start of the stream or file.
    device : str
        Device name, or ``file:<name>`` for a file source.
    channels : tuple of int
        1-based device (or file) channel of each row of ``audio``.
    overflows : int
        Input overflows the device reported while this segment was captured.
    dropped_frames : int
        Frames lost inside this segment because the capture queue was full.
    reconnects : int
        Times the device was lost (and reopened) just before this segment; the audio
        from the loss to this segment's start is missing.
    """

    audio: np.ndarray
    sample_rate: int
    start_time: dt.datetime
    start_frame: int
    device: str
    channels: tuple[int, ...]
    overflows: int = 0
    dropped_frames: int = 0
    reconnects: int = 0

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.audio.shape[1] / self.sample_rate


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """An audio input device as PortAudio reports it."""

    index: int
    name: str
    hostapi: str
    max_input_channels: int
    default_samplerate: float


def _sounddevice():
    """Import sounddevice, turning a missing PortAudio into a clear error."""
    try:
        import sounddevice
    except OSError as e:
        raise DeviceError(
            f"PortAudio could not be loaded ({e}). Install it with "
            "`sudo apt-get install libportaudio2`, or run scripts/setup.sh as root."
        ) from None
    return sounddevice


def list_input_devices() -> list[DeviceInfo]:
    """Every device with at least one input channel."""
    sd = _sounddevice()
    hostapis = sd.query_hostapis()
    return [
        DeviceInfo(
            index=d["index"],
            name=d["name"],
            hostapi=hostapis[d["hostapi"]]["name"],
            max_input_channels=d["max_input_channels"],
            default_samplerate=d["default_samplerate"],
        )
        for d in sd.query_devices()
        if d["max_input_channels"] > 0
    ]


def resolve_device(spec: Optional[Union[int, str]]) -> DeviceInfo:
    """Find an input device by index, by case-insensitive name substring, or (None) the
    system default. An exact name match wins over substring matches.

    Raises
    ------
    DeviceError
        No device matches, several match, or the match has no input channels. The
        message lists the available input devices.
    """
    sd = _sounddevice()
    devices = list_input_devices()
    if spec is None:
        default = sd.default.device[0]
        matches = [d for d in devices if d.index == default]
        what = "system default input device"
    elif isinstance(spec, int):
        matches = [d for d in devices if d.index == spec]
        what = f"input device index {spec}"
    else:
        exact = [d for d in devices if d.name.lower() == spec.lower()]
        matches = exact or [d for d in devices if spec.lower() in d.name.lower()]
        what = f"input device named like {spec!r}"
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise DeviceError(
            f"capture.device: {spec!r} matches several input devices: {_describe(matches)}. "
            "Set capture.device to a longer part of the name, or to an index."
        )
    available = _describe(devices) if devices else "none (is the interface plugged in and powered?)"
    raise DeviceError(
        f"capture.device: found no {what}. Available input devices: {available}. "
        "Set capture.device to an index or part of a name from `signalcraft devices`."
    )


def _describe(devices: Sequence[DeviceInfo]) -> str:
    return "; ".join(f"[{d.index}] {d.name!r} ({d.max_input_channels} ch)" for d in devices)


def resolve_channels(channels: Optional[Sequence[int]], available: int, device: str,
                     key: str = "capture.channels") -> tuple[int, ...]:
    """1-based channels to record: ``channels`` checked against the device, or all of them."""
    if channels is None:
        return tuple(range(1, available + 1))
    too_high = [c for c in channels if c > available]
    if too_high:
        raise ConfigError(
            f"{key}: channel {too_high[0]} does not exist on {device!r}, which has "
            f"{available} input channels (numbered from 1)."
        )
    return tuple(channels)


def to_float32(block: np.ndarray) -> np.ndarray:
    """Integer or float samples -> float32 in [-1, 1), same shape."""
    scale = _FULL_SCALE.get(block.dtype.name)
    if scale is None:
        return block.astype(np.float32, copy=False)
    return (block.astype(np.float32) / np.float32(scale)).astype(np.float32, copy=False)


class DeviceCapture:
    """Gapless fixed-length segments from an audio input device.

    Use as a context manager; ``segments()`` yields Segments until ``count`` is reached,
    ``stop`` is set, or the device fails. The segment being assembled when ``stop`` is
    set is discarded.

    Parameters
    ----------
    config : CaptureConfig
    segment_frames : int, optional
        Samples per segment; default ``config.segment_frames``.
    stop : threading.Event, optional
        Set from another thread or a signal handler to end capture.
    """

    def __init__(
        self,
        config: CaptureConfig,
        *,
        segment_frames: Optional[int] = None,
        stop: Optional[threading.Event] = None,
    ):
        self.config = config
        self.segment_frames = segment_frames or config.segment_frames
        self.stop = stop or threading.Event()
        self.device = resolve_device(config.device)
        self.reference_channels = resolve_channels(tuple(config.reference_channels) or None,
                                                   self.device.max_input_channels, self.device.name,
                                                   "capture.reference_channels") if config.reference_channels else ()
        if config.channels is None:  # every input but the references
            self.channels = tuple(c for c in range(1, self.device.max_input_channels + 1)
                                  if c not in self.reference_channels)
            if not self.channels:
                raise ConfigError(f"{self.device.name!r}: every input channel is a reference channel "
                                  "(capture.reference_channels); no microphone left to record.")
        else:
            self.channels = resolve_channels(config.channels, self.device.max_input_channels, self.device.name)
        # The rows of every segment: the microphones, then the references.
        self.rows = self.channels + self.reference_channels
        # PortAudio opens channels 1..n; the configured ones are picked from those.
        self._open_channels = max(self.rows)
        self._pick = np.array(self.rows) - 1
        block_count = max(2, math.ceil(config.queue_seconds * config.sample_rate / config.block_frames))
        self._blocks: queue.Queue = queue.Queue(maxsize=block_count)
        self._lost_frames = 0  # frames lost since the last queued block; callback thread only
        self._pending: Optional[np.ndarray] = None  # tail of a block that spans two segments
        self._stream = None
        self.stall_seconds = max(self.segment_frames / config.sample_rate, _MIN_STALL_SECONDS)

    def __enter__(self) -> "DeviceCapture":
        sd = _sounddevice()
        c = self.config
        try:
            sd.check_input_settings(
                device=self.device.index, channels=self._open_channels,
                samplerate=c.sample_rate, dtype=c.sample_format,
            )
        except sd.PortAudioError as e:
            raise DeviceError(
                f"{self.device.name!r} refuses {self._open_channels} channels at {c.sample_rate} Hz "
                f"as {c.sample_format} ({e}). Its default rate is {self.device.default_samplerate:g} Hz; "
                "set capture.sample_rate / capture.sample_format to what it supports."
            ) from None
        try:
            self._stream = sd.InputStream(
                device=self.device.index, channels=self._open_channels,
                samplerate=c.sample_rate, dtype=c.sample_format,
                blocksize=c.block_frames, callback=self._callback,
            )
            self._stream.start()
        except sd.PortAudioError as e:
            self._close()
            raise DeviceError(f"cannot open {self.device.name!r} for capture: {e}") from None
        self.started_at = clock.now()
        log.info(
            "capturing from [%d] %r: channels %s at %d Hz, %d-frame segments",
            self.device.index, self.device.name, f"{list(self.channels)}" + (
                f" and reference channels {list(self.reference_channels)}" if self.reference_channels else ""),
            c.sample_rate, self.segment_frames,
        )
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        if self._stream is not None:
            try:
                self._stream.abort(ignore_errors=True)
                self._stream.close(ignore_errors=True)
            finally:
                self._stream = None

    def _callback(self, indata, frames, time_info, status) -> None:
        # Runs on PortAudio's thread: copy (PortAudio reuses the buffer), never block.
        # Frames lost while the queue was full travel with the next block queued, so
        # the gap is accounted exactly where it is.
        try:
            self._blocks.put_nowait((indata.copy(), bool(status.input_overflow), self._lost_frames))
            self._lost_frames = 0
        except queue.Full:
            self._lost_frames += frames

    def _next_block(self) -> Optional[tuple[np.ndarray, bool, int]]:
        """The next block from the callback; None once ``stop`` is set."""
        since = time.monotonic()
        while not self.stop.is_set():
            try:
                return self._blocks.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                waited = time.monotonic() - since
            if self._stream is None or not self._stream.active:
                raise DeviceError(f"{self.device.name!r} stopped delivering audio (stream ended).")
            if waited >= self.stall_seconds:
                raise DeviceError(
                    f"{self.device.name!r} delivered no audio for {waited:.1f} s. Check that the "
                    "interface is connected and not in use by another program, then run again."
                )
        return None

    def segments(self, count: Optional[int] = None) -> Iterator[Segment]:
        """Yield ``count`` segments (forever if None) with consecutive sample indices."""
        if self._stream is None:
            raise RuntimeError("DeviceCapture.segments() must be used inside `with DeviceCapture(...)`")
        sr, n = self.config.sample_rate, self.segment_frames
        frame = 0  # index of the next frame to arrive, counted from stream start
        produced = 0
        while count is None or produced < count:
            buf = np.empty((n, self._open_channels), dtype=self.config.sample_format)
            start, filled, overflows, dropped = frame, 0, 0, 0
            while filled < n:
                if self._pending is not None:
                    block, overflow = self._pending, False
                    self._pending = None
                else:
                    item = self._next_block()
                    if item is None:
                        log.info("capture stopped; discarded a partial segment of %d frames", filled)
                        return
                    block, overflow, lost = item
                    overflows += overflow
                    if lost:
                        dropped += lost
                        frame += lost
                        log.warning("capture queue full: %d frames lost (%.2f s)", lost, lost / sr)
                take = min(n - filled, len(block))
                buf[filled:filled + take] = block[:take]
                filled += take
                frame += take
                if take < len(block):
                    self._pending = block[take:]
            produced += 1
            yield Segment(
                audio=np.ascontiguousarray(to_float32(buf[:, self._pick]).T),
                sample_rate=sr,
                start_time=self.started_at + dt.timedelta(seconds=start / sr),
                start_frame=start,
                device=self.device.name,
                channels=self.rows,
                overflows=overflows,
                dropped_frames=dropped,
            )


def file_segments(
    path: Path,
    segment_seconds: float,
    channels: Optional[Sequence[int]] = None,
    *,
    start_time: Optional[dt.datetime] = None,
    realtime: bool = False,
    stop: Optional[threading.Event] = None,
) -> Iterator[Segment]:
    """Replay a multichannel WAV/FLAC file as consecutive Segments.

    A tail shorter than one segment is not yielded (it is logged): every Segment has the
    same length, as from a device. ``start_time`` (UTC) is when the file's first sample
    was recorded; by default the file's modification time minus its duration (when a
    recorder finished writing it). With ``realtime`` segments are released no faster
    than they would arrive from a device.
    """
    import soundfile as sf

    path = Path(path)
    try:
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise StorageError(f"{path}: cannot read as audio ({e}). signalcraft reads WAV and FLAC files.") from None
    with f:
        sr = f.samplerate
        picked = resolve_channels(channels, f.channels, str(path))
        pick = np.array(picked) - 1
        n = round(segment_seconds * sr)
        if f.frames == 0:
            raise StorageError(f"{path}: holds no audio (0 frames).")
        short = re.search(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)", f.extra_info or "")
        if short and int(short[2]) < int(short[1]):
            log.warning("%s: ends before its header says (%s of %s bytes of audio: a truncated copy?); "
                        "processing the %.1f s it holds", path, short[2], short[1], f.frames / sr)
        if f.frames < n:
            log.warning("%s: %.2f s is shorter than one segment (capture.segment_seconds %g): nothing to "
                        "process", path, f.frames / sr, segment_seconds)
        origin = start_time or dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc) - dt.timedelta(
            seconds=f.frames / sr
        )
        t0 = time.monotonic()
        for k in range(f.frames // n):
            if stop is not None and stop.is_set():
                return
            try:
                block = f.read(n, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError, OSError) as e:
                raise StorageError(f"{path}: unreadable from {k * n / sr:.1f} s on ({e}); "
                                   "segments before it were processed.") from None
            if len(block) < n:
                raise StorageError(f"{path}: ends early at {(k * n + len(block)) / sr:.1f} s (truncated file); "
                                   "segments before it were processed.")
            if realtime:
                time.sleep(max(0.0, t0 + (k + 1) * n / sr - time.monotonic()))
            yield Segment(
                audio=np.ascontiguousarray(block[:, pick].T),
                sample_rate=sr,
                start_time=origin + dt.timedelta(seconds=k * n / sr),
                start_frame=k * n,
                device=f"file:{path.name}",
                channels=picked,
            )
        tail = f.frames % n
        if tail and f.frames >= n:
            log.info("%s: last %.2f s is shorter than a segment and was not processed", path, tail / sr)
