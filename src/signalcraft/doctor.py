"""`signalcraft doctor`: is this installation ready to run unattended, and is it running?

Each check returns one line (a few return one per problem): OK, WARN (works, but worth
a look), FAIL (a run would fail) or SKIP (cannot be checked: it needs what an earlier
check could not find, such as the device's channel count when capture.channels is null,
or what has not happened yet, such as a first segment). A config file with problems
gives one FAIL line per problem and nothing else is checked. The noise clips are
checked against capture.channels even when the device is missing, so both problems
are named at once.

Where a line suggests a command, it carries the ``--config`` that doctor was given, so
it can be pasted as it is.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import shlex
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from . import clock
from .config import Config, ConfigProblems, load_config
from .errors import SignalcraftError, with_config

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"

# The recorder is taken as stopped when its newest segment started longer ago than
# STALE_SEGMENTS segment lengths, and at least STALE_FLOOR_S: the example crontab
# restarts a stopped `record` within 10 minutes, so a shorter gap is not yet a problem.
STALE_SEGMENTS = 3
STALE_FLOOR_S = 15 * 60
# The alarms check reads the detection state of segments that started at most this long
# before the newest segment.
ALARM_WINDOW = dt.timedelta(days=1)


@dataclasses.dataclass(frozen=True)
class Check:
    """The result of one check."""

    name: str
    status: str  # OK, WARN, FAIL or SKIP
    detail: str

    def line(self) -> str:
        """The check as printed: one line, also for a detail of several (an error from
        torch or YAML)."""
        detail = re.sub(r"\s*\n\s*", " ", self.detail.strip())
        return f"{self.status:<4}  {self.name:<13} {detail}"


class _Context:
    """What the checks learn about the installation as they go."""

    def __init__(self, config: Config, output: Path, config_path: Optional[Path]):
        self.config = config
        self.output = output
        self.config_path = config_path  # as given with --config, for the commands suggested
        self.device = None  # capture.DeviceInfo once found
        self.channels: Optional[tuple[int, ...]] = None
        self.newest = None  # segments.StoredSegment: the newest complete segment, once found

    def command(self, *args: str) -> str:
        """A command to suggest, quoted for the message: `signalcraft [--config FILE] ARGS`."""
        return f"`{shlex.join(['signalcraft', *_config_option(self.config_path), *map(str, args)])}`"


def _config_option(config_path: Optional[Path]) -> list[str]:
    return ["--config", str(config_path)] if config_path is not None else []


def run_checks(config_path: Optional[Path], output: Optional[Path] = None) -> Iterator[Check]:
    """Yield a Check per subject: config, PortAudio, device, noise clips, separator,
    recorder, detector, alarms (one per machine in alarm), disk, log file. With a broken
    config nothing else can be checked: one FAIL per problem in it."""
    try:
        config = load_config(config_path)
    except ConfigProblems as e:
        for problem in e.problems:
            yield Check("config", FAIL, problem)
        return
    except SignalcraftError as e:
        yield Check("config", FAIL, str(e))
        return
    yield Check("config", OK, str(config.source.resolve()) if config.source else "built-in defaults (no config.yaml found)")
    ctx = _Context(config, Path(output) if output is not None else config.output.dir, config_path)
    for check in _CHECKS:
        name = check.__name__.removeprefix("_check_").replace("_", " ")
        try:
            results = check(ctx)
        except SignalcraftError as e:
            results = FAIL, with_config(str(e), config_path)
        except Exception as e:  # a check must never stop the others
            results = FAIL, f"{type(e).__name__}: {e}"
        for status, detail in [results] if isinstance(results, tuple) else results:
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
    references = resolve_channels(c.reference_channels, device.max_input_channels, device.name,
                                  "capture.reference_channels") if c.reference_channels else ()
    if c.channels is None:
        ctx.channels = tuple(k for k in range(1, device.max_input_channels + 1) if k not in references)
    else:
        ctx.channels = resolve_channels(c.channels, device.max_input_channels, device.name)
    ctx.device = device
    where = f"[{device.index}] {device.name!r}, channels {list(ctx.channels)} of {device.max_input_channels}"
    if references:
        where += (f", reference channels {list(references)} (the canceller: {ctx.config.reference.method}, "
                  f"{ctx.config.reference.taps} taps)")
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
        sd.check_input_settings(device=device.index, channels=max(ctx.channels + references), samplerate=c.sample_rate,
                                dtype=c.sample_format)
    except sd.PortAudioError as e:
        return FAIL, (f"{where}: refuses {c.sample_rate} Hz {c.sample_format} ({e}); set capture.sample_rate "
                      "and capture.sample_format to what it supports")
    return OK, f"{where} at {c.sample_rate} Hz {c.sample_format}"


def _check_noise_clips(ctx: _Context) -> tuple[str, str]:
    from .noise import clip_path
    from .resources import check_noise_clips

    d = ctx.config.denoise
    references = ctx.config.capture.reference_channels
    need_none = f" (reference channels {list(references)} need none)" if references else ""
    if not d.enabled:
        return OK, "denoising off (denoise.enabled: false): no clips needed" + need_none
    if not d.stationary:
        return OK, "non-stationary denoising: no clips needed" + need_none
    channels = ctx.channels or ctx.config.capture.channels
    if channels is None:
        return SKIP, "capture.channels is null (all inputs): which clips are needed is known once the device is found"
    checked = check_noise_clips(ctx.config, channels, ctx.config.capture.sample_rate,
                                ctx.device.name if ctx.device is not None else None)
    if checked.problems:
        # calibrate-noise records every channel, and replaces a clip already there only with --force.
        existing = any(clip_path(ctx.config.noise.dir, channel).exists() for channel in channels)
        calibrate = ctx.command("calibrate-noise", *(["--force"] if existing else []))
        problems = with_config("; ".join(checked.problems), ctx.config_path)
        return FAIL, f"{ctx.config.noise.dir}: {problems}. Record them with the machines off: {calibrate}"
    if checked.other_device:
        return WARN, (f"recorded on another device: {', '.join(checked.other_device)}; record them again on this one "
                      f"with {ctx.command('calibrate-noise', '--force')}")
    return OK, f"{len(channels)} clips in {ctx.config.noise.dir}{need_none}"


def _check_separator(ctx: _Context) -> tuple[str, str]:
    from .chain import exported_sources
    from .resources import load_separator
    from .separate import load_separator as load_any

    channels = ctx.channels or ctx.config.capture.channels  # None: all inputs of a device not found
    rate = ctx.config.capture.sample_rate
    # The same load and checks as record's (an array model for another number of microphones fails).
    separator = load_separator(ctx.config, len(channels), rate) if channels else load_any(ctx.config.separation, rate)
    exported = exported_sources(ctx.config, separator.info.sources)  # a wrong asset map fails here
    machines = ("; machines " + ", ".join(f"{name} ({separator.info.sources[k]})" for name, k in exported)
                if ctx.config.separation.assets else "")
    if separator.info.name is None:
        return OK, f"no separation (separation.model: null): one source 'mix' per microphone{machines}"
    mics = separator.info.audio_channels
    kind = f"array model for {mics} microphones" if mics > 1 else "per microphone"
    if mics > 1:
        kind += (f", spatial filter {separator.info.spatial_iterations} iterations" if separator.spatial
                 else ", no spatial filter")
    runtime = separator.runtime + (f" {ctx.config.compute.precision}" if separator.runtime == "onnxruntime" else "")
    return OK, (f"{separator.info.file} ({kind}, on {runtime}): sources {', '.join(separator.info.sources)}"
                f"{machines}")


def _check_recorder(ctx: _Context) -> tuple[str, str]:
    """Is `record` producing segments? The age of the newest complete segment against
    max(STALE_SEGMENTS segment lengths, STALE_FLOOR_S)."""
    from .segments import newest_segment

    if not ctx.output.is_dir():
        return SKIP, f"no output folder {ctx.output} yet: {ctx.command('record')} makes it with the first segment"
    ctx.newest = newest_segment(ctx.output)
    log_file = f"; its log is {ctx.config.log.file}" if ctx.config.log.file is not None else ""
    if ctx.newest is None:
        return WARN, (f"no segments yet in {ctx.output}: is {ctx.command('record', '--repeat', '0')} running? Check "
                      f"its service or cron entry{log_file}")
    segment_s = ctx.config.capture.segment_seconds
    limit = recorder_stale_after_s(ctx.config)
    age = (clock.now() - ctx.newest.start_time).total_seconds()
    where = f"newest segment {ctx.newest.name} in {ctx.output}"
    if age > limit:
        return WARN, (f"{where} started {_duration(age)} ago, more than {_duration(limit)} (the longer of "
                      f"{STALE_SEGMENTS} segments of {segment_s:g} s and {_duration(STALE_FLOOR_S)}): the recorder "
                      f"has stopped. Is {ctx.command('record', '--repeat', '0')} running? Check its service or cron "
                      f"entry{log_file}")
    if age < -segment_s:
        return WARN, (f"{where} starts {_duration(-age)} in the future: was the system clock set back? Segments "
                      "are ordered by their start time")
    return OK, f"{where}, started {_duration(max(age, 0))} ago (segments of {segment_s:g} s)"


def recorder_stale_after_s(config: Config) -> float:
    """How old the newest segment may be before the recorder counts as stopped, s."""
    return max(STALE_SEGMENTS * config.capture.segment_seconds, STALE_FLOOR_S)


def _duration(seconds: float) -> str:
    """'42 s', '12 min', '5.5 h', '3.2 days'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


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
                          f"its thresholds. Run {ctx.command('train-detector', ctx.output)}, or move the detector "
                          "away to calibrate from scratch")
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
        return FAIL, (f"{c.model} is trained but {state} holds no thresholds: run "
                      f"{ctx.command('train-detector', ctx.output)}")
    backlog = " (is detect running from cron?)" if waiting > 100 else ""
    runtime = "torch"
    if ctx.config.compute.runtime == "onnxruntime":  # a missing or stale export fails, naming the file
        from .edge.runtime import EdgeScored, OnnxScorer

        onnx = EdgeScored(detector, OnnxScorer(c.model, ctx.config.compute.precision)).onnx
        runtime = (f"onnxruntime {ctx.config.compute.precision} for {len(onnx.sources)} of {len(detector.sources)} "
                   "sources" + (f" ({', '.join(onnx.not_exported)} on their own scorer)" if onnx.not_exported else ""))
    return WARN if backlog or bad else OK, (f"{c.model.name} ({detector.kind}, scoring on {runtime}) trained for "
                                            f"{', '.join(detector.sources)}; {seen} segments seen, {waiting} "
                                            f"waiting for `detect`{backlog}{note}")


def _check_alarms(ctx: _Context) -> Union[tuple[str, str], list[tuple[str, str]]]:
    """The machines WARNING or CRITICAL in their newest scored segment: one WARN each.
    Only the rows of segments from ALARM_WINDOW before the newest segment are read."""
    from .detect import thresholds as th
    from .detect.report import machine_status, stored_rows
    from .detect.run import state_path

    state = state_path(ctx.config, ctx.output)
    if not state.exists():
        return SKIP, f"no detection state yet ({state}): `detect` has not run on {ctx.output}"
    newest = ctx.newest.start_time if ctx.newest is not None else clock.now()
    since = (newest - ALARM_WINDOW).isoformat()
    rows = stored_rows(ctx.config, ctx.output, since)
    machines = machine_status(rows)
    if not machines:
        return SKIP, f"no segment scored since {since[:19]} UTC (calibrating, or `detect` is not running)"
    alarms = [m for m in machines if m.status in (th.WARNING, th.CRITICAL)]
    if not alarms:
        return OK, (f"no machine in alarm ({', '.join(m.source for m in machines)}; newest scored segment "
                    f"{rows[-1].folder})")
    first: dict[str, str] = {}  # per machine, its first scored row in the window: a state since then may be older
    for r in rows:
        if r.status in (th.NORMAL, th.WARNING, th.CRITICAL):
            first.setdefault(r.source, r.start_time)
    report = ctx.command("report", ctx.output)
    return [(WARN, f"{m.source} {m.status}{' (acknowledged)' * m.acknowledged} since {m.since[:19]} UTC"
                   f"{' or earlier' * (m.since == first[m.source])} (mics {','.join(map(str, m.mics))}; newest "
                   f"segment {m.folder}); {report} draws its timeline")
            for m in alarms]


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


def _check_publish(ctx: _Context) -> tuple[str, str]:
    """The broker (a connection is tried: a wrong password or TLS failure is a FAIL, a
    broker out of reach a WARN) and the outbox: messages waiting, the oldest, the last
    error."""
    from .detect.run import state_path
    from .detect.store import Store
    from .publish.mqtt import PublishError, Sender

    m = ctx.config.publish.mqtt
    if m is None:
        return SKIP, "publishing off (publish.mqtt: null)"
    outbox, waiting, last, refused = "no outbox yet", 0, "", False
    state = state_path(ctx.config, ctx.output)
    if state.exists():
        with Store(state, create=False) as store:
            box = store.outbox_status()
            error, error_utc = store.get_meta("publish_last_error"), store.get_meta("publish_last_error_utc")
            refused = bool(store.get_meta("publish_refused_id"))
        waiting = box["waiting"]
        oldest = f", the oldest from {box['oldest_utc'][:19]} UTC" if box["oldest_utc"] else ""
        outbox = f"{waiting} message{'s' * (waiting != 1)} waiting in the outbox{oldest}"
        last = f"; the last attempt ({error_utc[:19]} UTC) failed: {error}" if error else ""
    try:
        with Sender(ctx.config, probe=True):
            pass
    except PublishError as e:
        # Out of reach, the site works on and the outbox waits; refused, it never delivers.
        return (FAIL if e.refused else WARN), f"{str(e).rstrip('.')}; {outbox}"
    send = f"; {ctx.command('publish', '--output', ctx.output)} sends them" if waiting else ""
    detail = (f"{m.host}:{m.port} accepts this site ({'TLS, ' if m.tls else ''}user {m.username or 'none'}); "
              f"{outbox}{send}{last}")
    if refused and error:  # connecting works, but the broker's ACL takes nothing of this site's
        return WARN, detail
    return OK, detail


# Each check returns (status, detail), or a list of them for one line per finding.
_CHECKS: tuple[Callable[[_Context], Union[tuple[str, str], list[tuple[str, str]]]], ...] = (
    _check_portaudio, _check_device, _check_noise_clips, _check_separator, _check_recorder, _check_detector,
    _check_alarms, _check_publish, _check_disk, _check_log_file,
)
