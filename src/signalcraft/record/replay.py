"""Replaying multichannel WAV/FLAC files through the chain (`signalcraft process`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from pathlib import Path
from typing import Callable, Optional

from ..chain import Chain
from ..config import Config
from ..errors import ConfigError

log = logging.getLogger(__name__)


def file_channels(config: Config, file_channel_count: int, path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(microphone channels, reference channels) of a file's channels, in the file's
    order: the file is taken to hold ``capture.channels`` then
    ``capture.reference_channels`` (as `record` writes audio.flac); with
    ``capture.channels`` null, every channel of the file that is not a reference is a
    microphone.

    Raises
    ------
    ConfigError
        The file has another number of channels than the configuration lists.
    """
    c = config.capture
    references = tuple(c.reference_channels)
    if c.channels is None:
        if any(r > file_channel_count for r in references):
            raise ConfigError(f"{path}: has {file_channel_count} channels, but capture.reference_channels lists "
                              f"{list(references)}.")
        mics = tuple(k for k in range(1, file_channel_count + 1) if k not in references)
        if not mics:
            raise ConfigError(f"{path}: every channel is a reference channel; no microphone to process.")
        return mics, references
    if len(c.channels) + len(references) != file_channel_count:
        listed = f"capture.channels lists {len(c.channels)} ({list(c.channels)})"
        if references:
            listed += f" and capture.reference_channels {len(references)} ({list(references)})"
        raise ConfigError(
            f"{path}: has {file_channel_count} channels but {listed}. Its channels are taken to be "
            "capture.channels, then capture.reference_channels, in order: make them match."
        )
    return tuple(c.channels), references


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

    from ..capture import file_segments
    from ..errors import SignalcraftError, StorageError

    stop = stop or threading.Event()
    chains: dict[tuple, Chain] = {}  # by (channels, references, sample rate): models load once
    unusable: dict[tuple, tuple[Path, SignalcraftError]] = {}  # no chain for that layout: the first file's error
    exported, failed = [], 0
    done = set() if force else {(s.manifest.device, s.start_time) for s in _stored(config.output.dir)}
    for path in paths:
        if stop.is_set():
            break
        try:
            if not Path(path).is_file():
                raise StorageError(f"{path}: no such file." if not Path(path).exists() else
                                   f"{path}: not a file.")
            try:
                info = sf.info(str(path))
            except (sf.LibsndfileError, RuntimeError, OSError) as e:
                raise StorageError(f"{path}: cannot read as audio ({e}).") from None
            channels, references = file_channels(config, info.channels, path)
            key = (channels, references, info.samplerate)
            if key in unusable:  # said once, for the first file of that layout
                first, error = unusable[key]
                same = SignalcraftError(f"{path}: not processed: {first} failed to set up the same way (above)")
                same.exit_code = error.exit_code
                raise same
            if key not in chains:
                try:
                    chains[key] = Chain(config, channels, info.samplerate, references)
                except SignalcraftError as e:
                    unusable[key] = (path, e)
                    raise
            skipped = 0
            for segment in file_segments(path, config.capture.segment_seconds, start_time=recorded_at(path),
                                         stop=stop):
                if (segment.device, segment.start_time) in done:
                    skipped += 1
                    on_segment()
                    continue
                folder = chains[key](dataclasses.replace(segment, channels=channels + references))
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
    from ..segments import list_segments

    return list_segments(output) if Path(output).is_dir() else []


def recorded_at(path: Path) -> Optional[dt.datetime]:
    """When the first sample of ``path`` was captured, if it is the audio of a segment
    folder (from its manifest); else None (the file's own time is used)."""
    from ..segments import AUDIO, ManifestError, read_manifest

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
