"""Crash-safe file writing, shared by every part of signalcraft that writes a file.

A file is written under a temporary name beside its final one and renamed into place
once flushed, so a reader sees the old file or the new one, never half of one. A unit
of several files (a segment) is assembled in a hidden ``.incomplete/`` folder and
renamed into place whole.

Temporary names carry the writer's pid (``.<name>.<pid>.<hex>.tmp`` beside a file,
``.incomplete/<name>.<pid>.<hex>/`` for a unit), so that ``remove_leftovers`` can
delete what a killed process left behind without touching a live writer's files.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable

from . import clock
from .errors import StorageError

log = logging.getLogger(__name__)

STAGING = ".incomplete"
# Writing one file or one segment takes seconds: a temporary name this old has no live
# writer, even if its pid (reused after a reboot) belongs to some process now.
LEFTOVER_AGE_S = 6 * 3600

_TMP_FILE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")
_STAGING_ENTRY = re.compile(r"^.+\.(\d+)\.[0-9a-f]{8}$")


def tag() -> str:
    """``<pid>.<hex8>``: the part of a temporary name that ``remove_leftovers`` reads."""
    return f"{os.getpid()}.{uuid.uuid4().hex[:8]}"


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path``, hidden and tagged with this process's pid, in
    the pattern ``remove_leftovers`` clears once the process is gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag()}.tmp")


def staging_path(folder: Path, name: str) -> Path:
    """A private folder name in ``folder``'s staging area for assembling ``name``."""
    return Path(folder) / STAGING / f"{name}.{tag()}"


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, data: Any) -> Path:
    """Atomically write ``data`` as indented UTF-8 JSON (strict JSON: a NaN or infinity
    in ``data`` is a ValueError, never written)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def storage_error(path: Path, e: OSError) -> StorageError:
    """A StorageError for ``e`` that names ``path`` and says what to do."""
    if e.errno == errno.ENOSPC:
        hint = "the disk is full: free space or move output.dir to a larger disk, then run again"
    elif e.errno == errno.EFBIG:
        hint = "file too large: over this process's file-size limit (ulimit -f) or the filesystem's"
    elif e.errno == errno.EROFS:
        hint = "the filesystem is read-only (mounted read-only, or remounted after disk errors): check the disk"
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = "no permission to write there: check the folder's owner and mode"
    else:
        hint = e.strerror or str(e)
    return StorageError(f"{path}: cannot write: {hint}.")


def load_failure(e: BaseException) -> str:
    """Why ``torch.load`` could not read a file, for a message that names it: the kind of
    error and, where it says something about the file, torch's first sentence. Never
    torch's advice to load with ``weights_only=False``: that would run whatever code a
    crafted file holds."""
    first = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else ""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in first or isinstance(e, (KeyError, EOFError)):
        first = "damaged, truncated, of another kind, or holding objects other than plain data"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, FIFO or device)
    of at most ``max_bytes``: for files that are not trusted, so that a planted link
    cannot point the read elsewhere, a FIFO cannot hang it and ``/dev/zero`` cannot fill
    the memory.

    Raises
    ------
    FileNotFoundError
        There is no such file.
    OSError
        Anything else; ``strerror`` says what (a link, not a regular file, too large).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a link, which is not followed", str(path)) from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, more than the {max_bytes} expected", str(path))
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"more than the {max_bytes} bytes expected", str(path))
    return data


def remove_leftovers(folder: Path) -> int:
    """Delete the temporary files and staged units in ``folder`` (and its
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
    now = clock.timestamp()
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


def backup_path(path: Path) -> Path:
    """A free name for the backup of the file at ``path``, by when it was replaced:
    ``<name>.<YYYYmmdd-HHMMSS>.bak`` (local time), so no backup is ever overwritten."""
    stamp = clock.now().astimezone().strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        candidate = path.with_name(f"{path.name}.{stamp}{'' if k == 1 else f'_{k}'}.bak")
        if not candidate.exists():
            return candidate
    raise StorageError(f"{path}: more than 999 backups made in one second; remove some.")


def keep_backup(path: Path) -> Path | None:
    """Keep the file at ``path`` as ``backup_path(path)`` (a hard link, else a copy) and
    return it; None if there is no file. The file itself stays where it is, to be
    replaced atomically."""
    if not path.exists():
        return None
    backup = backup_path(path)
    try:
        try:
            os.link(path, backup)
        except OSError:  # a file system without hard links
            shutil.copy2(path, backup)
    except OSError as e:
        raise storage_error(backup, e) from None
    return backup
