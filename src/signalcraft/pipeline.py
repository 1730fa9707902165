"""Wiring: capture -> bounded segment queue -> processing worker -> export.

Capture never waits for processing. The calling thread assembles segments from the
device and hands each one to a worker thread through a queue of
``pipeline.queue_segments`` segments. If the worker falls that far behind, the newest
segment is dropped with a warning and the drop is counted in the next exported
segment's manifest: never a silent loss.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import __version__
from .capture import DeviceCapture, Segment
from .config import Config
from .export import SegmentWriter, atomic_write

log = logging.getLogger(__name__)

# Processes one segment and returns the folder it was exported to. The second argument
# counts segments dropped since the previous one was queued.
Processor = Callable[[Segment, int], Path]


def segment_manifest(segment: Segment, dropped_segments: int) -> dict:
    """What every exported segment records about its capture."""
    local = segment.start_time.astimezone()
    return {
        "format": 1,
        "signalcraft_version": __version__,
        "start_time_utc": segment.start_time.isoformat(),
        "start_time_local": local.isoformat(),
        "duration_s": segment.duration,
        "sample_rate": segment.sample_rate,
        "device": segment.device,
        # mic_<N> in the output is channels[N]: N counts from 0 over the recorded channels.
        "channels": list(segment.channels),
        "start_frame": segment.start_frame,
        "overflows": segment.overflows,
        "dropped_frames": segment.dropped_frames,
        "dropped_segments": dropped_segments,
    }


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


def raw_exporter(config: Config) -> Processor:
    """Processing for `record` before any analysis stage: save each segment as FLAC."""

    def export(segment: Segment, dropped_segments: int) -> Path:
        with SegmentWriter(config.output.dir, segment.start_time) as w:
            write_flac(w.path("audio.flac"), segment, config.capture.sample_format)
            return w.commit(segment_manifest(segment, dropped_segments))

    return export


def record(
    config: Config,
    repeat: Optional[int],
    process: Processor,
    stop: Optional[threading.Event] = None,
    on_exported: Callable[[Path], None] = lambda path: None,
) -> list[Path]:
    """Capture ``repeat`` segments (until ``stop`` if None) and process each one.

    Returns the exported folders in order. When ``stop`` is set the partial segment is
    discarded and every complete one already captured is still processed. An error in
    processing stops capture and is raised here after the worker has finished.
    """
    stop = stop or threading.Event()
    pending: queue.Queue = queue.Queue(maxsize=config.pipeline.queue_segments)
    exported: list[Path] = []
    failure: list[BaseException] = []

    def work() -> None:
        while (item := pending.get()) is not None:
            if failure:
                continue  # drain after an error so the capture side never blocks
            try:
                path = process(*item)
            except BaseException as e:  # handed to the calling thread
                failure.append(e)
                stop.set()
                continue
            exported.append(path)
            on_exported(path)

    worker = threading.Thread(target=work, name="signalcraft-worker", daemon=True)
    worker.start()
    dropped = 0
    try:
        with DeviceCapture(config.capture, stop=stop) as capture:
            for segment in capture.segments(repeat or None):
                try:
                    pending.put_nowait((segment, dropped))
                    dropped = 0
                except queue.Full:
                    dropped += 1
                    log.warning(
                        "processing is %d segments behind: dropped the segment starting %s "
                        "(%d dropped since the last exported one)",
                        config.pipeline.queue_segments, segment.start_time.isoformat(), dropped,
                    )
    finally:
        pending.put(None)  # the worker always drains, so this cannot block for long
        worker.join()
    if failure:
        raise failure[0]
    return exported
