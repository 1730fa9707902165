"""Getting segments to the chain: the record loop (``loop``), device reconnects
(``reconnect``) and replaying files (``replay``).

Capture never waits for processing: the calling thread assembles segments from the
device and hands each one to a worker thread through a queue of
``pipeline.queue_segments`` segments. If the worker falls that far behind, the newest
segment is dropped with a warning and the drop is counted in the next exported
segment's manifest: never a silent loss.
"""

from .loop import record
from .reconnect import MAX_RECONNECT_DELAY_S, device_segments
from .replay import count_segments, file_channels, process_files, recorded_at

__all__ = ["MAX_RECONNECT_DELAY_S", "count_segments", "device_segments", "file_channels", "process_files",
           "record", "recorded_at"]
