"""`signalcraft doctor`: is this installation ready to run unattended?

Each check returns one line: OK, WARN (works, but worth a look), FAIL (a run would
fail) or SKIP (cannot be checked: it needs what an earlier check could not find, such
as the device's channel count when capture.channels is null). The noise clips are
checked against capture.channels even when the device is missing, so both problems
are named at once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

from .config import Config, load_config
from .errors import SignalcraftError

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"


@dataclasses.dataclass(frozen=True)
class Check:
    """The result of one check."""

    name: str
    status: str  # OK, WARN, FAIL or SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<13} {self.detail}"


class _Context:
    """What the checks learn about the installation as they go."""

    def __init__(self, config: Config, output: Path):
        self.config = config
        self.output = output
        self.device = None  # capture.DeviceInfo once found
        self.channels: Optional[tuple[int, ...]] = None


def run_checks(config_path: Optional[Path], output: Optional[Path] = None) -> Iterator[Check]:
    """Yield one Check per subject: config, PortAudio, device, noise clips, separator,
    detector, disk, log file. With a broken config nothing else can be checked."""
    try:
        config = load_config(config_path)
    except SignalcraftError as e:
        yield Check("config", FAIL, str(e))
        return
    yield Check("config", OK, str(config.source.resolve()) if config.source else "built-in defaults (no config.yaml found)")
    ctx = _Context(config, Path(output) if output is not None else config.output.dir)
    for check in _CHECKS:
        name = check.__name__.removeprefix("_check_").replace("_", " ")
        try:
            status, detail = check(ctx)
        except SignalcraftError as e:
            status, detail = FAIL, str(e)
        except Exception as e:  # a check must never stop the others
            status, detail = FAIL, f"{type(e).__name__}: {e}"
        yield Check(name, status, detail)


def _check_portaudio(ctx: _Context) -> tuple[str, str]:
    from .capture import _sounddevice

    sd = _sounddevice()
    return OK, sd.get_portaudio_version()[1]


def _check_device(ctx: _Context) -> tuple[str, str]:
    from .capture import resolve_channels, resolve_device
    from .locks import device_lock_path, holder, other_users_holder, user_name

    c = ctx.config.capture
    device = resolve_device(c.device)
    ctx.channels = resolve_channels(c.channels, device.max_input_channels, device.name)
    ctx.device = device
    where = f"[{device.index}] {device.name!r}, channels {list(ctx.channels)} of {device.max_input_channels}"
    running = holder(device_lock_path(device.name))  # looked at, not taken: a starting record must not fail
    if running is not None:  # recording now: it cannot be opened twice, and that is fine
        return OK, f"{where}; in use by `signalcraft {running.get('command', '?')}` (pid {running['pid']})"
    other = other_users_holder(device.name) if os.geteuid() == 0 else None  # only root can see into those folders
    if other is not None:
        uid, claims = other
        return OK, (f"{where}; in use by a signalcraft run of user {user_name(uid)} (uid {uid}; its lock file says "
                    f"`{str(claims.get('command', '?'))[:20]}`, pid {claims['pid']}). Device locks are per user: run "
                    "every signalcraft job on this machine as that user")
    import sounddevice as sd

    try:
        sd.check_input_settings(device=device.index, channels=max(ctx.channels), samplerate=c.sample_rate,
                                dtype=c.sample_format)
    except sd.PortAudioError as e:
        return FAIL, (f"{where}: refuses {c.sample_rate} Hz {c.sample_format} ({e}); set capture.sample_rate "
                      "and capture.sample_format to what it supports")
    return OK, f"{where} at {c.sample_rate} Hz {c.sample_format}"


def _check_noise_clips(ctx: _Context) -> tuple[str, str]:
    from .noise import clip_path, load_clip

    d = ctx.config.denoise
    if not d.enabled:
        return OK, "denoising off (denoise.enabled: false): no clips needed"
    if not d.stationary:
        return OK, "non-stationary denoising: no clips needed"
    channels = ctx.channels or ctx.config.capture.channels
    if channels is None:
        return SKIP, "capture.channels is null (all inputs): which clips are needed is known once the device is found"
    problems, other_device = [], []
    for channel in channels:
        path = clip_path(ctx.config.noise.dir, channel)
        if not path.is_file():
            problems.append(f"{path.name} missing")
            continue
        clip = load_clip(path)  # a damaged clip raises NoiseClipError naming it
        if clip.channel != channel:
            problems.append(f"{path.name} holds channel {clip.channel}")
        elif clip.sample_rate != ctx.config.capture.sample_rate:
            problems.append(f"{path.name} is at {clip.sample_rate} Hz, capture at {ctx.config.capture.sample_rate} Hz")
        elif ctx.device is not None and clip.device != ctx.device.name:
            other_device.append(f"{path.name} ({clip.device!r})")
    if problems:
        return FAIL, (f"{ctx.config.noise.dir}: {'; '.join(problems)}. Record them with the machines off: "
                      "`signalcraft calibrate-noise --force`")
    if other_device:
        return WARN, (f"recorded on another device: {', '.join(other_device)}; record them again on this one "
                      "with `signalcraft calibrate-noise --force`")
    return OK, f"{len(channels)} clips in {ctx.config.noise.dir}"


def _check_separator(ctx: _Context) -> tuple[str, str]:
    from .separate import load_separator

    from .pipeline import exported_sources

    separator = load_separator(ctx.config.separation, ctx.config.capture.sample_rate)
    exported = exported_sources(ctx.config, separator.info.sources)  # a wrong asset map fails here
    machines = ("; machines " + ", ".join(f"{name} ({separator.info.sources[k]})" for name, k in exported)
                if ctx.config.separation.assets else "")
    if separator.info.name is None:
        return OK, f"no separation (separation.model: null): one source 'mix' per microphone{machines}"
    mics = separator.info.audio_channels
    if mics > 1 and mics != len(ctx.config.capture.channels):
        return FAIL, (f"{separator.info.file}: an array model for {mics} microphones, but capture.channels has "
                      f"{len(ctx.config.capture.channels)}. Record the microphones it was trained on, or train one "
                      "for this array (train_separator.array).")
    kind = f"array model for {mics} microphones" if mics > 1 else "per microphone"
    return OK, f"{separator.info.file} ({kind}): sources {', '.join(separator.info.sources)}{machines}"


def _check_detector(ctx: _Context) -> tuple[str, str]:
    from .detect.model import load_detector
    from .detect.run import state_path, still_rejected
    from .detect.store import Store
    from .segments import candidate_names, list_segments

    c = ctx.config.detect
    detector = load_detector(c.model) if c.model.exists() else None  # a damaged file raises, naming it
    state = state_path(ctx.config, ctx.output)
    if not state.exists():
        if detector is not None:
            return FAIL, (f"{c.model} is trained but {state} does not exist: `detect` refuses a detector without "
                          f"its thresholds. Run `signalcraft train-detector {ctx.output}`, or move the detector away "
                          "to calibrate from scratch")
        return OK, f"not started: the first `detect` on {ctx.output} starts calibrating"
    names = candidate_names(ctx.output)
    with Store(state, create=False) as store:
        seen = store.counts()["segments"]
        rejected = still_rejected(store, ctx.output, names)
        known = store.scored_folders(among=names) | rejected
        collected = store.calibration_count()
        has_thresholds = store.has_thresholds()
    unusable: list[str] = []
    waiting = len(list_segments(ctx.output, skip=known, on_error=lambda f, e: unusable.append(f.name))) if names else 0
    bad = sorted(set(unusable) | rejected)
    note = (f"; {len(bad)} folders look like segments but have an unusable manifest "
            f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): detect passes them by, the log says why; "
            "move them away once checked") if bad else ""
    if detector is None:
        return WARN if bad else OK, f"calibrating {collected}/{c.calibration_segments}; {waiting} segments waiting " \
                                    f"for `detect`{note}"
    if not has_thresholds:
        return FAIL, (f"{c.model} is trained but {state} holds no thresholds: run `signalcraft train-detector "
                      f"{ctx.output}`")
    backlog = " (is detect running from cron?)" if waiting > 100 else ""
    return WARN if backlog or bad else OK, (f"{c.model.name} ({detector.kind}) trained for "
                                            f"{', '.join(detector.sources)}; {seen} segments seen, {waiting} "
                                            f"waiting for `detect`{backlog}{note}")


def _check_disk(ctx: _Context) -> tuple[str, str]:
    from .segments.retention import free_gb

    o = ctx.config.output
    free = free_gb(ctx.output)
    limits = ", ".join(f"{k} {v:g}" for k, v in (("keep_days", o.keep_days), ("max_gb", o.max_gb)) if v is not None)
    detail = f"{free:.1f} GB free for {ctx.output} (record needs {o.min_free_gb:g})"
    if free < o.min_free_gb:
        return FAIL, detail + ": free space or set output.keep_days / output.max_gb"
    if not limits:
        return WARN, detail + "; no retention set (output.keep_days / output.max_gb): the disk will fill"
    return OK, f"{detail}; retention {limits}"


def _check_log_file(ctx: _Context) -> tuple[str, str]:
    import os
    import tempfile

    path = ctx.config.log.file
    if path is None:
        return OK, "stderr only (log.file: null)"
    # Tried, not asked (os.access says yes to root for files no one can create, as in /proc).
    try:
        if path.exists():
            with open(path, "a", encoding="utf-8"):
                pass
        else:
            folder = next(p for p in path.parents if p.exists())
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".signalcraft-doctor-")
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return FAIL, f"{path}: cannot be written ({e.strerror}); set log.file to a writable place"
    return OK, str(path)


_CHECKS: tuple[Callable[[_Context], tuple[str, str]], ...] = (
    _check_portaudio, _check_device, _check_noise_clips, _check_separator, _check_detector, _check_disk,
    _check_log_file,
)
