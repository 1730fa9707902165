"""The `signalcraft` command line.

Each command loads the configuration, calls one library function and prints its result.
Library errors (``SignalcraftError``) become a one-line message on stderr and the exit
code of their class; see ``errors.ExitCode`` and the README.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

import click

from . import __version__
from .config import ENV_VAR, Config, load_config
from .errors import ExitCode, Interrupted, SignalcraftError

log = logging.getLogger("signalcraft")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """Turn the first SIGINT/SIGTERM into a stop request so the current work finishes
    cleanly; a second signal stops at once. Raises Interrupted afterwards."""
    stop = threading.Event()
    received: list[int] = []

    def handler(signum, frame):
        if received:  # second signal: give up on a clean finish
            raise KeyboardInterrupt
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
            log.error("%s", e)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            log.error("stopped by Ctrl-C")
            ctx.exit(ExitCode.SIGINT)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
    help=f"Configuration file. Default: ${ENV_VAR}, else ./config.yaml, else built-in defaults.",
)
@click.option("--verbose", "-v", count=True, help="Log more detail.")
@click.option("--quiet", "-q", is_flag=True, help="Log only warnings and errors (for cron).")
@click.version_option(__version__, prog_name="signalcraft")
@click.pass_context
def cli(ctx: click.Context, config_path: Optional[Path], verbose: int, quiet: bool) -> None:
    """Listen to pumps, fans and motors and flag the ones that start to sound wrong.

    \b
    Exit codes: 0 success, 1 failure, 2 bad usage or configuration,
    130 stopped by Ctrl-C, 143 stopped by SIGTERM.
    """
    _setup_logging(verbose, quiet)
    ctx.obj = config_path


def _config(ctx: click.Context) -> Config:
    return load_config(ctx.obj)


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
@click.option("--force", is_flag=True, help="Replace existing clips (each old clip is kept as .pt.bak).")
@click.pass_context
def calibrate_noise(ctx: click.Context, seconds: Optional[float], force: bool) -> None:
    """Record the room with the machines OFF and save one noise clip per channel.

    Every channel is checked first: a dead channel (silence or a level below
    noise.dead_rms_dbfs) or clipping rejects the recording and nothing is saved.
    """
    from .noise import calibrate

    config = _config(ctx)
    with _stop_on_signals() as stop:
        saved = calibrate(config, seconds=seconds, force=force, stop=stop)
    for path, lv in saved:
        click.echo(f"{path}  RMS {lv.rms_dbfs:6.1f} dBFS  peak {lv.peak:.3f}")


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
    """
    from . import pipeline

    config = _config(ctx)
    with _stop_on_signals() as stop:
        pipeline.record(
            config, repeat, pipeline.chain_factory(config), stop=stop,
            on_exported=lambda path: click.echo(str(path)),
        )


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.pass_context
def process(ctx: click.Context, files: tuple[Path, ...]) -> None:
    """Run the same processing as `record` over multichannel WAV/FLAC FILES.

    Each file is cut into segments of capture.segment_seconds; a shorter tail at the
    end is skipped. The file's channels are taken to be capture.channels in order (as
    record's audio.flac holds them). A bad file is reported and the others still run;
    the exit code is then 1.
    """
    from . import pipeline

    config = _config(ctx)
    paths = list(files)
    show = sys.stderr.isatty()
    bar = click.progressbar(length=pipeline.count_segments(config, paths), label="segments",
                            file=sys.stderr) if show else contextlib.nullcontext()
    with _stop_on_signals() as stop, bar:
        exported, failed = pipeline.process_files(
            config, paths, stop=stop,
            on_exported=lambda path: None if show else click.echo(str(path)),
            on_segment=(lambda: bar.update(1)) if show else (lambda: None),
            on_error=lambda path, e: log.error("%s", e),
        )
    log.info("%d segments written under %s", len(exported), config.output.dir)
    if failed:
        log.error("%d of %d files failed; the others were processed", failed, len(paths))
        ctx.exit(ExitCode.FAILURE)


def main() -> None:
    cli(prog_name="signalcraft")
