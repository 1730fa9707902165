"""One exception hierarchy for signalcraft.

Library code raises these; only ``cli.py`` prints them and exits. Every message says what
was wrong, where (file, key or device) and what to do about it. Each class carries the
process exit code that ``cli.py`` uses for it.
"""

from __future__ import annotations

import enum
import re
import shlex
from pathlib import Path
from typing import Optional


class ExitCode(enum.IntEnum):
    """Process exit codes, documented in the README."""

    OK = 0
    FAILURE = 1  # a run-time failure: device, disk, corrupt file
    USAGE = 2  # bad command line or configuration (click uses 2 for usage errors too)
    WARNING = 3  # detect ran fine and found WARNING segments (no CRITICAL)
    CRITICAL = 4  # detect ran fine and found CRITICAL segments
    BUSY = 5  # another run holds the device or output folder; this run did nothing
    SIGINT = 130  # stopped by Ctrl-C (128 + SIGINT)
    SIGTERM = 143  # stopped by SIGTERM (128 + SIGTERM), e.g. by systemd or kill


class SignalcraftError(Exception):
    """Base of every error signalcraft reports to the user."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(SignalcraftError):
    """The configuration file or a command-line value is wrong."""

    exit_code = ExitCode.USAGE


class DeviceError(SignalcraftError):
    """An audio device is missing, refuses the settings, or stopped delivering audio.

    ``retry`` is False when reopening the device cannot help (it came back with other
    channels than the run records).
    """

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


class NoiseClipError(SignalcraftError):
    """A noise clip is missing, corrupt, or failed its level checks. ``problem``: what
    is wrong with one clip, without what to do (for a message about several clips)."""

    def __init__(self, message: str, problem: Optional[str] = None):
        super().__init__(message)
        self.problem = problem


class StorageError(SignalcraftError):
    """A file could not be read or written (missing, corrupt, disk full, permissions)."""


class Interrupted(SignalcraftError):
    """The run was stopped by a signal; completed work is kept."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = ExitCode(128 + signum) if 128 + signum in ExitCode._value2member_map_ else ExitCode.FAILURE


def with_config(message: str, config_path: Optional[Path]) -> str:
    """``message`` (an error raised by the library, which suggests commands as
    `signalcraft ARGS`) with ``--config config_path`` in each suggested command, so that
    a user who copies it acts on the configuration they gave; unchanged without one."""
    if config_path is None:
        return message
    option = shlex.join(["--config", str(config_path)])
    # A function, not a replacement string: a backslash in the path is no escape.
    return re.sub(r"`signalcraft (?!--config)", lambda m: f"`signalcraft {option} ", message)
