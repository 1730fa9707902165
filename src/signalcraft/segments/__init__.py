"""The on-disk segment store: the one owner of the output folder's layout.

- ``layout``: folder and file names (``<YYYY-MM-DD_HH-MM-SS>/mic_<N>/<source>.pt``).
- ``manifest``: the typed, versioned ``manifest.json``.
- ``writer``: publishing a segment whole (``SegmentWriter``).
- ``reader``: complete segments in one order, and their tensors.
- ``retention``: deleting old segments, the free-space guard.

Every command that reads or writes segments goes through this package.
"""

from .layout import AUDIO, MANIFEST, candidate_names, folder_name, tensor_file
from .manifest import FORMAT, Level, Manifest, ManifestError, manifest_signature, read_manifest
from .reader import (StoredSegment, TensorError, is_complete, list_segments, newest_segment, open_segment,
                     read_tensor)
from .writer import SegmentWriter

__all__ = [
    "AUDIO", "FORMAT", "MANIFEST", "Level", "Manifest", "ManifestError", "SegmentWriter", "StoredSegment",
    "TensorError", "candidate_names", "folder_name", "is_complete", "list_segments", "manifest_signature",
    "newest_segment", "open_segment", "read_manifest", "read_tensor", "tensor_file",
]
