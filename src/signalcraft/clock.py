"""The one clock of signalcraft.

Everything that compares with "now" (retention age, the age of leftovers, stored
timestamps, capture start times, ``--since``) asks this module, never ``datetime.now``
or ``time.time`` directly, so that a test can set the time (``frozen``) or run the
whole process with the clock moved (``faketime``) and see the same behaviour on any
date.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Callable, Iterator

_source: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)


def now() -> dt.datetime:
    """The current time, an aware UTC datetime."""
    return _source()


def now_iso() -> str:
    """The current time as the state database and the manifests store it (ISO 8601, UTC)."""
    return now().isoformat()


def timestamp() -> float:
    """The current time as seconds since the epoch (to compare with file times)."""
    return now().timestamp()


@contextlib.contextmanager
def frozen(at: dt.datetime) -> Iterator[dt.datetime]:
    """Within the block, ``now()`` is ``at`` (aware; a naive one is taken as local time)."""
    global _source
    if at.tzinfo is None:
        at = at.astimezone()
    at = at.astimezone(dt.timezone.utc)
    previous, _source = _source, (lambda: at)
    try:
        yield at
    finally:
        _source = previous


FOLDER_TIME = "%Y-%m-%d_%H-%M-%S"  # a segment folder's name: its start, local time


def parse_time(text: str, option: str) -> dt.datetime:
    """A time given to ``option`` (e.g. ``--since``), as an aware UTC datetime: ISO 8601
    (UTC if it has no offset), or a segment folder's name ``YYYY-MM-DD_HH-MM-SS``
    (local time, as folders are named).

    Raises
    ------
    ConfigError
        Neither; the message names the option and gives examples.
    """
    from .errors import ConfigError

    try:
        t = dt.datetime.strptime(text, FOLDER_TIME).astimezone()  # naive: this machine's local time
    except ValueError:
        try:
            t = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"{option} {text!r}: not an ISO 8601 time (e.g. 2026-11-21T08:00:00+00:00; UTC "
                              "without an offset) nor a segment folder's name (e.g. 2026-11-21_09-00-00, local "
                              "time)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc)
