"""Soak test: `signalcraft record` for 10 minutes of real-time input, `detect` every minute.

A JACK server with the dummy backend paces audio in real time, as a sound card does. A
JACK client loops a simulated four-microphone plant room (`signalcraft simulate`: a
pump, a fan and a motor in factory background) into the input ports PortAudio opens
for signalcraft, which runs unchanged as separate processes, as a user would:

1. `signalcraft calibrate-noise` while the client plays the scene's background stem
   alone (the room with the machines off), through the same JACK path;
2. `signalcraft record --repeat N` on the full mixture: denoise, the bundled `plant`
   separator, log-mels, export (with `output.keep_raw`, so the audio can be checked);
3. `signalcraft detect OUTPUT --json` every minute while recording, as cron would (a
   minute is skipped while the previous run still goes, as `flock -n` in a crontab
   would; ``--overlap`` starts it anyway and lets detect's own lock answer), and once
   more after `record` ends. With ``detect.calibration_segments`` small, the detector
   calibrates, trains itself and then scores within the soak.

Measured: the resident memory (RSS) of the `record` process, sampled all along: when
its first segment appears (models loaded) and its growth from the minute after that to
the last minute of capture; lost frames, both from the manifests (start_frame
continuity, overflows, dropped frames and segments) and by matching the kept audio
frame by frame against the looped scene (played on a 16-bit grid, captured as float32
and kept as 24-bit FLAC, so every frame compares exactly); JACK xruns; segments
exported against expected, and handled by `detect` (its SQLite state); every `detect`
run's exit code and time. Runs of 10 minutes or more write the "soak" section of
docs/benchmarks.md; shorter ones are trials and only print. The exit code is 0 when
the target is met, 1 when not.

Needs jackd2 and JACK-Client: `bash scripts/setup.sh --bench` installs both
(`bash scripts/soak.sh` runs it first).

    python scripts/soak.py [--minutes 10] [--calibration-segments 6] [--overlap] [--no-denoise] [--no-decode] [--keep]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

from bench_capture import PERIOD, SAMPLE_RATE
from benchlib import ROOT, write_section

from signalcraft.segments import AUDIO, candidate_names, is_complete, list_segments

CHANNELS = 4  # microphones in the scene, JACK capture ports, recorded channels
SEGMENT_SECONDS = 10.0
SEGMENT_FRAMES = round(SEGMENT_SECONDS * SAMPLE_RATE)
MACHINES = ("pump", "fan", "motor")  # all sources of the bundled `plant` separator but the valve
SCENE_SECONDS = 60.0  # the scene is looped: one minute of distinct audio
SCENE_SEED = 7
DETECT_EVERY_S = 60.0
POLL_S = 0.25  # how often the soak samples the RSS of `record` and looks for new segments
# Default detect.calibration_segments: one minute of calibration (the first detect run
# sees it all), then the detector trains itself and scores the rest. The cold start
# grows with the segments (about 2 minutes for 60 x 4 microphones x 4 sources with the
# default ensemble scorer): 6 keeps it a small part of a 10-minute soak. The smallest
# allowed is 5.
CALIBRATION_SEGMENTS = 6
REPORT_MINUTES = 10.0  # shorter runs are trials: printed, not written to the report
RSS_TARGET_MB = 50.0
START_SLACK = 8 * PERIOD  # frames at the start of the stream in which the source may still be patching in
FULL_SCALE = 2**15  # the scene is played on a 16-bit grid: k / 2**15 is exact in float32 and 24-bit FLAC
DETECT_OK = (0, 3, 4)  # exit codes of a detect run that worked (3, 4: it found anomalies)
EXIT_BUSY = 5  # another run held the output folder (signalcraft's run locks)


# ---------------------------------------------------------------------------- the source


class LoopPlayer:
    """A JACK client that loops multichannel audio into every capture client's inputs.

    Whenever a client other than the server's ``system`` registers at least CHANNELS
    audio inputs (PortAudio does so when signalcraft opens the device), the player
    connects out_1..out_N to them in name order and removes any other source, so the
    stream hears the loop from its first cycle on. ``play()`` swaps what is looped; the
    new audio starts from its first frame at the next JACK cycle.
    """

    def __init__(self, name: str = "signalcraft-soak"):
        import jack

        self.name = name
        self.client = jack.Client(name, no_start_server=True)
        self.outs = [self.client.outports.register(f"out_{c + 1}") for c in range(CHANNELS)]
        self._loop: Optional[np.ndarray] = None  # float32 (CHANNELS, frames); None: silence
        self._next: Optional[np.ndarray] = None
        self._pos = 0
        self.xruns = 0  # xruns the server reported while the player was active
        self._registered = threading.Event()
        self._closing = threading.Event()
        self.client.set_process_callback(self._process)
        self.client.set_xrun_callback(self._xrun)
        self.client.set_port_registration_callback(lambda port, register: self._registered.set(),
                                                   only_available=False)
        self._watcher = threading.Thread(target=self._patch_loop, daemon=True)

    def start(self) -> None:
        self.client.activate()
        self._watcher.start()

    def close(self) -> None:
        self._closing.set()
        self._registered.set()
        self.client.deactivate()
        self.client.close()

    def play(self, audio: Optional[np.ndarray]) -> None:
        """Loop ``audio`` (float32, shape = (CHANNELS, frames)) from its start; None: silence."""
        self._next = audio if audio is not None else np.zeros((CHANNELS, PERIOD), np.float32)

    def _xrun(self, delay_usecs: float) -> None:
        self.xruns += 1

    def _process(self, frames: int) -> None:
        # JACK's process thread: no allocation beyond the block, never block.
        if self._next is not None:
            self._loop, self._next, self._pos = self._next, None, 0
        if self._loop is None:
            for port in self.outs:
                port.get_array().fill(0.0)
            return
        n = self._loop.shape[1]
        idx = (self._pos + np.arange(frames)) % n
        block = self._loop[:, idx]
        for port, row in zip(self.outs, block):
            port.get_array()[:] = row
        self._pos = (self._pos + frames) % n

    def _patch_port(self, out, port) -> Optional[str]:
        """Make ``out`` the only source of ``port``; the error, if that failed."""
        try:
            sources = [s.name for s in self.client.get_all_connections(port)]
            for source in sources:
                if source != out.name:
                    self.client.disconnect(source, port)
            if out.name not in sources:
                self.client.connect(out, port)
        except Exception as e:  # the port went away (its process ended), or JACK refused
            return f"{port.name}: {e}"
        return None

    def _wanted(self) -> list[tuple]:
        """(out, input port) pairs: out_1..out_N to the first N inputs, in name order, of
        each client other than the server and the player that has at least N inputs."""
        by_client = collections.defaultdict(list)
        for p in self.client.get_ports(is_input=True, is_audio=True):
            owner = p.name.split(":", 1)[0]
            if owner not in ("system", self.name):
                by_client[owner].append(p)
        return [(out, port) for ins in by_client.values() if len(ins) >= CHANNELS
                for out, port in zip(self.outs, sorted(ins, key=lambda p: p.name)[:CHANNELS])]

    def _patched(self, out, port) -> bool:
        try:
            return [s.name for s in self.client.get_all_connections(port)] == [out.name]
        except Exception:
            return False

    def _patch_loop(self) -> None:
        """Keep every capture client patched to the outputs: at once when ports appear,
        and checked every 0.1 s, since PortAudio connects the server's capture ports when
        its stream starts, possibly after we patched, and a connection may fail."""
        while not self._closing.is_set():
            self._registered.wait(timeout=0.1)
            self._registered.clear()
            if self._closing.is_set():
                return
            try:
                todo = [(out, port) for out, port in self._wanted() if not self._patched(out, port)]
            except Exception as e:  # a port vanished while listing: look again
                print(f"soak: patching: {e}", file=sys.stderr)
                continue
            if not todo:
                continue
            # One thread per port: one after the other, the channels started up to three
            # periods apart; together they start in the same cycle.
            errors: list[Optional[str]] = [None] * len(todo)

            def patch(i: int, out, port) -> None:
                errors[i] = self._patch_port(out, port)

            threads = [threading.Thread(target=patch, args=(i, out, port)) for i, (out, port) in enumerate(todo)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for error in filter(None, errors):
                print(f"soak: patching (retried): {error}", file=sys.stderr)


def start_jack(server: str, log: Path) -> subprocess.Popen:
    """A JACK dummy server named ``server`` pacing CHANNELS capture ports in real time."""
    with open(log, "w") as out:
        return subprocess.Popen(
            ["jackd", "--no-realtime", "-n", server, "-d", "dummy", "-r", str(SAMPLE_RATE), "-p", str(PERIOD),
             "-w", str(round(PERIOD / SAMPLE_RATE * 1e6)), "-C", str(CHANNELS), "-P", str(CHANNELS)],
            stdout=out, stderr=subprocess.STDOUT,
        )


def open_player(server_proc: subprocess.Popen, timeout: float = 15.0) -> LoopPlayer:
    """The player, once the server accepts clients."""
    import jack

    deadline = time.monotonic() + timeout
    jack.set_error_function(lambda message: None)  # "cannot connect" until the server is up
    try:
        while True:
            try:
                return LoopPlayer()
            except jack.JackOpenError:
                if server_proc.poll() is not None:
                    raise RuntimeError(f"jackd exited with code {server_proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("the JACK server did not accept clients") from None
                time.sleep(0.2)
    finally:
        jack.set_error_function(None)


def render_scene(work: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mixture, background) of the simulated room, float32 (CHANNELS, frames),
    rounded to the 16-bit grid so that captured frames compare exactly."""
    scene = work / "scene"
    subprocess.run([sys.executable, "-m", "signalcraft", "-q", "simulate", "--out", str(scene),
                    "--machines", ",".join(MACHINES), "--mics", str(CHANNELS), "--seconds", f"{SCENE_SECONDS:g}",
                    "--seed", str(SCENE_SEED)], check=True, stdout=subprocess.DEVNULL)

    def grid(path: Path) -> np.ndarray:
        audio = sf.read(path, dtype="float32", always_2d=True)[0].T
        return (np.clip(np.round(audio * FULL_SCALE), -FULL_SCALE, FULL_SCALE - 1) / FULL_SCALE).astype(np.float32)

    return grid(scene / "mixture.wav"), grid(scene / "stems" / "_background.wav")


# ------------------------------------------------------------------------- measurements


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) of a live process; {} once it has gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a live process, s."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def frames_as_int64(audio: np.ndarray) -> np.ndarray:
    """One int64 per frame from float32 (CHANNELS, frames) on the 16-bit grid: the
    four 16-bit samples packed, so frames compare as single numbers."""
    ints = np.round(audio.T * FULL_SCALE).astype(np.int16)
    return np.ascontiguousarray(ints).view(np.int64).ravel()


def match_stream(captured: np.ndarray, loop: np.ndarray, window: int = 64) -> dict[str, int]:
    """Follow the captured frames through the looped source, frame by frame.

    Parameters
    ----------
    captured, loop : np.ndarray
        int64 frames (``frames_as_int64``) of the kept audio, all segments in order, and
        of what the player loops.

    Returns counts: ``before_source`` (at the start, before every channel was patched
    in: silence, then possibly a few periods with only some channels), ``kept``
    (frames that follow the previous one in the source), ``discontinuities``, ``lost``
    (source frames skipped at forward jumps), ``repeated`` (frames replayed at backward
    jumps), ``silent`` (silence inside the stream), ``unmatched`` (frames found nowhere
    in the source).
    """
    n_loop, n = len(loop), len(captured)
    counts = dict.fromkeys(("before_source", "kept", "discontinuities", "lost", "repeated", "silent",
                            "unmatched"), 0)

    def locate(i: int) -> Optional[int]:
        """Source position of captured[i:i + window], or None."""
        w = captured[i:i + window]
        for p in np.flatnonzero(loop == w[0]):
            idx = (p + np.arange(len(w))) % n_loop
            if np.array_equal(loop[idx], w):
                return int(p)
        return None

    nonzero = np.flatnonzero(captured != 0)
    if nonzero.size == 0:
        counts["before_source"] = n
        return counts
    i, pos = int(nonzero[0]), None
    for i in range(i, min(n, i + START_SLACK)):
        pos = locate(i)
        if pos is not None:
            break
    else:
        i = int(nonzero[0])  # not found: counted below as unmatched
    counts["before_source"] = i
    while i < n:
        if pos is None:  # find the source again: skip silence fast, anything else frame by frame
            if captured[i] == 0:
                end = i + int(np.argmax(captured[i:] != 0)) if np.any(captured[i:] != 0) else n
                counts["silent"] += end - i
                i = end
            else:
                counts["unmatched"] += 1
                i += 1
            pos = locate(i) if i < n else None
            continue
        chunk = min(SEGMENT_FRAMES, n - i)
        expected = loop[(pos + np.arange(chunk)) % n_loop]
        bad = np.flatnonzero(captured[i:i + chunk] != expected)
        step = chunk if bad.size == 0 else int(bad[0])
        counts["kept"] += step
        i += step
        pos = (pos + step) % n_loop
        if bad.size:
            found = locate(i)
            if found is not None:
                counts["discontinuities"] += 1
                jump = (found - pos) % n_loop
                if jump <= n_loop // 2:
                    counts["lost"] += jump
                else:
                    counts["repeated"] += n_loop - jump
            pos = found
    return counts


def read_state(state: Path) -> dict:
    """Segments and scores in detect's SQLite state, read-only."""
    if not state.exists():
        return {"folders": set(), "phases": {}, "statuses": {}, "alerts": {}}
    db = sqlite3.connect(f"file:{state}?mode=ro", uri=True)
    try:
        return {
            "folders": {r[0] for r in db.execute("SELECT folder FROM segments")},
            "phases": dict(db.execute("SELECT phase, COUNT(*) FROM segments GROUP BY phase").fetchall()),
            "statuses": dict(db.execute("SELECT status, COUNT(*) FROM scores GROUP BY status").fetchall()),
            "alerts": dict(db.execute("SELECT status, COUNT(*) FROM alerts GROUP BY status").fetchall()),
        }
    finally:
        db.close()


# ------------------------------------------------------------------------------- the run


class DetectRun:
    """One `signalcraft detect OUTPUT --json` process and what it reported."""

    def __init__(self, cmd: list[str], env: dict, work: Path, index: int, began: float):
        self.index = index
        self.at = time.monotonic() - began  # s since record started
        self.started = time.monotonic()
        self.out_path = work / f"detect-{index:03d}.json"
        self.err_path = work / f"detect-{index:03d}.log"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        self.seconds: Optional[float] = None
        self.rc: Optional[int] = None
        self.peak_rss_kb = 0
        self.result: dict = {}

    def poll(self) -> bool:
        """True once finished (and its result read)."""
        self.peak_rss_kb = max(self.peak_rss_kb, proc_status(self.proc.pid).get("VmRSS", 0))
        if self.proc.poll() is None:
            return False
        if self.rc is None:
            self.rc = self.proc.returncode
            self.seconds = time.monotonic() - self.started
            try:
                self.result = json.loads(self.out_path.read_text())
            except (OSError, ValueError):
                self.result = {}
        return True

    def error_tail(self) -> str:
        lines = self.err_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""


def signalcraft_cmd(config: Path, *args: str, quiet: bool = True) -> list[str]:
    return [sys.executable, "-m", "signalcraft", *(["-q"] if quiet else []), "--config", str(config), *args]


def write_config(work: Path, denoise: bool, calibration_segments: int) -> Path:
    """The soak's configuration: the JACK device through PortAudio, the bundled separator."""
    path = work / "config.yaml"
    path.write_text(
        "# Written by scripts/soak.py.\n"
        "capture:\n"
        "  device: system              # PortAudio's JACK host API device\n"
        f"  channels: [{', '.join(str(c + 1) for c in range(CHANNELS))}]\n"
        "  sample_format: float32      # JACK's native format\n"
        f"  segment_seconds: {SEGMENT_SECONDS}\n"
        f"  block_frames: {PERIOD}\n"
        "noise:\n  dir: noise_samples\n"
        f"denoise:\n  enabled: {'true' if denoise else 'false'}\n"
        f"separation:\n  repo: {ROOT / 'models' / 'separator'}\n  model: plant\n"
        f"detect:\n  calibration_segments: {calibration_segments}\n  model: detector.pt\n"
        "output:\n  dir: output\n  keep_raw: true\n"
    )
    return path


def soak(args: argparse.Namespace, work: Path, children: list) -> dict:
    """Run everything; returns the measurements."""
    segments = int(round(args.minutes * 60 / SEGMENT_SECONDS))
    server_name = f"sc-soak-{os.getpid()}"
    env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1", "JACK_DEFAULT_SERVER": server_name}
    os.environ.update(env)
    m: dict = {"segments_expected": segments}

    print(f"soak: rendering the scene ({SCENE_SECONDS:g} s, {', '.join(MACHINES)}, {CHANNELS} mics)", flush=True)
    mixture, background = render_scene(work)
    config = write_config(work, denoise=not args.no_denoise, calibration_segments=args.calibration_segments)

    server = start_jack(server_name, work / "jackd.log")
    children.append(server)
    player = open_player(server)
    children.append(player)
    player.start()

    if not args.no_denoise:
        print("soak: calibrate-noise with the background alone", flush=True)
        player.play(background)
        t = time.monotonic()
        rc = subprocess.run(signalcraft_cmd(config, "calibrate-noise"), env=env).returncode
        m["calibrate_rc"], m["calibrate_s"] = rc, time.monotonic() - t
        if rc != 0:
            raise RuntimeError(f"signalcraft calibrate-noise failed with exit code {rc}")
        m["noise_leading_zeros"] = noise_leading_zeros(work / "noise_samples")

    print(f"soak: record --repeat {segments} ({args.minutes:g} min), detect every {DETECT_EVERY_S:g} s",
          flush=True)
    player.play(mixture)
    xruns_before = player.xruns
    output = work / "output"
    began = time.monotonic()
    with open(work / "record.out", "w") as out, open(work / "record.log", "w") as err:
        # -q as from cron: record.log gets warnings and errors only.
        record = subprocess.Popen(signalcraft_cmd(config, "record", "--repeat", str(segments)), env=env,
                                  stdout=out, stderr=err)
    children.append(record)
    # Segments are noticed in the output folder (published folders with a manifest), not
    # from record's stdout, which -q keeps quiet.
    exported: list[tuple[float, str, int]] = []  # (s since start, folder, VmRSS kB) per segment
    rss_series: list[tuple[float, int]] = []  # (s since start, VmRSS kB), every poll
    # Not -q: in quiet mode detect prints only anomalies, and the soak wants every row.
    cmd = signalcraft_cmd(config, "detect", str(output), "--json", quiet=False)
    runs: list[DetectRun] = []
    running: list[DetectRun] = []
    skipped = 0  # minute ticks skipped because the previous run was still going
    peak_rss = 0
    record_cpu = None
    next_detect = began + DETECT_EVERY_S
    while record.poll() is None:
        status = proc_status(record.pid)
        now = time.monotonic() - began
        if status:
            peak_rss = max(peak_rss, status.get("VmHWM", 0))
            rss_series.append((now, status["VmRSS"]))
            record_cpu = cpu_seconds(record.pid) or record_cpu
        for folder in new_segments(output, {e[1] for e in exported}):
            exported.append((now, folder, status.get("VmRSS", 0)))
            print(f"soak: {len(exported):3d}/{segments} at {now:6.1f} s  RSS {exported[-1][2] / 1024:.0f} MB  "
                  f"{folder}", flush=True)
        running = [r for r in running if not r.poll()]
        if time.monotonic() >= next_detect:
            # A tick, as cron's. Without --overlap it is skipped while a run is going
            # (as `flock -n` in a crontab would); with it, detect meets its own lock.
            if running and not args.overlap:
                skipped += 1
            elif output.exists():
                runs.append(DetectRun(cmd, env, work, len(runs) + 1, began))
                children.append(runs[-1].proc)
                running.append(runs[-1])
            next_detect += DETECT_EVERY_S
        time.sleep(POLL_S)
    m["record_rc"] = record.returncode
    m["wall_s"] = time.monotonic() - began
    m["player_xruns"] = player.xruns - xruns_before
    m["skipped_ticks"] = skipped

    while running:  # let a run in progress end, then one last run scores the tail
        running = [r for r in running if not r.poll()]
        time.sleep(0.5)
    if output.exists():
        runs.append(DetectRun(cmd, env, work, len(runs) + 1, began))
        children.append(runs[-1].proc)
        while not runs[-1].poll():
            time.sleep(0.5)

    player.play(None)
    player.close()
    children.remove(player)
    m.update(exported=exported, rss_series=rss_series, peak_rss_kb=peak_rss, record_cpu_s=record_cpu, runs=runs)
    m["record_warnings"] = [line for line in (work / "record.log").read_text(errors="replace").splitlines()
                            if line.strip()]
    m["jack_xruns"] = collections.Counter(
        line.split("client =", 1)[1].split(" was not finished")[0].strip() if "client =" in line else "?"
        for line in (work / "jackd.log").read_text(errors="replace").splitlines() if "XRun" in line)
    m.update(check_output(output, mixture, decode=not args.no_decode))
    return m


def new_segments(output: Path, known: set[str]) -> list[str]:
    """Names of published segment folders (manifest written) not in ``known``."""
    return sorted(name for name in candidate_names(output) if name not in known and is_complete(output / name))


def noise_leading_zeros(noise_dir: Path) -> int:
    """Frames of digital silence at the start of the noise clips (the stream opened
    before the player was patched in); the largest over the channels."""
    import torch

    worst = 0
    for path in noise_dir.glob("channel_*.pt"):
        clip = torch.load(path, weights_only=True)["clip"].numpy().ravel()
        nonzero = np.flatnonzero(clip != 0)
        worst = max(worst, int(nonzero[0]) if nonzero.size else len(clip))
    return worst


def check_output(output: Path, mixture: np.ndarray, decode: bool) -> dict:
    """Manifests, detect's state and (``decode``) the kept audio against the source."""
    segments = list_segments(output)
    folders = [(s.manifest, s.path) for s in segments]
    manifests = [s.manifest for s in segments]
    starts = [m.start_frame for m in manifests]
    out = {
        "segments_exported": len(folders),
        "start_frame_gaps": sum(s != k * SEGMENT_FRAMES for k, s in enumerate(starts)),
        "overflows": sum(m.overflows for m in manifests),
        "dropped_frames": sum(m.dropped_frames for m in manifests),
        "dropped_segments": sum(m.dropped_segments for m in manifests),
        "reconnects": sum(m.reconnects for m in manifests),
        "tensors": sum(len(m.tensor_keys()) for m in manifests),
        "sources": sorted({source for m in manifests for _, source in m.tensor_keys()}),
    }
    state = read_state(output / "signalcraft.sqlite")
    out["state"] = state
    out["unhandled"] = sorted({f.name for _, f in folders} - state["folders"])
    if decode:
        t = time.monotonic()
        captured = np.concatenate([frames_as_int64(sf.read(f / AUDIO, dtype="float32", always_2d=True)[0].T)
                                   for _, f in folders]) if folders else np.zeros(0, np.int64)
        out["match"] = match_stream(captured, frames_as_int64(mixture))
        out["match"]["frames"] = len(captured)
        out["decode_s"] = time.monotonic() - t
    return out


# ------------------------------------------------------------------------------ the report


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def report(args: argparse.Namespace, m: dict) -> tuple[str, bool]:
    """The markdown section and whether the target is met."""
    exported, runs = m["exported"], m["runs"]
    # RSS: when the first segment appears (models loaded, one segment processed), then
    # the highest sample in the minute after that against the highest in the last
    # minute of capture (the last segment appears while record shuts down, freeing).
    series = m["rss_series"]
    rss_first = exported[0][2] if exported else 0
    t_first = exported[0][0] if exported else 0.0
    t_last = exported[-1][0] if exported else 0.0
    early = [rss for t, rss in series if t_first <= t <= t_first + 60.0]
    late = [rss for t, rss in series if t_last - 60.0 <= t < t_last]
    rss_start, rss_end = (max(early) if early else 0), (max(late) if late else 0)
    growth_mb = (rss_end - rss_start) / 1024
    alive = [rss for _, _, rss in exported if rss]
    rss_last = alive[-1] if alive else 0
    state = m["state"]
    handled = len(state["folders"])
    calibration = state["phases"].get("calibration", 0)
    scored = state["phases"].get("scored", 0)
    codes = collections.Counter(r.rc for r in runs)
    failed = [r for r in runs if r.rc not in DETECT_OK and r.rc != EXIT_BUSY]
    times = [r.seconds for r in runs if r.seconds is not None and not r.result.get("trained")]
    trained = [r for r in runs if r.result.get("trained")]
    match = m.get("match")
    lost = (match["lost"] + match["repeated"] + match["unmatched"] + match["silent"]) if match else None
    # RSS once a minute (the segment exported closest after each minute mark)
    per_minute = []
    for minute in range(1, int(args.minutes) + 2):
        after = [rss for t, rss in m["rss_series"] if t >= minute * 60]
        if after:
            per_minute.append(f"{after[0] / 1024:.0f}")
    segs = m["segments_expected"]
    checks = {
        "record exited 0": m["record_rc"] == 0,
        "zero lost frames": (lost == 0 if match else True) and m["start_frame_gaps"] == 0
        and m["overflows"] == 0 and m["dropped_frames"] == 0 and m["dropped_segments"] == 0,
        "every segment exported": m["segments_exported"] == segs,
        "every segment handled by detect": handled == m["segments_exported"] and not m["unhandled"]
        and scored == m["segments_exported"] - min(args.calibration_segments, m["segments_exported"]),
        "no detect failure": not failed,
        f"RSS growth under {RSS_TARGET_MB:g} MB": bool(early and late) and growth_mb < RSS_TARGET_MB,
    }
    met = all(checks.values())
    denoise = ("gated against noise clips recorded through the same JACK path by `calibrate-noise` "
               "while only the scene's background stem played" if not args.no_denoise else
               "disabled (`--no-denoise`)")
    codes_text = ", ".join(f"{c}: {n}" for c, n in sorted(codes.items(), key=lambda kv: (kv[0] is None, kv[0])))
    rows = [
        *([("noise clips (`calibrate-noise` through JACK)", f"exit code {m['calibrate_rc']}, "
            f"{m['noise_leading_zeros']} frames of silence at their start")] if "calibrate_rc" in m else []),
        ("wall time of `record`", f"{m['wall_s']:.1f} s for {segs * SEGMENT_SECONDS:.0f} s of audio"),
        ("**segments exported / expected**", f"**{m['segments_exported']} / {segs}**"),
        ("segments handled by `detect` (calibration + scored)",
         f"{handled} ({calibration} + {scored}); not handled: {len(m['unhandled'])}"),
        ("tensors exported", f"{m['tensors']} ({', '.join(m['sources'])} per microphone)"),
    ]
    if match:
        rows += [
            ("**frames lost** (kept audio matched against the source)",
             f"**{match['lost']}** lost, {match['repeated']} repeated, {match['unmatched']} unmatched, "
             f"{match['silent']} silent inside the stream"),
            ("frames kept in order", f"{match['kept']} in {match['discontinuities'] + 1} run(s), after "
             f"{match['before_source']} frames at the start before all channels were patched in"),
        ]
    rows += [
        ("start_frame discontinuities in the manifests", m["start_frame_gaps"]),
        ("overflows / dropped frames / dropped segments (manifests)",
         f"{m['overflows']} / {m['dropped_frames']} / {m['dropped_segments']}"),
        ("device reconnects (manifests)", m["reconnects"]),
        ("JACK xruns during `record` / in the whole soak (late client: count, from the server log)",
         f"{m['player_xruns']} / {sum(m['jack_xruns'].values())}"
         + (f" ({', '.join(f'{c}: {n}' for c, n in m['jack_xruns'].items())})" if m["jack_xruns"] else "")),
        ("RSS of `record` when its first segment appears", mb(rss_first)),
        ("**RSS of `record`, highest in the first minute after that -> in the last minute of capture**",
         f"**{mb(rss_start)} -> {mb(rss_end)} ({growth_mb:+.1f} MB)**"),
        ("RSS of `record` when its last segment appears (shutting down)", mb(rss_last)),
        ("RSS of `record` each minute (MB)", ", ".join(per_minute) or "-"),
        ("peak RSS of `record` (VmHWM)", mb(m["peak_rss_kb"])),
        ("CPU time of `record`", f"{m['record_cpu_s']:.0f} s ({m['record_cpu_s'] / m['wall_s']:.0%} of one core)"
         if m["record_cpu_s"] else "-"),
        ("`detect` runs (exit code: count)", f"{len(runs)} ({codes_text}); minute ticks skipped while a run "
         f"was going: {m['skipped_ticks']}"),
        ("`detect` time per run that did not train: median / max",
         f"{statistics.median(times):.1f} s / {max(times):.1f} s" if times else "-"),
        ("`detect` run that trained the detector",
         f"run {trained[0].index} at {trained[0].at:.0f} s, {trained[0].seconds:.1f} s" if trained else "none"),
        ("peak RSS of a `detect` run", mb(max(r.peak_rss_kb for r in runs)) if runs else "-"),
        ("alerts on the normal scene (WARNING / CRITICAL tensors)",
         f"{state['alerts'].get('WARNING', 0)} / {state['alerts'].get('CRITICAL', 0)}"),
        ("warnings and errors logged by `record`", len(m["record_warnings"])),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    failed_text = "".join(f"\n- detect run {r.index} (at {r.at:.0f} s) exited {r.rc}: {r.error_tail()}"
                          for r in failed)
    warn_text = "".join(f"\n- `{line[:200]}`" for line in m["record_warnings"][:10])
    title = "## Soak (scripts/soak.sh)" + ("" if args.minutes >= REPORT_MINUTES else " - TRIAL, too short to count")
    body = f"""{title}

`signalcraft record --repeat {segs}` ({SEGMENT_SECONDS:g} s segments, {args.minutes:g} min) on real-time paced
input from a JACK server (dummy backend, {SAMPLE_RATE} Hz, {PERIOD}-frame periods, {CHANNELS} channels,
float32 through PortAudio's JACK host API), as its own process, with `signalcraft detect
OUTPUT --json` started every {DETECT_EVERY_S:g} s ({"on the minute even when the previous run is still going" if args.overlap else "on the minute, or as soon as the previous run ends"})
and once after `record` ends. Input: a {SCENE_SECONDS:g} s `signalcraft simulate` scene
({', '.join(MACHINES)} in factory background, {CHANNELS} microphones, seed {SCENE_SEED}) looped; denoising
{denoise}; separation by the bundled `plant` model; `output.keep_raw: true`, so the kept
audio is compared frame by frame with the source; `detect.calibration_segments: {args.calibration_segments}`
(the detector calibrates, trains itself and then scores within the soak). RSS is
`VmRSS` of the `record` process, sampled every {POLL_S:g} s; growth compares the highest sample
in the minute after the first segment appears (models loaded, warmed up) with the highest in
the last minute of capture.

| measure | value |
|---|---|
{table}
{failed_text}{(chr(10) + "Logged by `record`:" + warn_text) if warn_text else ""}

Target: zero lost frames, every segment exported and scored, RSS growth under {RSS_TARGET_MB:g} MB:
{"met" if met else "NOT met (" + ", ".join(k for k, ok in checks.items() if not ok) + ")"}.
"""
    return body, met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=REPORT_MINUTES,
                        help=f"audio to record (>= {REPORT_MINUTES:g} for the report; shorter: a trial, printed only)")
    parser.add_argument("--overlap", action="store_true",
                        help="start detect every minute even while the previous run is going (as cron does)")
    parser.add_argument("--calibration-segments", type=int, default=CALIBRATION_SEGMENTS,
                        help="detect.calibration_segments: segments before the detector trains itself "
                             f"[default: {CALIBRATION_SEGMENTS}]")
    parser.add_argument("--no-denoise", action="store_true", help="skip calibrate-noise and denoising")
    parser.add_argument("--no-decode", action="store_true", help="skip matching the kept audio against the source")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed) instead of removing it")
    args = parser.parse_args()
    if args.minutes * 60 < SEGMENT_SECONDS:
        parser.error(f"--minutes: at least one segment ({SEGMENT_SECONDS:g} s)")
    if shutil.which("jackd") is None:
        sys.exit("jackd not found: run `bash scripts/setup.sh --bench` first")

    work = Path(tempfile.mkdtemp(prefix="signalcraft-soak-"))
    children: list = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        m = soak(args, work, children)
    except RuntimeError as e:  # a step failed: its own message is above
        sys.exit(f"soak: {e}" + ("" if args.keep else " (run with --keep to look at the work folder)"))
    finally:
        stop_children(children)
        if args.keep:
            print(f"soak: work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    body, met = report(args, m)
    print(body)
    if args.minutes >= REPORT_MINUTES:
        print(f"written to {write_section('soak', body)}")
    else:
        print(f"trial of {args.minutes:g} min: docs/benchmarks.md not written (needs --minutes {REPORT_MINUTES:g} or more)")
    sys.exit(0 if met else 1)


def _interrupt(signum, frame) -> None:
    """SIGTERM ends the soak like Ctrl-C: main()'s finally stops everything it started."""
    raise KeyboardInterrupt


def stop_children(children: list) -> None:
    """Stop what the soak started, newest first: processes (SIGTERM, then SIGKILL), the player."""
    for child in reversed(children):
        if isinstance(child, LoopPlayer):
            try:
                child.close()
            except Exception:
                pass
            continue
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


if __name__ == "__main__":
    main()
