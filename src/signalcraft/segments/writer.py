"""Writing a segment so that readers never see part of one.

A segment is assembled in ``<output>/.incomplete/`` and renamed into
``<output>/<YYYY-MM-DD_HH-MM-SS>/`` only once every file and, last of all, its manifest
are written. Two segments that start in the same second get ``_2``, ``_3``... suffixes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import os
import shutil
from pathlib import Path

from ..errors import StorageError
from ..files import save_torch, staging_path, storage_error, write_json
from .layout import AUDIO, MANIFEST, folder_name, room_file, tensor_file
from .manifest import Manifest


class SegmentWriter:
    """Collects one segment's files and publishes them together.

    >>> with SegmentWriter(output_dir, segment.start_time) as w:
    ...     w.save_tensor(0, "pump", tensor)
    ...     final_dir = w.commit(manifest)

    Leaving the block without ``commit`` (an exception, a signal) deletes what was
    written, so nothing partial stays behind.
    """

    def __init__(self, output_dir: Path, start_time: dt.datetime):
        self.output_dir = Path(output_dir)
        self.name = folder_name(start_time)
        self.staging = staging_path(self.output_dir, self.name)
        self.files: list[str] = []

    def __enter__(self) -> "SegmentWriter":
        try:
            self.staging.mkdir(parents=True)
        except OSError as e:
            raise storage_error(self.staging, e) from None
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _path(self, relative: str) -> Path:
        p = self.staging / relative
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(p.parent, e) from None
        self.files.append(relative)
        return p

    def save_tensor(self, mic: int, source: str, tensor) -> Path:
        """Write the tensor of (mic, source); give it its own storage (``clone()`` a
        slice) or the whole underlying buffer is saved."""
        return save_torch(self._path(tensor_file(mic, source)), tensor)

    def save_room(self, mic: int, tensor) -> Path:
        """Write the room tensor of ``mic`` (``save_tensor``'s rules)."""
        return save_torch(self._path(room_file(mic)), tensor)

    def audio_path(self) -> Path:
        """Where to write the segment's audio (``audio.flac``)."""
        return self._path(AUDIO)

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest (with the file list) last, then move the folder into
        place under a free name. Returns the final folder."""
        expected = {tensor_file(m, s) for m, s in manifest.tensor_keys()} | {room_file(m) for m in manifest.room}
        if not expected <= set(self.files):
            raise ValueError(f"the manifest lists tensors that were not written: {sorted(expected - set(self.files))}")
        manifest = dataclasses.replace(manifest, files=tuple(sorted(self.files)))
        write_json(self.staging / MANIFEST, manifest.to_dict())
        for k in range(1, 1000):
            final = self.output_dir / (self.name if k == 1 else f"{self.name}_{k}")
            if final.exists():
                continue
            try:
                os.rename(self.staging, final)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # another process took the name first
                raise storage_error(final, e) from None
            return final
        raise StorageError(f"{self.output_dir}: more than 999 segments start at {self.name}.")
