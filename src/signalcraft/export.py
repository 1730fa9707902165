"""Output layout and crash-safe writes.

A segment is assembled in ``<output>/.incomplete/`` and renamed into
``<output>/<YYYY-MM-DD_HH-MM-SS>/`` (local time of its first sample) only once every file
and, last of all, ``manifest.json`` are written. Readers therefore never see a partial
segment: a folder without a manifest is not a segment. Two segments that start in the
same second get ``_2``, ``_3``... suffixes.

Temporary names carry the writer's pid (``.<name>.<pid>.<hex>.tmp`` beside a file,
``.incomplete/<name>.<pid>.<hex>/`` for a segment), so that ``remove_leftovers`` can
delete what a killed process left behind without touching a live writer's files.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .errors import StorageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGING = ".incomplete"
FOLDER_FORMAT = "%Y-%m-%d_%H-%M-%S"


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path``, hidden and tagged with this process's pid, in
    the pattern ``remove_leftovers`` clears once the process is gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` by calling ``write(tmp)`` on a temporary name beside it, flushing it
    to disk and renaming it into place. On any error the temporary file is removed and
    ``path`` is untouched.

    Raises
    ------
    StorageError
        The disk is full or the folder is not writable; the message names the file.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise storage_error(path, e) from None
        raise
    return path


def save_torch(path: Path, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically. It is serialised in memory and
    written by Python, because torch's own file writer reports a full disk as an
    unrelated RuntimeError; this way it is a StorageError that says so."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, data: Any) -> Path:
    """Atomically write ``data`` as indented UTF-8 JSON."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def storage_error(path: Path, e: OSError) -> StorageError:
    """A StorageError for ``e`` that names ``path`` and says what to do."""
    if e.errno == errno.ENOSPC:
        hint = "the disk is full: free space or move output.dir to a larger disk, then run again"
    elif e.errno == errno.EFBIG:
        hint = "file too large: over this process's file-size limit (ulimit -f) or the filesystem's"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "no permission to write there: check the folder's owner and mode"
    else:
        hint = e.strerror or str(e)
    return StorageError(f"{path}: cannot write: {hint}.")


def folder_name(start_time: dt.datetime) -> str:
    """Folder name for a segment: its start in local time, ``YYYY-MM-DD_HH-MM-SS``."""
    return start_time.astimezone().strftime(FOLDER_FORMAT)


class SegmentWriter:
    """Collects one segment's files and publishes them together.

    >>> with SegmentWriter(output_dir, segment.start_time) as w:
    ...     write_something(w.path("mic_0/mix.pt"))
    ...     final_dir = w.commit(manifest)

    Leaving the block without ``commit`` (an exception, a signal) deletes what was
    written, so nothing partial stays behind.
    """

    def __init__(self, output_dir: Path, start_time: dt.datetime):
        self.output_dir = Path(output_dir)
        self.name = folder_name(start_time)
        self.staging = self.output_dir / STAGING / f"{self.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.files: list[str] = []

    def __enter__(self) -> "SegmentWriter":
        try:
            self.staging.mkdir(parents=True)
        except OSError as e:
            raise storage_error(self.staging, e) from None
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, relative: str) -> Path:
        """Where to write ``relative`` (e.g. ``mic_0/mix.pt``); parent folders are made.
        The file is listed in the manifest."""
        p = self.staging / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(relative)
        return p

    def commit(self, manifest: dict) -> Path:
        """Write ``manifest.json`` (with the file list) last, then move the folder into
        place under a free name. Returns the final folder."""
        write_json(self.staging / MANIFEST, {**manifest, "files": sorted(self.files)})
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


_TMP_FILE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")
_STAGING_ENTRY = re.compile(r"^.+\.(\d+)\.[0-9a-f]{8}$")
# Writing one file or one segment takes seconds: a temporary name this old has no live
# writer, even if its pid (reused after a reboot) belongs to some process now.
LEFTOVER_AGE_S = 6 * 3600


def remove_leftovers(folder: Path) -> int:
    """Delete the temporary files and staged segments in ``folder`` (and its
    ``.incomplete/``) whose writing process no longer runs, or that are older than
    ``LEFTOVER_AGE_S``: what a SIGKILL, a crash or a power cut left behind. Files of
    live processes are left alone. Returns how many entries were removed (each is
    logged)."""
    from .locks import pid_alive

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    candidates = [(p, _TMP_FILE) for p in folder.glob(".*.tmp")]
    staging = folder / STAGING
    if staging.is_dir():
        candidates += [(p, _STAGING_ENTRY) for p in staging.iterdir()]
    now = time.time()
    for path, pattern in candidates:
        match = pattern.match(path.name)
        if match is None:
            continue
        try:
            fresh = now - path.lstat().st_mtime < LEFTOVER_AGE_S
        except FileNotFoundError:
            continue
        if fresh and pid_alive(int(match[1])):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another run cleaned it first
        except OSError as e:
            log.warning("%s: left by an interrupted run, but cannot be removed: %s", path, e.strerror)
            continue
        log.info("removed %s, left by an interrupted run", path)
        removed += 1
    return removed


def is_complete(folder: Path) -> bool:
    """True for a published segment folder (it has a manifest)."""
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    """The manifest of a segment folder."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StorageError(f"{path}: cannot read segment manifest ({e}).") from None
