"""Wiring: capture -> bounded segment queue -> processing worker -> export.

Capture never waits for processing. The calling thread assembles segments from the
device and hands each one to a worker thread through a queue of
``pipeline.queue_segments`` segments. If the worker falls that far behind, the newest
segment is dropped with a warning and the drop is counted in the next exported
segment's manifest: never a silent loss.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from . import __version__
from .capture import DeviceCapture, Segment, list_input_devices
from .config import CaptureConfig, Config
from .errors import ConfigError, DeviceError, NoiseClipError
from .files import atomic_write
from .segments import Level, Manifest, SegmentWriter

log = logging.getLogger(__name__)

# Processes one segment and returns the folder it was exported to. The second argument
# counts segments dropped since the previous one was queued.
Processor = Callable[[Segment, int], Path]
# Builds the processor once the channels to record are known (before capture starts, so
# a missing noise clip or model fails before any audio is lost).
ProcessorFactory = Callable[[tuple[int, ...]], Processor]


def segment_manifest(segment: Segment, dropped_segments: int, **processing) -> Manifest:
    """The manifest of an exported segment: its capture, and ``processing`` (levels,
    denoise, separator, features and tensors: see ``Manifest``)."""
    return Manifest(
        signalcraft_version=__version__,
        start_time_utc=segment.start_time,
        duration_s=segment.duration,
        sample_rate=segment.sample_rate,
        device=segment.device,
        # mic_<N> in the output is channels[N]: N counts from 0 over the recorded channels.
        channels=tuple(segment.channels),
        start_frame=segment.start_frame,
        overflows=segment.overflows,
        dropped_frames=segment.dropped_frames,
        dropped_segments=dropped_segments,
        reconnects=segment.reconnects,
        **processing,
    )


def write_flac(path: Path, segment: Segment, sample_format: str) -> Path:
    """Write a segment's audio losslessly: 16-bit FLAC for 16-bit capture, else 24-bit."""
    import soundfile as sf

    frames = segment.audio.T  # soundfile wants (frames, channels)
    if sample_format == "int16":
        # Exact: capture samples are k / 2**15, so this recovers the integers.
        data, subtype = np.round(frames * 2**15).clip(-(2**15), 2**15 - 1).astype(np.int16), "PCM_16"
    else:
        data, subtype = frames, "PCM_24"
    return atomic_write(
        path, lambda tmp: sf.write(str(tmp), data, segment.sample_rate, subtype=subtype, format="FLAC")
    )


class Chain:
    """The preprocessing chain for one set of channels: per-channel spectral gating,
    separation, a log-mel tensor per (microphone, source), export.

    Parameters
    ----------
    config : Config
    channels : tuple of int
        1-based device channels, in the order of the segments' rows (mic_0 first).
    sample_rate : int
        Hz.
    """

    def __init__(self, config: Config, channels: tuple[int, ...], sample_rate: int):
        from .denoise import Denoiser
        from .features import LogMel
        from .separate import load_separator

        self.config = config
        self.channels = tuple(channels)
        self.sample_rate = sample_rate
        self.noise_clips = self._load_clips() if config.denoise.enabled and config.denoise.stationary else None
        clips = None if self.noise_clips is None else [clip.audio for clip in self.noise_clips]
        self.denoiser = Denoiser(config.denoise, sample_rate, clips) if config.denoise.enabled else None
        self.separator = load_separator(config.separation, sample_rate)
        array = self.separator.info.audio_channels
        if array > 1 and array != len(self.channels):
            from .separate import ModelError

            raise ModelError(
                f"separator {config.separation.model} was trained on an array of {array} microphones, but "
                f"{len(self.channels)} channels are recorded ({list(self.channels)}). Record the channels it was "
                "trained on (capture.channels), or train a model for these with train_separator.array: true."
            )
        self.exports = exported_sources(config, self.separator.sources)
        self.logmel = LogMel(config.features, sample_rate, round(config.capture.segment_seconds * sample_rate))

    def _load_clips(self):
        from .noise import clip_path, load_clip

        clips = []
        for channel in self.channels:
            path = clip_path(self.config.noise.dir, channel)
            clip = load_clip(path)
            if clip.channel != channel:
                raise NoiseClipError(f"{path}: holds channel {clip.channel}, expected channel {channel}. "
                                     "Record it again with `signalcraft calibrate-noise --force`.")
            if clip.sample_rate != self.sample_rate:
                raise NoiseClipError(
                    f"{path}: recorded at {clip.sample_rate} Hz, but the audio is {self.sample_rate} Hz. "
                    "Record the noise again at the capture rate with `signalcraft calibrate-noise --force`."
                )
            clips.append(clip)
        return clips

    @property
    def names(self) -> tuple[str, ...]:
        """What the tensors of a microphone are named, in order: the machines of
        ``separation.assets``, else the separator's sources."""
        return tuple(name for name, _ in self.exports)

    def features(self, audio: np.ndarray) -> "torch.Tensor":
        """float32 audio, shape = (mics, samples) -> log-mel tensor,
        shape = (mics, len(names), n_mels, n_frames), one per exported machine. Does
        not change ``audio``."""
        clean = self.denoiser(audio) if self.denoiser is not None else audio
        sources = self.separator(clean)  # (mics, sources, samples)
        return self.logmel(sources[:, [k for _, k in self.exports]])

    def __call__(self, segment: Segment, dropped_segments: int = 0) -> Path:
        if segment.channels != self.channels or segment.sample_rate != self.sample_rate:
            raise ValueError(f"chain is for channels {self.channels} at {self.sample_rate} Hz, segment has "
                             f"{segment.channels} at {segment.sample_rate} Hz")
        segment, nonfinite = _finite(segment)
        mics = [mic for mic, bad in enumerate(nonfinite) if not bad]  # a tensor never hides a broken channel
        for mic, bad in enumerate(nonfinite):
            if bad:
                log.warning("%s mic_%d (channel %d): %d samples of the segment starting %s are not finite (NaN or "
                            "infinity); its tensors are not exported and the manifest counts them. Check the "
                            "interface or the file.", segment.device, mic, segment.channels[mic], bad,
                            segment.start_time.isoformat())
        mels = self.features(segment.audio)
        with SegmentWriter(self.config.output.dir, segment.start_time) as w:
            for mic in mics:
                for k, name in enumerate(self.names):
                    w.save_tensor(mic, name, mels[mic, k][None].clone())  # clone: only this slice's storage
            if self.config.output.keep_raw:
                write_flac(w.audio_path(), segment, self.config.capture.sample_format)
            return w.commit(self.manifest(segment, dropped_segments, nonfinite, mics))

    def manifest(self, segment: Segment, dropped_segments: int, nonfinite: list[int], mics: list[int]) -> Manifest:
        from .noise import clip_path, levels

        lv = [levels(row, self.config.noise.clip_level) for row in segment.audio]
        return segment_manifest(
            segment, dropped_segments,
            levels=tuple(
                Level(mic=n, channel=c, rms_dbfs=round(v.rms_dbfs, 2) if np.isfinite(v.rms_dbfs) else None,
                      peak=round(v.peak, 6), clipped_fraction=v.clipped_fraction, nonfinite_samples=bad)
                for n, (c, v, bad) in enumerate(zip(segment.channels, lv, nonfinite))
            ),
            denoise=(
                None if self.denoiser is None else {
                    **dataclasses.asdict(self.config.denoise),
                    "noise_clips": None if self.noise_clips is None else [
                        {"file": clip_path(self.config.noise.dir, clip.channel).name, "channel": clip.channel,
                         "device": clip.device, "recorded_at": clip.recorded_at.isoformat()}
                        for clip in self.noise_clips
                    ],
                }
            ),
            separator={**self.separator.info.to_dict(),
                       **({"assets": dict(self.config.separation.assets)} if self.config.separation.assets else {})},
            features=self.logmel.settings(),
            tensors={n: self.names for n in mics},
        )


def exported_sources(config: Config, sources: tuple[str, ...]) -> list[tuple[str, int]]:
    """(name, index of the separator's source) of each tensor a microphone exports.

    Raises
    ------
    ConfigError
        ``separation.assets`` maps a machine to a source the separator does not have.
    """
    assets = config.separation.assets
    if assets is None:
        return [(source, k) for k, source in enumerate(sources)]
    unknown = {asset: source for asset, source in assets.items() if source not in sources}
    if unknown:
        where = config.source or "config"
        raise ConfigError(
            f"{where}: separation.assets: {', '.join(f'{a}: {s}' for a, s in unknown.items())}: "
            f"{'no such source' if len(unknown) == 1 else 'no such sources'} in the separator "
            f"{config.separation.model or '(none: the one source is mix)'}, whose sources are "
            f"{', '.join(sources)}. Map each machine to one of those."
        )
    return [(asset, sources.index(source)) for asset, source in assets.items()]


def _finite(segment: Segment) -> tuple[Segment, list[int]]:
    """The segment with NaN and infinite samples set to 0 (a copy, only if there are
    any), and how many there were per channel."""
    bad = ~np.isfinite(segment.audio)
    counts = [int(n) for n in bad.sum(axis=-1)]
    if not any(counts):
        return segment, counts
    return dataclasses.replace(segment, audio=np.where(bad, np.float32(0), segment.audio)), counts


def chain_factory(config: Config, sample_rate: Optional[int] = None) -> ProcessorFactory:
    """Chains for `record` (capture rate) and `process` (the file's rate)."""
    return lambda channels: Chain(config, channels, sample_rate or config.capture.sample_rate)


def record(
    config: Config,
    repeat: Optional[int],
    make_processor: ProcessorFactory,
    stop: Optional[threading.Event] = None,
    on_exported: Callable[[Path], None] = lambda path: None,
) -> list[Path]:
    """Capture and process segments until ``repeat`` have been processed (until ``stop``
    if 0 or None). A dropped segment does not count, so every drop is recorded in the
    manifest of a later segment.

    Before capture starts, files left by an interrupted earlier run are removed and the
    output disk must have ``output.min_free_gb`` free; it is checked again before each
    segment is queued, and a full disk ends the run cleanly. A device that fails mid-run
    is reopened (``capture.reconnect_attempts``, see ``device_segments``).

    Returns the exported folders in order. When ``stop`` is set the partial segment is
    discarded and every complete one already captured is still processed. An error in
    processing stops capture and is raised here after the worker has finished.

    Raises
    ------
    DeviceError
        The device is missing at the start, or stayed unusable through every reconnect.
    StorageError
        The output disk is below ``output.min_free_gb`` or a write failed.
    """
    from .files import remove_leftovers
    from .segments.retention import check_free_space

    stop = stop or threading.Event()
    remove_leftovers(config.output.dir)
    check_free_space(config.output)
    pending: queue.Queue = queue.Queue(maxsize=config.pipeline.queue_segments)
    exported: list[Path] = []
    failure: list[BaseException] = []

    def work() -> None:
        while (item := pending.get()) is not None:
            if failure:
                continue  # drain after an error so the capture side never blocks
            try:
                path = process(*item)
                exported.append(path)
                on_exported(path)
            except BaseException as e:  # handed to the calling thread
                failure.append(e)
                stop.set()

    capture = DeviceCapture(config.capture, stop=stop)  # a device missing at the start fails here
    process = make_processor(capture.channels)
    worker = threading.Thread(target=work, name="signalcraft-worker", daemon=True)
    worker.start()
    dropped = queued = 0
    segments = device_segments(config, capture, stop)
    try:
        for segment in segments:
            if not worker.is_alive() or failure:
                break
            check_free_space(config.output)
            try:
                pending.put_nowait((segment, dropped))
                dropped = 0
                queued += 1
                if queued == repeat:
                    break
            except queue.Full:
                dropped += 1
                log.warning(
                    "processing is %d segments behind: dropped the segment starting %s "
                    "(%d dropped since the last exported one)",
                    config.pipeline.queue_segments, segment.start_time.isoformat(), dropped,
                )
    finally:
        segments.close()  # closes the stream
        if worker.is_alive():
            pending.put(None)  # the worker drains until it sees this, so this cannot block for long
        worker.join()
    if failure:
        raise failure[0]
    return exported


MAX_RECONNECT_DELAY_S = 60.0


def device_segments(config: Config, capture: DeviceCapture, stop: threading.Event) -> Iterator[Segment]:
    """Segments from ``capture``; when the device fails (unplugged, PortAudio error,
    stalled), reopen the same device (``_reopen``) after ``capture.reconnect_delay_s``,
    doubling the wait on each failure in a row (at most ``MAX_RECONNECT_DELAY_S``). The
    first segment after a reopening counts the device losses before it in
    ``Segment.reconnects``.

    Raises
    ------
    DeviceError
        More than ``capture.reconnect_attempts`` failures in a row, or the device came
        back with other channels.
    """
    c = config.capture
    channels, opened_name = capture.channels, capture.device.name
    failures = reconnects = 0
    current: Optional[DeviceCapture] = capture
    opened = False  # a device that fails to open at the start is a set-up problem: no retries
    while True:
        streaming = False
        try:
            if current is None:
                current = _reopen(c, opened_name, stop)
                if current.channels != channels:
                    raise DeviceError(f"{current.device.name!r} came back with channels {list(current.channels)} "
                                      f"instead of {list(channels)}; not recording into the same outputs.",
                                      retry=False)
            with current:
                if reconnects:
                    log.warning("%r reopened; capture resumes", current.device.name)
                opened = streaming = True
                for segment in current.segments():
                    failures = 0
                    if reconnects:
                        segment = dataclasses.replace(segment, reconnects=reconnects)
                        reconnects = 0
                    yield segment
            return  # stopped
        except DeviceError as e:
            current = None
            failures += 1
            if not opened or not e.retry:
                raise
            if failures > c.reconnect_attempts:
                if not c.reconnect_attempts:
                    raise
                raise DeviceError(f"{e} Gave up after {failures - 1} attempts to reopen it "
                                  "(capture.reconnect_attempts).") from None
            delay = min(c.reconnect_delay_s * 2.0 ** min(failures - 1, 30), MAX_RECONNECT_DELAY_S)
            log.warning("%s Reopening in %.3g s (attempt %d of %d).", e, delay, failures, c.reconnect_attempts)
            reconnects += streaming  # a loss of a running stream, not a failed reopening
            if stop.wait(delay):
                return


def _reopen(c: CaptureConfig, name: str, stop: threading.Event) -> DeviceCapture:
    """The device that was lost, found again: by its exact name; else, when
    ``capture.device`` is a name, by that (an interface plugged back in may get another
    ALSA card number in its name). Never another device that happens to be the default
    or to have the same index now.

    Raises
    ------
    DeviceError
        It is not back (yet), or comes back with fewer channels than configured.
    """
    import sounddevice as sd

    try:  # PortAudio lists devices once, when it starts: refresh it to see a replugged one
        sd._terminate()  # sounddevice's documented way to do that (no stream may be open)
        sd._initialize()
    except sd.PortAudioError as e:
        raise DeviceError(f"PortAudio could not list the devices again ({e}).") from None
    spec = name if any(d.name == name for d in list_input_devices()) else c.device
    if not isinstance(spec, str):
        raise DeviceError(f"{name!r} is not back.")
    try:
        return DeviceCapture(dataclasses.replace(c, device=spec), stop=stop)
    except ConfigError as e:  # fewer channels than configured: maybe not fully back yet
        raise DeviceError(str(e)) from None


def file_channels(config: Config, file_channel_count: int, path: Path) -> tuple[int, ...]:
    """Device channels of a file's channels: the file is taken to hold
    ``capture.channels`` in order (as `record` writes audio.flac), or channels 1..n."""
    configured = config.capture.channels
    if configured is None:
        return tuple(range(1, file_channel_count + 1))
    if len(configured) != file_channel_count:
        raise ConfigError(
            f"{path}: has {file_channel_count} channels but capture.channels lists {len(configured)} "
            f"({list(configured)}). Its channels are taken to be capture.channels in order: make them match."
        )
    return tuple(configured)


def process_files(
    config: Config,
    paths: list[Path],
    stop: Optional[threading.Event] = None,
    on_exported: Callable[[Path], None] = lambda path: None,
    on_segment: Callable[[], None] = lambda: None,
    on_error: Callable[[Path, Exception], None] = lambda path, e: None,
    force: bool = False,
) -> tuple[list[Path], int]:
    """Run the chain over multichannel WAV/FLAC files, cut into segments of
    ``capture.segment_seconds``; a shorter tail at the end of a file is skipped (logged).

    A segment already in the output (a segment of a file of the same name with the same
    start time) is skipped, logged, unless ``force``: processing a file twice would make
    `detect` score it twice. A file that fails (unreadable, wrong channels, ...) is
    reported through ``on_error`` and the others still run. Returns (exported folders,
    number of failed files).
    """
    import soundfile as sf

    from .capture import file_segments
    from .errors import SignalcraftError, StorageError

    stop = stop or threading.Event()
    chains: dict[tuple, Chain] = {}  # by (channels, sample rate): models load once
    exported, failed = [], 0
    done = set() if force else {(s.manifest.device, s.start_time) for s in _stored(config.output.dir)}
    for path in paths:
        if stop.is_set():
            break
        try:
            try:
                info = sf.info(str(path))
            except (sf.LibsndfileError, RuntimeError, OSError) as e:
                raise StorageError(f"{path}: cannot read as audio ({e}).") from None
            channels = file_channels(config, info.channels, path)
            key = (channels, info.samplerate)
            if key not in chains:
                chains[key] = Chain(config, channels, info.samplerate)
            skipped = 0
            for segment in file_segments(path, config.capture.segment_seconds, start_time=recorded_at(path),
                                         stop=stop):
                if (segment.device, segment.start_time) in done:
                    skipped += 1
                    on_segment()
                    continue
                folder = chains[key](dataclasses.replace(segment, channels=channels))
                exported.append(folder)
                on_exported(folder)
                on_segment()
            if skipped:
                log.info("%s: %d segment(s) already in %s, skipped (--force processes them again)", path,
                         skipped, config.output.dir)
        except SignalcraftError as e:
            failed += 1
            on_error(path, e)
        except Exception as e:  # anything unforeseen in one file must not stop the others
            failed += 1
            on_error(path, StorageError(f"{path}: {type(e).__name__}: {e}"))
    return exported, failed


def _stored(output: Path) -> list:
    from .segments import list_segments

    return list_segments(output) if Path(output).is_dir() else []


def recorded_at(path: Path) -> Optional[dt.datetime]:
    """When the first sample of ``path`` was captured, if it is the audio of a segment
    folder (from its manifest); else None (the file's own time is used)."""
    from .segments import AUDIO, ManifestError, read_manifest

    if Path(path).name != AUDIO:
        return None
    try:
        return read_manifest(Path(path).parent).start_time_utc
    except FileNotFoundError:
        return None
    except ManifestError as e:
        log.warning("%s: dating the file by its modification time: %s", path, e)
        return None


def count_segments(config: Config, paths: list[Path]) -> int:
    """Segments that ``process_files`` will export from readable files (for progress)."""
    import soundfile as sf

    total = 0
    for path in paths:
        try:
            info = sf.info(str(path))
        except Exception:
            continue
        total += info.frames // round(config.capture.segment_seconds * info.samplerate)
    return total
