"""Run locks: one `record` per audio device, one `detect` per output folder.

A lock is an ``flock`` on a small file. The kernel releases it when the holding process
ends in any way, SIGKILL and power loss included, so a lock file left behind never
blocks a later run: only a live process holds a lock. The file records who holds it
(pid, command, start time) for the message a second run prints, and is emptied on a
clean exit, so a run that finds it filled in by a dead process knows the previous run
was killed.

Trust model. Device locks live in a folder of the user running the command,
``/run/lock/signalcraft-<uid>/`` (mode 0700; ``<tmp>/signalcraft-<uid>/`` where there is
no /run/lock), so only that user's own runs, and nobody else, can create, hold or
forge them. Runs of the same user exclude each other (cron, systemd and an engineer
over ssh running as the service user, or all as root with sudo). An existing folder is
used only if it is a real folder owned by this user and writable by nobody else;
anything else (made by another user to squat or to plant links) is refused with a
message naming its owner, never repaired. Lock files are opened without following
links and must be regular files owned by this user, so a link planted in the folder
can never make a privileged run truncate or re-mode another file. The output lock
(``OUTPUT/.detect.lock``) is protected by the output folder's own permissions; it is
opened the same way, never through a link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Optional

from . import clock
from .errors import ExitCode, SignalcraftError, StorageError

log = logging.getLogger(__name__)

LOCK_BASE = Path("/run/lock")  # where device lock folders are made (a sticky, world-writable folder)


class LockBusy(SignalcraftError):
    """Another signalcraft run holds the lock; this run did nothing. ``holder`` is what
    the lock file says of it (pid, command, started)."""

    exit_code = ExitCode.BUSY

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def lock_dir() -> Path:
    """This user's folder of device locks: /run/lock/signalcraft-<uid>, or
    <tmp>/signalcraft-<uid> where there is no /run/lock."""
    base = LOCK_BASE if LOCK_BASE.is_dir() else Path(tempfile.gettempdir())
    return base / f"signalcraft-{os.getuid()}"


def _private_folder(folder: Path) -> None:
    """Make ``folder`` (mode 0700) or check that the existing one is this user's own.

    Raises
    ------
    StorageError
        It is a link or not a folder, belongs to another user, or others can write it.
    """
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"{folder}: cannot create the lock folder: {e.strerror}.") from None
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{folder}: the lock folder is {'a link' if stat.S_ISLNK(st.st_mode) else 'not a folder'}; "
                           "signalcraft never follows it. Remove it, then run again.")
    if st.st_uid != os.getuid():
        raise StorageError(f"{folder}: the lock folder belongs to uid {st.st_uid} ({user_name(st.st_uid)}), not to "
                           f"this user (uid {os.getuid()}): someone else made it. signalcraft does not trust it; "
                           "an administrator should check who made it and remove it.")
    if st.st_mode & 0o022:
        raise StorageError(f"{folder}: the lock folder is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                           "signalcraft does not trust it. Remove it (it is made again, mode 700).")


def user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"


def _device_file(device_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_") or "default"
    return f"device-{slug}.lock"


def device_lock_path(device_name: str) -> Path:
    """The lock file of an audio device, by its name."""
    return lock_dir() / _device_file(device_name)


def other_users_holder(device_name: str) -> Optional[tuple[int, dict]]:
    """A live run of another user on this device, as its lock file says: (uid of the
    lock folder's owner, what the file claims), or None. For reports only (`doctor` as
    root): what another user's file says is never trusted to decide anything."""
    me = os.getuid()
    base = lock_dir().parent
    for folder in sorted(base.glob("signalcraft-*")):
        try:
            st = os.lstat(folder)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid == me:
            continue
        found = holder(folder / _device_file(device_name))
        if found is not None:
            return st.st_uid, found
    return None


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
        Lock file, in an existing folder (with ``private``, made if missing).
    what : str
        What the lock protects, for messages, e.g. ``device 'Scarlett 18i20'``.
    command : str
        The command taking it, e.g. ``record``.
    private : bool
        The file is in this user's lock folder (``lock_dir``): the folder and the file
        must be this user's own (see the module docstring).

    Raises
    ------
    LockBusy
        Another live process holds the lock (exit code ``ExitCode.BUSY``).
    StorageError
        The lock file cannot be made, or is not trusted (a link, not a regular file,
        another user's); the message says what to do.
    """

    def __init__(self, path: Path, what: str, command: str, private: bool = False):
        self.path = Path(path)
        self.what = what
        self.command = command
        self.private = private
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        if self.private:
            _private_folder(self.path.parent)
        fd = _open_lock(self.path, self.what, owned=self.private)
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


def _open_lock(path: Path, what: str, owned: bool) -> int:
    """Open (or create) a lock file: never through a link, only a regular file, and with
    ``owned`` only one of this user's. Read-only when it is not writable (flock works
    on a read-only file; who holds it then goes unrecorded)."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        try:
            fd = os.open(path, os.O_RDWR | flags, 0o644)
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | flags, 0o644)
    except OSError as e:
        why = ("it is a link, which signalcraft never follows: remove it" if e.errno == errno.ELOOP
               else f"{e.strerror}. Check the folder's owner and mode")
        raise StorageError(f"{path}: cannot open the lock file for {what}: {why}.") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_nlink != 1:
        problem = "a hard link to another file"
    elif owned and st.st_uid != os.getuid():
        problem = f"owned by uid {st.st_uid} ({user_name(st.st_uid)}), not by this user"
    else:
        problem = None
    if problem:
        os.close(fd)
        raise StorageError(f"{path}: the lock file for {what} is {problem}; signalcraft does not trust it. "
                           "Remove it, then run again.")
    return fd


def holder(path: Path) -> Optional[dict]:
    """Who holds the lock at ``path`` right now (pid, command, started), or None; without
    taking it, so that checking never makes a starting run exit busy."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
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
