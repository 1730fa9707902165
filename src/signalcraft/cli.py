"""The `signalcraft` command line.

Each command loads the configuration, calls one library function and prints its result.
Library errors (``SignalcraftError``) become a one-line message on stderr and the exit
code of their class; see ``errors.ExitCode`` and the README.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

import click

from . import __version__, logs
from .config import ENV_VAR, Config, load_config
from .errors import ConfigError, ExitCode, Interrupted, SignalcraftError, with_config

log = logging.getLogger("signalcraft")


@dataclasses.dataclass
class _Options:
    """The group's options, for every command."""

    config_path: Optional[Path]
    quiet: bool
    verbose: int = 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """Turn the first SIGINT/SIGTERM into a stop request so the current work finishes
    cleanly; a second signal stops at once. Raises Interrupted afterwards."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum, frame):
        if received:  # second signal: give up on a clean finish
            raise SystemExit(128 + signum)
        received.append(signum)
        stop.set()
        log.warning("%s received: finishing the current segment, then stopping", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if received:
        raise Interrupted(received[0])


class _Group(click.Group):
    """Maps SignalcraftError to its message and exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SignalcraftError as e:
            options = ctx.find_object(_Options)
            if e.exit_code == ExitCode.BUSY:  # names the command holding the lock: as it was typed
                if options is not None and options.quiet:
                    # From cron, a run that finds the previous one still going is routine:
                    # the exit code says so, the log file records it, and no mail is sent.
                    log.info("%s", e)
                else:
                    log.error("%s", e)
            else:  # the commands it suggests, with the --config given
                log.error("%s", with_config(str(e), options.config_path if options is not None else None))
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            log.error("stopped by Ctrl-C")
            ctx.exit(ExitCode.SIGINT)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as e:  # a bug or an unforeseen condition: one line, details at -v
            log.error("internal error: %s: %s (run with -v for the traceback)", type(e).__name__, e)
            log.debug("traceback", exc_info=True)
            ctx.exit(ExitCode.FAILURE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    help=f"Configuration file. Default: ${ENV_VAR}, else ./config.yaml, else built-in defaults.",
)
@click.option("--verbose", "-v", count=True, help="Log more detail.")
@click.option("--quiet", "-q", is_flag=True,
              help="For cron: print nothing unless something is wrong (warnings, errors, "
                   "detect's WARNING/CRITICAL rows); a run that finds another still holding the device or "
                   "output folder exits 5 silently. The log file (log.file) still gets everything.")
@click.version_option(__version__, prog_name="signalcraft")
@click.pass_context
def cli(ctx: click.Context, config_path: Optional[Path], verbose: int, quiet: bool) -> None:
    """Listen to pumps, fans and motors and flag the ones that start to sound wrong.

    \b
    Exit codes: 0 success, 1 failure, 2 bad usage or configuration, 3 detect
    found WARNING, 4 detect found CRITICAL, 5 another run holds the device or
    output folder (this run did nothing), 130 stopped by Ctrl-C, 143 by SIGTERM.
    """
    logs.setup_stderr(verbose, quiet)
    ctx.obj = _Options(config_path, quiet, verbose)


def _config(ctx: click.Context) -> Config:
    """Load the configuration and start logging to its log file (only with a config
    file: log.file is relative to it)."""
    config = load_config(ctx.obj.config_path)
    if config.source is not None:
        logs.add_file(config.log)
    log.debug("signalcraft %s %s (config %s)", __version__, ctx.info_name, config.source or "built-in defaults")
    return config


def _echo(ctx: click.Context, text: str, nl: bool = True) -> None:
    """Print a normal result on stdout; nothing in quiet mode."""
    if not ctx.find_object(_Options).quiet:
        click.echo(text, nl=nl)


def _device_lock(config: Config, command: str):
    """The lock that keeps two runs off one audio device."""
    from .capture import resolve_device
    from .locks import RunLock, device_lock_path

    name = resolve_device(config.capture.device).name
    return RunLock(device_lock_path(name), f"audio device {name!r}", command, private=True)


def _output_lock(output: Path, command: str):
    """The lock that keeps two runs from changing one output folder's detection state."""
    from .locks import RunLock, output_lock_path

    return RunLock(output_lock_path(output), f"output folder {output}", command)


@cli.command()
@click.pass_context
def devices(ctx: click.Context) -> None:
    """List audio input devices; '*' marks the configured one."""
    from .capture import list_input_devices, resolve_device

    config = _config(ctx)
    try:
        chosen = resolve_device(config.capture.device).index
    except SignalcraftError as e:
        chosen = None
        log.warning("%s", e)
    click.echo(f"   {'index':>5}  {'name':<32} {'host API':<12} {'inputs':>6}  {'default rate':>12}")
    for d in list_input_devices():
        mark = "*" if d.index == chosen else " "
        click.echo(
            f" {mark} {d.index:>5}  {d.name:<32} {d.hostapi:<12} {d.max_input_channels:>6}  "
            f"{d.default_samplerate:>9.0f} Hz"
        )


@cli.command("calibrate-noise")
@click.option("--seconds", type=click.FloatRange(min=0.1), help="Length of the recording [default: noise.seconds].")
@click.option("--force", is_flag=True,
              help="Replace existing clips (every old clip is kept as channel_<C>.pt.<time>.bak).")
@click.pass_context
def calibrate_noise(ctx: click.Context, seconds: Optional[float], force: bool) -> None:
    """Record the room with the machines OFF and save one noise clip per channel.

    Every channel is checked first: a dead channel (silence or a level below
    noise.dead_rms_dbfs) or clipping rejects the recording and nothing is saved.

    \b
    Exit codes: 0 clips saved, 1 the recording was rejected or the device failed
    (nothing saved), 2 clips already there without --force or a bad configuration, 5
    another run holds the device.
    """
    from .files import remove_leftovers
    from .noise import calibrate

    config = _config(ctx)
    with _device_lock(config, "calibrate-noise"), _stop_on_signals() as stop:
        remove_leftovers(config.noise.dir)
        saved = calibrate(config, seconds=seconds, force=force, stop=stop)
    for path, lv in saved:
        _echo(ctx, f"{path}  RMS {lv.rms_dbfs:6.1f} dBFS  peak {lv.peak:.3f}")


@cli.command()
@click.option(
    "--repeat", "-n", type=click.IntRange(min=0), default=1, show_default=True,
    help="Segments to capture; 0 runs until stopped.",
)
@click.pass_context
def record(ctx: click.Context, repeat: int) -> None:
    """Capture segments from the configured device and process each one.

    Each segment is denoised per channel with that channel's noise clip, separated
    into one signal per machine, and exported as log-mel tensors to
    output/<YYYY-MM-DD_HH-MM-SS>/mic_<N>/<source>.pt, a folder that appears only when
    complete. Prints each folder as it is written. Ctrl-C or SIGTERM discards the
    partial segment, finishes the captured ones and exits 130 or 143.

    \b
    For unattended use:
    - one `record` per device: a second one exits 5 at once;
    - files left by a killed run are removed at the start;
    - it will not start, and stops cleanly, when the output disk has less than
      output.min_free_gb free (exit 1);
    - a device that fails mid-run is reopened capture.reconnect_attempts times with
      growing waits before giving up (exit 1); completed segments are always kept.

    \b
    Exit codes: 0 done (--repeat reached), 1 failure, 2 bad configuration, 5 another
    record holds the device or output folder, 130 Ctrl-C, 143 SIGTERM.
    """
    from . import chain, record as recording

    config = _config(ctx)
    with _device_lock(config, "record"), _stop_on_signals() as stop:
        recording.record(
            config, repeat, chain.chain_factory(config), stop=stop,
            on_exported=lambda path: _echo(ctx, str(path)),
        )


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Write the segments here instead of output.dir.")
@click.option("--force", is_flag=True, help="Process segments that are already in the output again.")
@click.pass_context
def process(ctx: click.Context, files: tuple[Path, ...], out: Optional[Path], force: bool) -> None:
    """Run the same processing as `record` over multichannel WAV/FLAC FILES.

    Each file is cut into segments of capture.segment_seconds; a shorter tail at the
    end is skipped. The file's channels are taken to be capture.channels in order (as
    record's audio.flac holds them). A segment starts when its first sample was
    recorded: for a segment folder's audio.flac, the start in its manifest; for any
    other file, its modification time less its length (a recorder writes a file to its
    end). A segment already in the output (same file name, same start) is skipped
    unless --force. A bad file is reported and the others still run.

    \b
    Exit codes: 0 every file processed, 1 a file failed (2 when every failure is a
    bad configuration), 130 Ctrl-C, 143 SIGTERM.
    """
    from . import record as recording

    config = _config(ctx)
    if out is not None:
        config = dataclasses.replace(config, output=dataclasses.replace(config.output, dir=out.resolve()))
    paths = list(files)
    show = sys.stderr.isatty()
    bar = click.progressbar(length=recording.count_segments(config, paths), label="segments",
                            file=sys.stderr) if show else contextlib.nullcontext()
    codes = []  # the exit code of each file's error

    def failed_file(path: Path, e: Exception) -> None:
        codes.append(getattr(e, "exit_code", ExitCode.FAILURE))
        log.error("%s", with_config(str(e), ctx.obj.config_path))

    with _stop_on_signals() as stop, bar:
        exported, failed = recording.process_files(
            config, paths, stop=stop,
            on_exported=lambda path: None if show else _echo(ctx, str(path)),
            on_segment=(lambda: bar.update(1)) if show else (lambda: None),
            on_error=failed_file, force=force,
        )
    log.info("%d segments written under %s", len(exported), config.output.dir)
    if failed:
        log.error("%d of %d files failed%s", failed, len(paths),
                  "; the others were processed" if failed < len(paths) else "")
        ctx.exit(codes[0] if len(set(codes)) == 1 else ExitCode.FAILURE)


@cli.command()
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write (made if missing; files of the same name are replaced).")
@click.option("--machines", metavar="TYPE,...",
              help="Machine types: pump, fan, motor, valve; a repeated type is named TYPE_2, TYPE_3. "
                   "'none': the room alone. [default: pump,fan; with --training-set all four]")
@click.option("--mics", type=click.IntRange(min=1),
              help="Microphones, 1 m apart on a line. [default: 4] With --training-set: clips for an array "
                   "separator, each machine alone at every microphone (train_separator.array: true).")
@click.option("--fault", "faults", multiple=True, metavar="NAME:KIND[@START-END]",
              help="Give machine NAME a fault from START to END s (default: the whole clip); "
                   "repeatable. KIND: imbalance, bearing, looseness (rotating machines), "
                   "cavitation (pump), leak (valve).")
@click.option("--snr", metavar="DB",
              help="Power of the machines running normally over the background's at mic 0, dB; "
                   "'none': the background at its fixed level. [default: 0]")
@click.option("--reverb", type=click.FloatRange(min=0, min_open=True), metavar="RT60",
              help="Reverberation time, s, up to 3. [default: none, free field]")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True),
              help="Length of each clip, s, up to 600 (for more, several seeds). [default: 10]")
@click.option("--seed", type=click.IntRange(min=0), help="The same seed writes the same audio. [default: 0]")
@click.option("--unit", type=click.IntRange(min=0),
              help="The installation: scenes and training sets of one unit record the same machines (designs, "
                   "speeds, room), each seed another recording of them; a training set of one unit trains a "
                   "separator for those machines. [default: the seed's own; a training set: every clip "
                   "another machine]")
@click.option("--sample-rate", type=click.IntRange(min=8000), help="Hz. [default: 16000]")
@click.option("--line-hz", type=click.Choice(["50", "60"]),
              help="Mains frequency; motors hum at twice it. [default: 50]")
@click.option("--intermittent", is_flag=True,
              help="Add a noise source that switches on and off by itself (a ventilation fan or "
                   "compressor: drifting tone and broadband noise, +3 dB over a machine at 1 m), 4.5 m "
                   "beyond the end of the microphone line and machine row; not counted in --snr.")
@click.option("--references", type=click.IntRange(min=0), metavar="N",
              help="Reference microphones 0.5 m from the intermittent source (where it would stand "
                   "without --intermittent), recorded as the last N columns of mixture.wav "
                   "(capture.reference_channels). [default: 0]")
@click.option("--training-set", is_flag=True, help="Write separator training data to OUT instead of a scene.")
@click.option("--clips", type=click.IntRange(min=1),
              help="With --training-set: clips per machine type. [default: 20]")
def simulate(out: Path, line_hz: Optional[str], **options) -> None:
    """Write synthetic machines, faults and rooms as heard by a microphone array.

    \b
    One scene: OUT/mixture.wav (one channel per mic, then one per reference mic),
    OUT/stems/<machine>.wav, stems/_background.wav and stems/_intermittent.wav (each
    alone at the mics; they sum to the mic channels of the mixture) and OUT/labels.json
    (positions, speeds, fault times, SNR, the intermittent source's on/off times, which
    columns are mics and which references). WAV files are 32-bit float.
    With --training-set: OUT/<type>/*.wav (one machine alone; mono, or one channel per
    microphone with --mics) and OUT/_noise/*.wav, the layout `train-separator` reads.
    Prints the paths written.

    \b
    Examples:
      signalcraft simulate --out demo --fault pump:bearing@4-10
      signalcraft simulate --out room --machines pump,pump,motor --snr -6 --reverb 0.8
      signalcraft simulate --out fan --intermittent --references 1
      signalcraft simulate --out data --training-set --clips 50 --seed 1
      signalcraft simulate --out mine --training-set --unit 7
      signalcraft simulate --out room --unit 7 --seed 3

    \b
    Exit codes: 0 written, 1 failure (the folder cannot be written), 2 a bad option.
    """
    from . import simulate as sim

    for path in sim.from_options(out, line_hz=float(line_hz) if line_hz else None, **options):
        click.echo(str(path))


@cli.command("train-separator")
@click.argument("data_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue from the checkpoint of an earlier run.")
@click.option("--force", is_flag=True, help="Export the model even if it separates worse than not separating.")
@click.pass_context
def train_separator(ctx: click.Context, data_dir: Path, resume: bool, force: bool) -> None:
    """Train a Demucs separator on isolated recordings of each machine.

    \b
    DATA_DIR/<source>/*.wav|*.flac  one folder per machine type, each holding
                                    recordings of that machine alone; the folder
                                    names become the model's sources (at least 2)
    DATA_DIR/_noise/*.wav           optional room background, mixed in as interference

    `signalcraft simulate --training-set --out DATA_DIR` writes this layout. Settings
    are in the config's train_separator section. A checkpoint is kept in
    <separation.repo>/checkpoints/ after every epoch and on Ctrl-C (resume with
    --resume); the best model by validation SI-SDR is exported to separation.repo as
    NAME-<sha8>.th. Set separation.model to NAME to use it. Uses CUDA when present.
    train_separator.init starts from the weights of a model in separation.repo of the
    same size (e.g. the bundled plant: pump, fan, motor, valve) instead of random ones.
    Training stops after train_separator.max_minutes (50 by default). A model whose
    validation SI-SDR is no better than the unseparated mixtures' is not exported
    (exit 1, the checkpoint kept) unless --force.

    \b
    Exit codes: 0 exported, 1 failure or a model no better than the mixture, 2 bad
    usage or configuration, 130 Ctrl-C (the checkpoint kept; --resume goes on).
    """
    from .training.separator import train_separator as train

    config = _config(ctx)
    with _stop_on_signals() as stop:
        result = train(data_dir, config, resume=resume, stop=stop, force=force)
    click.echo(
        f"{result.model_path}  sources {','.join(result.sources)}  validation SI-SDRi {result.best_si_sdri:.2f} dB  "
        f"({result.steps} steps, {result.seconds / 60:.1f} min; stopped: {result.stopped_because})"
    )


@cli.command()
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
@click.option("--since", metavar="TIMESTAMP",
              help="Also list stored results of segments starting at or after TIMESTAMP: ISO 8601 (UTC "
                   "unless it has an offset) or a segment folder's name (local time).")
@click.pass_context
def detect(ctx: click.Context, output: Path, as_json: bool, as_csv: bool, since: Optional[str]) -> None:
    """Score new segments in OUTPUT and flag machines that sound wrong.

    Scores every complete segment not scored before (state in
    OUTPUT/signalcraft.sqlite, or detect.state). With no trained detector yet, the
    first detect.calibration_segments segments are taken as normal ("calibrating
    37/60"); then the detector trains itself and sets WARNING and CRITICAL levels per
    microphone and machine. WARNING needs detect.alerts.warning_k of the last
    detect.alerts.warning_n segments above the warning level (default 3 of 5: one
    segment above it alone is no alert); CRITICAL needs detect.alerts.k of the last
    detect.alerts.n segments above the critical level, or the CUSUM of small rises
    past detect.alerts.cusum_limit.

    Then applies retention (output.keep_days, output.max_gb) to the segments it has
    finished with; if that fails the alerts still count (exit 3/4, else 1). With
    publish.mqtt set, the results queued for the broker are sent last; a broker that
    is down or refuses is a log line, never this command's exit code (the messages
    wait; see `signalcraft publish`). One `detect` per output folder at a time: a
    second exits 5.

    Prints one row per machine (asset): its state in its newest segment, since when,
    the microphones that flag it and its worst score against its critical level;
    with -v also every (segment, microphone, machine) row, which --json and --csv
    always give. With -q nothing is printed unless a machine is WARNING or CRITICAL
    and not acknowledged (`signalcraft ack`). After `signalcraft maintenance` a
    machine is CALIBRATING until it is refitted on its new segments.

    \b
    Exit codes: 0 all normal (or still calibrating, or every alarm
    acknowledged), 3 WARNING found, 4 CRITICAL found, 5 another detect is
    running on OUTPUT, 1 failure, 2 bad usage or configuration.
    """
    from .clock import parse_time
    from .files import remove_leftovers

    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    config = _config(ctx)
    since_utc = parse_time(since, "--since").isoformat() if since is not None else None  # a typo loses nothing
    with _output_lock(output, "detect"):  # before the heavy imports: a second run exits 5 at once
        from .detect import report
        from .detect.run import detect as run_detect

        remove_leftovers(output)
        remove_leftovers(config.detect.model.parent)
        result = run_detect(config, output)
        try:  # the alerts are stored: a retention problem must not hide them
            _prune(config, output)
            pruned = True
        except SignalcraftError as e:
            log.error("retention: %s", e)
            pruned = False
    _publish_after_detect(config, output)
    rows = result.rows if since_utc is None else report.stored_rows(config, output, since_utc)
    machines = report.machine_status(rows)
    if ctx.obj.quiet:  # acknowledged alarms are silent
        rows = [r for r in rows if r.status in ("WARNING", "CRITICAL") and not r.acknowledged]
    if rows or not ctx.obj.quiet:
        click.echo(report.format_rows(rows, result, "json" if as_json else "csv" if as_csv else "table", machines,
                                      per_tensor=ctx.obj.verbose > 0), nl=False)
    new = machines if since_utc is None else report.machine_status(result.rows)  # this run's segments
    flagged = [m for m in new if m.status != "NORMAL"]
    log.info("detect %s: %d new segments, %d alerts (%d CRITICAL), %d acknowledged, %d corrupt tensors skipped%s",
             output, result.segments, result.anomalies, result.critical, result.acknowledged, result.corrupt,
             f"; {report.format_machines(flagged)}" if flagged else "")
    if result.critical:
        ctx.exit(ExitCode.CRITICAL)
    if result.anomalies:
        ctx.exit(ExitCode.WARNING)
    if not pruned:
        ctx.exit(ExitCode.FAILURE)


# While the oldest waiting message is younger than this, a broker out of reach is logged
# at INFO (the log file, not cron's mail); later, and for a broker that refuses, louder.
QUIET_OUTAGE_S = 3600


def _publish_after_detect(config: Config, output: Path) -> None:
    """Send the outbox after `detect`: a broker problem is a log line, never the exit code."""
    if config.publish.mqtt is None:
        return
    from .locks import LockBusy
    from .publish.mqtt import publish_waiting

    try:
        result = publish_waiting(config, output)
    except LockBusy:
        log.info("publish: another signalcraft is sending the outbox; its messages go with that run")
        return
    except SignalcraftError as e:
        log.error("publish: %s", e)
        return
    except Exception as e:  # whatever the network or the client does, detect's result stands
        log.error("publish: %s: %s (run with -v for the traceback)", type(e).__name__, e)
        log.debug("traceback", exc_info=True)
        return
    if result.error is None:
        log.info("published %d messages to %s:%d", result.sent, config.publish.mqtt.host, config.publish.mqtt.port)
        return
    level = logging.INFO
    if result.refused or result.oldest_age_s > QUIET_OUTAGE_S:
        level = logging.ERROR if result.refused else logging.WARNING
    log.log(level, "publish: %s; %s waiting in the outbox (sent %d)", result.error.rstrip("."),
            _messages(result.waiting), result.sent)


def _messages(n: int) -> str:
    return f"{n} message{'s' * (n != 1)}"


def _prune(config: Config, output: Path, dry_run: bool = False):
    """Retention over OUTPUT: only segments detect has finished with may go."""
    from .detect.run import state_path
    from .detect.store import Store
    from .segments.retention import prune

    if config.output.keep_days is None and config.output.max_gb is None:
        return None
    state = state_path(config, output)
    done: set[str] = set()
    evidence: set[str] = set()
    if state.exists():
        with Store(state) as store:
            evidence = store.evidence_folders()
            done = store.finished_folders() - evidence
    return prune(output, config.output, done, evidence=evidence, dry_run=dry_run)


@cli.command("train-detector")
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--since", metavar="TIMESTAMP",
              help="Train on segments starting at or after TIMESTAMP: ISO 8601 (UTC unless it has an "
                   "offset) or a segment folder's name (local time).")
@click.option("--until", metavar="TIMESTAMP",
              help="Train on segments starting before TIMESTAMP: ISO 8601 (UTC unless it has an offset) or "
                   "a segment folder's name (local time).")
@click.option("--max-segments", type=click.IntRange(min=2), default=600, show_default=True,
              help="Train on at most this many segments, evenly spread over the period (all are held in memory).")
@click.pass_context
def train_detector(ctx: click.Context, output: Path, since: Optional[str], until: Optional[str],
                   max_segments: int) -> None:
    """Train the detector on segments in OUTPUT, taken as normal, and set thresholds.

    Use it to retrain after a change of machines; make sure the segments it trains
    on are of machines running normally (choose the period with --since and --until).
    Segments labelled anomaly are left out, and so are segments that raised an alert
    or scored above the WARNING level unless labelled normal (`signalcraft label`).
    After maintenance of one machine, `signalcraft maintenance` recalibrates it
    alone. The previous detector is kept as <model>.<time>.bak.
    Takes the same lock as `detect` (exit 5 while one runs on OUTPUT).

    \b
    Exit codes: 0 trained, 1 failure (too few segments, a detector that cannot be
    trained: the previous one stays), 2 bad usage or configuration, 5 a detect runs on
    OUTPUT.
    """
    from .clock import parse_time

    config = _config(ctx)
    window = [parse_time(t, option) if t is not None else None for t, option in ((since, "--since"), (until, "--until"))]
    with _output_lock(output, "train-detector"):
        from .detect.run import state_path, train_on_segments, trainable
        from .detect.store import Store
        from .segments import list_segments

        with Store(state_path(config, output)) as store:
            chosen = trainable(store, list_segments(output, since=window[0], until=window[1]))
            train_on_segments(config, output, store, chosen, max_segments=max_segments)
    _echo(ctx, str(config.detect.model))


def _separator_check_audio(config: Config, segments: list):
    """Audio to check the separator's export on, (examples, microphones, samples), and
    whether it is a test signal: the raw audio of up to 4 of ``segments`` where it was
    kept (output.keep_raw), else a seeded test signal (tones in noise). The agreement
    of two runtimes needs no particular sound; the INT8 calibration does."""
    import numpy as np
    import soundfile as sf

    rate = config.capture.sample_rate
    mics = len(config.capture.channels) if config.capture.channels else 1
    kept = []
    for segment in segments[:4]:
        flac = segment.path / "audio.flac"
        if flac.is_file():
            audio, rate = sf.read(flac, dtype="float32", always_2d=True)
            channels = segment.manifest.channels  # the machine microphones' columns come first
            kept.append(audio[:, :len(channels)].T)
    if kept:
        return np.stack([k[:, :min(a.shape[-1] for a in kept)] for k in kept]), False
    rng = np.random.default_rng(0)
    t = np.arange(int(10 * rate)) / rate
    tones = sum(np.sin(2 * np.pi * f * t) for f in (50, 120, 997, 3100))
    return (0.1 * tones + rng.standard_normal((2, mics, t.size))).astype(np.float32), True


@cli.command("export-onnx")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--int8/--no-int8", default=True, show_default=True,
              help="Also write INT8 versions (static quantisation) where something quantises; a separator's only "
                   "when it stays within 20 dB of torch.")
@click.option("--max-segments", type=click.IntRange(min=1), default=32, show_default=True,
              help="Check the detector's export on at most this many of OUTPUT's segments, evenly spread.")
@click.pass_context
def export_onnx(ctx: click.Context, output: Path, int8: bool, max_segments: int) -> None:
    """Export the detector (detect.model) and the separator to ONNX, beside them.

    For `compute.runtime: onnxruntime`. Each source's scoring path and the Demucs
    network are written as .onnx files with a manifest (<name>.onnx.json: checksums,
    feature settings). Every export is run by ONNX Runtime and compared with torch,
    and an FP32 export that disagrees is not written: the detector's on OUTPUT's
    calibration segments (all its segments when it has none), the separator's on the
    raw audio of up to 4 of them (kept with output.keep_raw) or else on a test signal,
    which also calibrates its INT8 version. The largest differences are printed. What
    is not there yet is skipped: before the first detector is trained, export-onnx
    exports the separator alone (`detect` exports the detector it trains). A part that
    is not a network (the online scorer) is named and keeps its own scorer.

    \b
    Exit codes: 0 exported, 1 failed or nothing to export (the message names the file).
    """
    import numpy as np

    from .edge.export import export_detector, export_separator
    from .segments import list_segments

    config = _config(ctx)
    chosen: list = []
    exported = False
    if output.is_dir():
        chosen = list_segments(output)
    if config.detect.model.exists():
        if not output.is_dir():
            raise SignalcraftError(f"{output}: no such output folder to check the detector's export on; give the "
                                   "folder the detector was trained on.")
        with _output_lock(output, "export-onnx"):
            from .detect.model import DetectorError, load_detector
            from .detect.run import state_path
            from .detect.scorers import pooled
            from .detect.store import Store

            calibration = []
            if state_path(config, output).is_file():
                with Store(state_path(config, output), create=False) as store:
                    calibration = [s for s in chosen if store.phase(s.name) == "calibration"]
            chosen = calibration or chosen
            if not chosen:
                raise DetectorError(f"{output}: no segments to check the detector's export on; give the output "
                                    "folder the detector was trained on.")
            keep = np.unique(np.linspace(0, len(chosen) - 1, min(max_segments, len(chosen))).round().astype(int))
            chosen = [chosen[k] for k in keep]
            detector = load_detector(config.detect.model, features=chosen[0].manifest.features)
            report = export_detector(detector, config.detect.model,
                                     pooled([s.load_tensors()[0] for s in chosen]), int8=int8)
        for source, r in report["sources"].items():
            files = ", ".join(f"{p} {e['file']} ({e['bytes'] / 1e6:.2f} MB)" for p, e in r["files"].items())
            diffs = ", ".join(f"{p} {d:.2g}" for p, d in r["max_relative_difference"].items())
            no_int8 = "; no int8: nothing in its graph quantises" if int8 and "int8" not in r["files"] else ""
            _echo(ctx, f"{source}: {files}; largest relative score difference from torch: {diffs}{no_int8}")
        for source, reason in report["not_exported"].items():
            _echo(ctx, f"{source}: not exported: {reason}")
        exported = True
    else:
        _echo(ctx, f"{config.detect.model}: no detector yet, not exported (detect exports the one it trains when "
                   "compute.runtime is onnxruntime)")
    if config.separation.model is not None:
        from .separate import model_file

        path = model_file(config.separation.repo, config.separation.model)
        audio, test_signal = _separator_check_audio(config, chosen)
        sep = export_separator(path, audio, overlap=config.separation.overlap, int8=int8)
        files = ", ".join(f"{p} {e['file']} ({e['bytes'] / 1e6:.2f} MB)" for p, e in sep["files"].items())
        diffs = ", ".join(f"{p} {d:.2g}" for p, d in sep["max_difference_of_rms"].items())
        _echo(ctx, f"separator {config.separation.model}: {files}; largest difference from torch, of the output's "
                   f"RMS: {diffs}" + "".join(f"; {p} not kept: {r}" for p, r in sep["refused"].items())
                   + ("; checked and calibrated on a test signal (no raw audio kept: output.keep_raw)"
                      if test_signal else ""))
        exported = True
    if not exported:
        raise SignalcraftError("nothing to export: no detector yet and no separator (separation.model is null).")


@cli.command()
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dry-run", "-n", is_flag=True, help="List what would be deleted; delete nothing.")
@click.pass_context
def prune(ctx: click.Context, output: Path, dry_run: bool) -> None:
    """Delete the oldest segments in OUTPUT beyond output.keep_days / output.max_gb.

    `detect` does this after every run; use `prune` to apply new limits at once or
    to see what they would delete. Segments `detect` has not scored yet are never
    deleted, nor those with alerts not acknowledged (`ack`) or labelled (`label`),
    nor those collected to recalibrate a machine after its maintenance. Takes the same lock as `detect` (exit 5 while one runs on OUTPUT).

    \b
    Exit codes: 0 done, 1 failure, 2 no retention limit set (output.keep_days,
    output.max_gb) or a bad configuration, 5 a detect runs on OUTPUT.
    """
    config = _config(ctx)
    if config.output.keep_days is None and config.output.max_gb is None:
        raise click.UsageError("no retention limit set: set output.keep_days and/or output.max_gb in the config")
    with _output_lock(output, "prune"):
        result = _prune(config, output, dry_run=dry_run)
    for name in result.deleted:
        _echo(ctx, f"{'would delete' if dry_run else 'deleted'} {output / name}")
    _echo(ctx, f"{len(result.deleted)} segments, {result.freed_bytes / 1e9:.2f} GB"
               f"{' would be' if dry_run else ''} freed; {result.kept_unscored} kept because not scored yet, "
               f"{result.kept_evidence} because their alerts are not acknowledged")


@cli.command()
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the report [default: OUTPUT/report].")
@click.option("--since", metavar="TIMESTAMP",
              help="Only segments starting at or after TIMESTAMP: ISO 8601 (UTC unless it has an offset) or a "
                   "segment folder's name (local time).")
@click.pass_context
def report(ctx: click.Context, output: Path, report_dir: Optional[Path], since: Optional[str]) -> None:
    """Write the HTML report of the detection results in OUTPUT, and print its summary.

    index.html (open it in a browser; it needs only its images/ folder beside it): a
    table with one row per machine (state, since when, microphones in alarm, worst
    score against its CRITICAL level, alerts, acknowledgement, last maintenance), then
    per machine its score timeline on clock time (calibration shaded, maintenance
    marked, alerts as dots, hollow when acknowledged) and the log-mel images (Hz, dB)
    of its worst segment and of a typical NORMAL one. summary.json holds the same
    states for scripts. Reads the state while detect runs.

    \b
    Exit codes: 0 written, 1 failure (no state file, a file that cannot be written), 2
    bad usage or configuration.
    """
    from .clock import parse_time
    from .detect.report import summary_lines, write_report

    config = _config(ctx)
    since_utc = parse_time(since, "--since").isoformat() if since is not None else None
    folder = report_dir or output / "report"
    summary = write_report(config, output, folder, since_utc)
    for line in summary_lines(summary):
        _echo(ctx, line)
    _echo(ctx, f"report: {folder / 'index.html'}")


_OUTPUT_OPTION = click.option(
    "--output", "-o", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Output folder whose detection state to change [default: output.dir].")
_NOTE_OPTION = click.option("--note", "-m", default="", help="Why, for the record (shown in the report).")


@cli.command()
@click.argument("asset")
@_OUTPUT_OPTION
@_NOTE_OPTION
@click.pass_context
def ack(ctx: click.Context, asset: str, output: Optional[Path], note: str) -> None:
    """Acknowledge the alarm of machine ASSET: silent until its state changes.

    Its alerts so far, and those it raises while it stays in the same state, no longer
    count for detect's exit code nor print under -q, and retention may delete their
    segments. A change of state (worse, better, or back to NORMAL) ends the
    acknowledgement. ASSET is a machine's name as detect prints it.

    \b
    Exit codes: 0 acknowledged, 1 not taken (an unknown machine, no alarm to
    acknowledge, no state file yet), 2 bad usage or configuration.
    """
    from .detect.operator import acknowledge

    config = _config(ctx)
    _echo(ctx, acknowledge(config, output or config.output.dir, asset, note))


@cli.command()
@click.argument("segment")
@click.argument("value", metavar="normal|anomaly", type=click.Choice(["normal", "anomaly"]))
@_OUTPUT_OPTION
@_NOTE_OPTION
@click.pass_context
def label(ctx: click.Context, segment: str, value: str, output: Optional[Path], note: str) -> None:
    """Label SEGMENT (a segment folder's name or path) as normal or anomaly.

    normal: a false alarm; `train-detector` trains on it (segments with alerts are
    otherwise left out). anomaly: a confirmed fault; it is never trained on, neither by
    `train-detector` nor by a recalibration after maintenance. A labelled segment's
    alerts are answered, so retention may delete it. A new label replaces the old.

    \b
    Exit codes: 0 labelled, 1 not taken (not a segment this state file has seen, no
    state file yet), 2 bad usage or configuration.
    """
    from .detect.operator import label as label_segment

    config = _config(ctx)
    _echo(ctx, label_segment(config, output or config.output.dir, segment, value, note))


@cli.command()
@click.argument("asset")
@click.option("--note", "-m", required=True, help="What was done (shown in the report).")
@click.option("--at", metavar="TIMESTAMP",
              help="When the machine was back in service [default: now]: ISO 8601 (UTC unless it has an "
                   "offset) or a segment folder's name (local time).")
@_OUTPUT_OPTION
@click.pass_context
def maintenance(ctx: click.Context, asset: str, note: str, at: Optional[str], output: Optional[Path]) -> None:
    """Record maintenance of machine ASSET: detect recalibrates it afterwards.

    Segments starting from --at are of the serviced machine: detect collects its next
    detect.calibration_segments segments (CALIBRATING), refits its model on them alone
    with new WARNING and CRITICAL levels, and then scores it again; the other machines
    are not touched. Ends an acknowledgement of ASSET. The report marks it on the
    timeline.

    \b
    Exit codes: 0 recorded, 1 not taken (an unknown machine, no state file yet), 2 bad
    usage or configuration.
    """
    from .clock import parse_time
    from .detect.operator import maintenance as record_maintenance

    config = _config(ctx)
    when = parse_time(at, "--at") if at is not None else None
    _echo(ctx, record_maintenance(config, output or config.output.dir, asset, note, when))


@cli.command()
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder whose outbox to send [default: output.dir].")
@click.option("--dry-run", "-n", is_flag=True,
              help="Print the waiting messages (topic, then payload), oldest first; send nothing.")
@click.pass_context
def publish(ctx: click.Context, output: Optional[Path], dry_run: bool) -> None:
    """Send the results waiting in the outbox to the MQTT broker (publish.mqtt).

    `detect` queues each machine's scores, its changes of state, acknowledgements and
    maintenance in the outbox of its state file, and sends them after each run; this
    command sends what is still waiting (after the network or the broker was down),
    with a heartbeat of the site, oldest first. A message is marked sent only when the
    broker has acknowledged it. For a cron line of its own, e.g. every 5 minutes.
    Topics and payloads: docs/fleet.md.

    \b
    Exit codes: 0 nothing left waiting, 1 messages still wait (the broker is
    out of reach or refused: the message says why; with -q a broker out of
    reach for less than an hour is only logged), 2 publishing is off
    (publish.mqtt: null) or a bad configuration, 5 another publish or detect
    is sending this outbox.
    """
    from .publish.mqtt import PublishError, publish_waiting, waiting_messages

    config = _config(ctx)
    output = output or config.output.dir
    if config.publish.mqtt is None:
        raise ConfigError(f"{config.source or 'built-in defaults'}: publish.mqtt is null, so nothing is published "
                          "or queued. Set publish.mqtt (host, ...) as docs/fleet.md shows.")
    if dry_run:
        rows = waiting_messages(config, output)
        prefix = config.publish.mqtt.topic_prefix
        for row in rows:
            click.echo(f"{prefix}/{row['topic']}{' (retained)' * bool(row['retain'])}\n  {row['payload']}")
        _echo(ctx, f"{len(rows)} messages waiting; nothing sent (--dry-run)")
        return
    result = publish_waiting(config, output)
    if result.error is not None:
        message = f"{result.error.rstrip('.')}; {_messages(result.waiting)} waiting in the outbox (sent {result.sent})"
        if ctx.obj.quiet and not result.refused and result.oldest_age_s <= QUIET_OUTAGE_S:
            log.info("%s", message)  # a short outage: the log file has it, cron's mail does not
            ctx.exit(ExitCode.FAILURE)
        raise PublishError(message)
    _echo(ctx, f"sent {result.sent} messages to {config.publish.mqtt.host}:{config.publish.mqtt.port}; "
               f"{result.waiting} waiting")


@cli.command()
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder whose detection state to check [default: output.dir].")
@click.pass_context
def doctor(ctx: click.Context, output: Optional[Path]) -> None:
    """Check that everything a cron run needs is in place and running, one line per check.

    \b
    Checks: the config (one FAIL line per problem in it), PortAudio, the capture
    device and its channels, the noise clips (present, readable, for these channels
    and rate), the separator model, the recorder (WARN when the newest segment
    started longer ago than 3 segment lengths or 15 minutes, whichever is longer),
    the detector and its state, the machines in alarm (a WARN line for each machine
    WARNING or CRITICAL in its newest scored segment of the last day), the MQTT broker
    and the outbox (with publish.mqtt: FAIL when the broker refuses this site, WARN
    when it is out of reach), free disk and retention, the log file.
    OK: fine. WARN: works, but worth a look. FAIL: a run would fail. SKIP: cannot
    be checked without what a check above could not find, or nothing to check yet.
    With -q only WARN and FAIL lines are printed. Suggested commands carry the
    --config given here.
    Exit code: 0 if nothing FAILed, else 1.
    """
    from .doctor import FAIL, OK, SKIP, run_checks

    failed = 0
    for check in run_checks(ctx.obj.config_path, output):
        if not (ctx.obj.quiet and check.status in (OK, SKIP)):
            click.echo(check.line())
        failed += check.status == FAIL
    if failed:
        log.error("%d check(s) failed", failed)
        ctx.exit(ExitCode.FAILURE)


def main() -> None:
    cli(prog_name="signalcraft")
