"""Run locks: one `record` per audio device, one `detect` per output folder.

Device locks live in one folder for the whole machine (``lock_dir``), so a recorder
started by systemd and an engineer's `calibrate-noise` over ssh, as another user or
with sudo, still exclude each other. Output locks live in the output folder.

A lock is an ``flock`` on a small file. The kernel releases it when the holding process
ends in any way, SIGKILL and power loss included, so a lock file left behind never
blocks a later run: only a live process holds a lock. The file records who holds it
(pid, command, start time) for the message a second run prints, and is emptied on a
clean exit, so a run that finds it filled in by a dead process knows the previous run
was killed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Optional

from . import clock
from .errors import ExitCode, SignalcraftError, StorageError

log = logging.getLogger(__name__)


class LockBusy(SignalcraftError):
    """Another signalcraft run holds the lock; this run did nothing. ``holder`` is what
    the lock file says of it (pid, command, started)."""

    exit_code = ExitCode.BUSY

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def lock_dir() -> Path:
    """The machine-wide folder of device locks, the same for every user and session
    (cron, systemd, an engineer over ssh, sudo): /run/lock/signalcraft, or
    <tmp>/signalcraft-locks where there is no /run/lock."""
    base = Path("/run/lock")
    return base / "signalcraft" if base.is_dir() else Path(tempfile.gettempdir()) / "signalcraft-locks"


def _shared_folder(folder: Path) -> None:
    """Make ``folder`` so that every user can lock in it (mode 1777, like /tmp)."""
    if folder.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(folder, 0o1777)
    except OSError:
        pass  # made by another user meanwhile: theirs to set


def device_lock_path(device_name: str) -> Path:
    """The lock file of an audio device, by its name."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_") or "default"
    return lock_dir() / f"device-{slug}.lock"


def output_lock_path(output_dir: Path) -> Path:
    """The lock file `detect` (and everything that changes detection state) takes."""
    return Path(output_dir) / ".detect.lock"


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Hold an exclusive lock on ``path`` for the duration of a ``with`` block.

    Parameters
    ----------
    path : Path
        Lock file; its folder is made if missing.
    what : str
        What the lock protects, for messages, e.g. ``device 'Scarlett 18i20'``.
    command : str
        The command taking it, e.g. ``record``.

    Raises
    ------
    LockBusy
        Another live process holds the lock (exit code ``ExitCode.BUSY``).
    StorageError
        The lock file cannot be made.
    """

    def __init__(self, path: Path, what: str, command: str, shared: bool = False):
        self.path = Path(path)
        self.what = what
        self.command = command
        self.shared = shared  # other users must be able to take it too (device locks)
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            if self.shared:
                _shared_folder(self.path.parent)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if self.shared:
                with contextlib.suppress(OSError):  # only the creator may; umask would narrow it
                    os.fchmod(fd, 0o666)
        except OSError as e:
            raise StorageError(f"{self.path}: cannot create the lock file for {self.what}: "
                               f"{e.strerror}. Check the folder's owner and mode.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StorageError(f"{self.path}: cannot lock: {e.strerror}.") from None
            raise LockBusy(
                f"{self.what} is in use by another `signalcraft {holder.get('command', '?')}` "
                f"(pid {holder.get('pid', '?')}, started {holder.get('started', '?')}). "
                f"This run did nothing. Wait for that run to end, or stop it (lock file {self.path}).",
                holder,
            ) from None
        previous = _read_holder(fd)  # filled in only if its run did not end cleanly
        if previous.get("pid"):
            log.warning("the previous `signalcraft %s` on %s (pid %s, started %s) did not finish cleanly "
                        "(killed or crashed); starting clean", previous.get("command", "?"), self.what,
                        previous["pid"], previous.get("started", "?"))
        holder = {"pid": os.getpid(), "command": self.command,
                  "started": clock.now().astimezone().isoformat(timespec="seconds")}
        # Who holds it is for messages only; the flock is the lock. On a full disk (when
        # `prune` must still run) or a read-only lock file, it goes unrecorded.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # a clean end: nothing for the next run to report
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def holder(path: Path) -> Optional[dict]:
    """Who holds the lock at ``path`` right now (pid, command, started), or None; without
    taking it, so that checking never makes a starting run exit busy."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        found = _read_holder(fd)
    finally:
        os.close(fd)
    pid = found.get("pid")
    return found if isinstance(pid, int) and pid_alive(pid) else None


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
