"""The record loop: capture -> bounded segment queue -> processing worker -> export."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Callable, Optional

from ..capture import DeviceCapture
from ..chain import ProcessorFactory
from ..config import Config
from .reconnect import device_segments

log = logging.getLogger(__name__)


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
    from ..files import remove_leftovers
    from ..segments.retention import check_free_space

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
    process = make_processor(capture.channels, capture.reference_channels)
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
