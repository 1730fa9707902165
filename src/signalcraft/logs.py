"""Logging: stderr for the person or cron job that started the command, and a rotating
file (``log.file``) that keeps the history of every run.

``record`` (a long-running service) and ``detect`` (from cron) append to the same file
at once. Python's RotatingFileHandler assumes one writer; ``SharedRotatingFileHandler``
rotates under an ``flock`` and makes a process whose file was rotated by another
reopen the new file, so no run keeps writing into ``signalcraft.log.1``.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import sys
from pathlib import Path
from typing import Optional

from .config import LogConfig

FORMAT = "%(asctime)s %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def setup_stderr(verbose: int, quiet: bool) -> None:
    """Log to stderr: INFO (DEBUG with ``verbose``; WARNING and above when ``quiet``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(handler.level)


def add_file(config: LogConfig) -> Optional[Path]:
    """Also log to ``config.file`` at ``config.level``. Returns the file, or None when
    logging to a file is off or the file cannot be opened (said once on stderr: a log
    file is never a reason for a recording not to run)."""
    if config.file is None:
        return None
    root = logging.getLogger()
    if any(isinstance(h, SharedRotatingFileHandler) and Path(h.baseFilename) == config.file for h in root.handlers):
        return config.file
    try:
        config.file.parent.mkdir(parents=True, exist_ok=True)
        handler = SharedRotatingFileHandler(config.file, max_bytes=round(config.max_mb * 1e6),
                                            backups=config.backups)
    except OSError as e:
        logging.getLogger(__name__).warning("log.file: cannot write %s (%s); logging to stderr only",
                                            config.file, e.strerror)
        return None
    handler.setFormatter(logging.Formatter(FILE_FORMAT, DATE_FORMAT))
    handler.setLevel(config.level)
    root.addHandler(handler)
    root.setLevel(min(h.level for h in root.handlers))
    return config.file


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler that several processes can share (see the module docstring)."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self._identity: Optional[tuple[int, int]] = None
        self._lock_path = f"{path}.lock"
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def _open(self):
        stream = super()._open()
        st = os.fstat(stream.fileno())
        self._identity = (st.st_dev, st.st_ino)
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is not None and self._rotated_elsewhere():
            self.stream.close()
            self.stream = None  # reopened by the next write
        super().emit(record)

    def _rotated_elsewhere(self) -> bool:
        try:
            st = os.stat(self.baseFilename)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._identity

    def doRollover(self) -> None:
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if self._rotated_elsewhere():  # another process rotated first: write to its new file
                if self.stream is not None:
                    self.stream.close()
                self.stream = self._open()
                return
            super().doRollover()
