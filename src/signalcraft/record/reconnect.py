"""Reopening a device that failed mid-run (unplugged, driver error, stalled)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Iterator, Optional

from ..capture import DeviceCapture, Segment, list_input_devices
from ..config import CaptureConfig, Config
from ..errors import ConfigError, DeviceError

log = logging.getLogger(__name__)

MAX_RECONNECT_DELAY_S = 60.0


def device_segments(config: Config, capture: DeviceCapture, stop: threading.Event) -> Iterator[Segment]:
    """Segments from ``capture``; when the device fails (unplugged, PortAudio error,
    stalled), reopen the same device (``_reopen``) after ``capture.reconnect_delay_s``,
    doubling the wait on each failure in a row (at most ``MAX_RECONNECT_DELAY_S``). The
    first segment after a reopening counts the device losses before it in
    ``Segment.reconnects``.

    Raises
    ------
    DeviceError
        More than ``capture.reconnect_attempts`` failures in a row, or the device came
        back with other channels.
    """
    c = config.capture
    rows, opened_name = capture.rows, capture.device.name
    failures = reconnects = 0
    current: Optional[DeviceCapture] = capture
    opened = False  # a device that fails to open at the start is a set-up problem: no retries
    while True:
        streaming = False
        try:
            if current is None:
                current = _reopen(c, opened_name, stop)
                if current.rows != rows:
                    raise DeviceError(f"{current.device.name!r} came back with channels {list(current.rows)} "
                                      f"instead of {list(rows)}; not recording into the same outputs.",
                                      retry=False)
            with current:
                if reconnects:
                    log.warning("%r reopened; capture resumes", current.device.name)
                opened = streaming = True
                for segment in current.segments():
                    failures = 0
                    if reconnects:
                        segment = dataclasses.replace(segment, reconnects=reconnects)
                        reconnects = 0
                    yield segment
            return  # stopped
        except DeviceError as e:
            current = None
            failures += 1
            if not opened or not e.retry:
                raise
            if failures > c.reconnect_attempts:
                if not c.reconnect_attempts:
                    raise
                raise DeviceError(f"{e} Gave up after {failures - 1} attempts to reopen it "
                                  "(capture.reconnect_attempts).") from None
            delay = min(c.reconnect_delay_s * 2.0 ** min(failures - 1, 30), MAX_RECONNECT_DELAY_S)
            log.warning("%s Reopening in %.3g s (attempt %d of %d).", e, delay, failures, c.reconnect_attempts)
            reconnects += streaming  # a loss of a running stream, not a failed reopening
            if stop.wait(delay):
                return


def _reopen(c: CaptureConfig, name: str, stop: threading.Event) -> DeviceCapture:
    """The device that was lost, found again: by its exact name; else, when
    ``capture.device`` is a name, by that (an interface plugged back in may get another
    ALSA card number in its name). Never another device that happens to be the default
    or to have the same index now.

    Raises
    ------
    DeviceError
        It is not back (yet), or comes back with fewer channels than configured.
    """
    import sounddevice as sd

    try:  # PortAudio lists devices once, when it starts: refresh it to see a replugged one
        sd._terminate()  # sounddevice's documented way to do that (no stream may be open)
        sd._initialize()
    except sd.PortAudioError as e:
        raise DeviceError(f"PortAudio could not list the devices again ({e}).") from None
    spec = name if any(d.name == name for d in list_input_devices()) else c.device
    if not isinstance(spec, str):
        raise DeviceError(f"{name!r} is not back.")
    try:
        return DeviceCapture(dataclasses.replace(c, device=spec), stop=stop)
    except ConfigError as e:  # fewer channels than configured: maybe not fully back yet
        raise DeviceError(str(e)) from None
