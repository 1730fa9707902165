"""Unattended operation on real parts: locks between real processes, SIGKILL, a full
disk (a real tmpfs when root, else RLIMIT_FSIZE), device loss (a PortAudioError
injected at the sounddevice boundary), corrupt clips and models, the free-space guard."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf
import sounddevice
import torch
import yaml

from signalcraft import record as recording
from signalcraft.chain import chain_factory
from signalcraft.config import load_config
from signalcraft.errors import DeviceError, ExitCode
from signalcraft.files import STAGING
from signalcraft.segments import MANIFEST
from signalcraft.locks import device_lock_path

from conftest import CHANNELS, SAMPLE_RATE, SEGMENT_FRAMES, known_samples, invoke

CLI = [sys.executable, "-m", "signalcraft"]


def edit(project: Path, **sections) -> Path:
    """Merge ``sections`` into the project's config.yaml."""
    config = yaml.safe_load(project.read_text())
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    project.write_text(yaml.safe_dump(config))
    return project


def published(output: Path) -> list[Path]:
    return sorted(p for p in output.iterdir() if not p.name.startswith(".")) if output.exists() else []


def assert_only_whole_segments(output: Path) -> None:
    """Every visible folder is a complete segment whose files all load; nothing temporary."""
    for folder in published(output):
        manifest = json.loads((folder / MANIFEST).read_text())
        for name in manifest["files"]:
            if name.endswith(".pt"):
                assert torch.load(folder / name, weights_only=True).shape == (1, 240, 240)
    assert not list(output.glob(".*.tmp")) and not list(output.glob("*/.*.tmp"))


def start_record(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "--config", str(project), "record", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def wait_for_segment(output: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not published(output):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no segment was exported"
        time.sleep(0.02)


@pytest.fixture
def raw_project(project: Path) -> Path:
    """The virtual device, no denoising (no clips needed), 2 s segments."""
    return edit(project, denoise={"enabled": False}, capture={"segment_seconds": 2.0})


# Locks


def test_a_second_record_on_the_same_device_exits_busy_at_once(vmic, raw_project):
    output = raw_project.parent / "out"
    first = start_record(raw_project, "--repeat", "0")
    try:
        wait_for_segment(output, first)
        began = time.monotonic()
        second = invoke("--config", str(raw_project), "record", "--repeat", "1")
        assert second.returncode == ExitCode.BUSY == 5, second.stderr
        assert time.monotonic() - began < 30
        assert f"in use by another `signalcraft record` (pid {first.pid}" in second.stderr
        assert "signalcraft_vmic" in second.stderr and "This run did nothing" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == ExitCode.SIGTERM


def test_a_second_detect_on_the_same_output_exits_busy(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"output": {"dir": "out"}}))
    # Another process holds the output folder's lock, as a running detect does.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from signalcraft.locks import RunLock, output_lock_path\n"
         f"with RunLock(output_lock_path({str(output)!r}), 'x', 'detect'):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in (["detect", str(output)], ["train-detector", str(output)]):
            result = invoke("--config", str(tmp_path / "config.yaml"), *command)
            assert result.returncode == ExitCode.BUSY, result.stderr
            assert f"another `signalcraft detect` (pid {holder.pid}" in result.stderr
        # From cron (-q) the same is silent: routine, and the log file has it.
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({"output": {"dir": "out"}, "log": {"file": "sc.log"}}))
        quiet = invoke("--config", str(tmp_path / "config.yaml"), "-q", "detect", str(output))
        assert quiet.returncode == ExitCode.BUSY and quiet.stderr == "" and quiet.stdout == ""
        assert "in use by another `signalcraft detect`" in (tmp_path / "sc.log").read_text()
    finally:
        holder.communicate("", timeout=30)
    # Released with its process: detect runs now.
    result = invoke("--config", str(tmp_path / "config.yaml"), "detect", str(output))
    assert result.returncode == 0, result.stderr
    assert not (output / ".detect.lock").read_text()  # emptied on a clean exit


def test_sigkill_leaves_no_stale_lock_and_the_next_run_cleans_up(vmic, raw_project):
    output = raw_project.parent / "out"
    killed = start_record(raw_project, "--repeat", "0")
    wait_for_segment(output, killed)
    # A segment half-written by the same kind of process: staged files and a temporary file.
    half = subprocess.run(
        [sys.executable, "-c",
         "import os, signal\n"
         "from signalcraft import clock\n"
         "from signalcraft.files import atomic_write\n"
         "from signalcraft.segments import SegmentWriter\n"
         f"w = SegmentWriter({str(output)!r}, clock.now()).__enter__()\n"
         "w.save_tensor(0, 'mix', b'half')\n"
         "(w.staging / 'mic_1').mkdir()\n"
         "atomic_write(w.staging / 'mic_1' / 'mix.pt', lambda tmp: (tmp.write_bytes(b'x'), os.kill(os.getpid(), signal.SIGKILL)))"],
    )
    assert half.returncode == -signal.SIGKILL
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    leftovers = list((output / STAGING).iterdir())
    assert leftovers and any(list(p.rglob(".*.tmp")) for p in leftovers)
    assert json.loads(device_lock_path("signalcraft_vmic").read_text())["pid"] == killed.pid

    again = invoke("--config", str(raw_project), "record", "--repeat", "1")
    assert again.returncode == 0, again.stderr
    assert "did not finish cleanly" in again.stderr and "left by an interrupted run" in again.stderr
    assert not list((output / STAGING).iterdir())
    assert_only_whole_segments(output)


# Disk


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB filesystem when root can mount one; else None (use RLIMIT_FSIZE)."""
    mount = tmp_path / "disk"
    mounted = _tmpfs(mount, "2m")
    yield mount if mounted else None
    if mounted:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_mid_write_leaves_only_whole_segments_and_says_so(tmp_path, small_disk):
    # 4 microphones, no separation: 4 tensors of 230 kB per segment, so the disk fills
    # in the second segment (tmpfs) or at the first tensor (a 100 kB file-size limit).
    output = (small_disk or tmp_path / "disk") / "out"
    wav = tmp_path / "long.wav"
    sf.write(wav, known_samples(seconds=8).T, SAMPLE_RATE, subtype="PCM_16")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"capture": {"segment_seconds": 0.5}, "denoise": {"enabled": False},
                                      "output": {"dir": str(output), "min_free_gb": 0}}))

    def limit_file_size():  # without a small filesystem: the kernel's per-file limit (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = subprocess.run([*CLI, "--config", str(config), "process", str(wav)], capture_output=True, text=True,
                            preexec_fn=None if small_disk else limit_file_size, stdin=subprocess.DEVNULL)
    assert result.returncode == ExitCode.FAILURE, result.stderr
    assert ("cannot write: the disk is full" if small_disk else "cannot write: file too large") in result.stderr
    assert ".pt: cannot write" in result.stderr
    assert len(published(output)) < 16
    assert_only_whole_segments(output)
    assert not list((output / STAGING).iterdir())


def test_record_stops_cleanly_when_free_space_falls_below_the_guard(vmic, raw_project, tmp_path):
    disk = tmp_path / "guarded"
    if not _tmpfs(disk, "4m"):
        pytest.skip("needs root and permission to mount a small filesystem")
    try:
        # 4 tensors of 230 kB a segment; the guard (2 MB free) stops capture after about 2
        # (segments already captured are still written while they fit).
        edit(raw_project, output={"dir": str(disk / "out"), "min_free_gb": 0.002})
        result = invoke("--config", str(raw_project), "record", "--repeat", "0")
        assert result.returncode == ExitCode.FAILURE, result.stderr
        assert "below output.min_free_gb" in result.stderr and "not recording" in result.stderr
        assert published(disk / "out")
        assert_only_whole_segments(disk / "out")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_record_refuses_to_start_below_the_free_space_guard(vmic, raw_project):
    edit(raw_project, output={"min_free_gb": 1e9})
    result = invoke("--config", str(raw_project), "record", "--repeat", "1")
    assert result.returncode == ExitCode.FAILURE
    assert "GB free on this disk, below output.min_free_gb (1e+09 GB); not recording" in result.stderr
    assert not published(raw_project.parent / "out")


# Corrupt inputs


def test_a_corrupt_noise_clip_is_named_and_nothing_is_recorded(vmic, project):
    noise = project.parent / "noise"
    noise.mkdir()
    for channel in range(1, CHANNELS + 1):
        (noise / f"channel_{channel}.pt").write_bytes(b"not a clip")
    result = invoke("--config", str(project), "record", "--repeat", "1")
    assert result.returncode == ExitCode.FAILURE
    assert f"{noise}: channel_1.pt: not a readable noise clip" in result.stderr
    # Each clip's problem once, what to do once, with the configuration given.
    assert result.stderr.count("calibrate-noise") == 1
    assert f"`signalcraft --config {project} calibrate-noise --force`" in result.stderr
    assert not published(project.parent / "out")


def test_a_corrupt_separator_is_named_and_nothing_is_recorded(vmic, raw_project, model_repo):
    model = next(model_repo.glob("tiny*.th"))
    model.write_bytes(model.read_bytes()[:1000])
    edit(raw_project, separation={"repo": str(model_repo), "model": "tiny"})
    result = invoke("--config", str(raw_project), "record", "--repeat", "1")
    assert result.returncode == ExitCode.FAILURE
    assert str(model) in result.stderr and "Retrain it or restore the file" in result.stderr
    assert not published(raw_project.parent / "out")


# Device loss: PortAudio fails at the sounddevice boundary; the device itself is real.


class FlakyDevice:
    """Stands in for sounddevice.InputStream around the real one: the first stream's
    device is 'unplugged' after ``blocks`` callbacks (the stream aborts, as PortAudio's
    ALSA host does on a lost device), then opening fails ``refusals`` times with the
    PortAudioError of a missing device before the real stream opens again."""

    blocks = 20
    refusals = 1
    opened = 0

    def __new__(cls, *args, callback, **kwargs):
        cls.opened += 1
        if cls.opened == 1:
            seen = [0]

            def unplugging(indata, frames, time_info, status):
                seen[0] += 1
                if seen[0] > cls.blocks:
                    raise sounddevice.CallbackAbort
                callback(indata, frames, time_info, status)

            return _REAL_STREAM(*args, callback=unplugging, **kwargs)
        if cls.opened <= 1 + cls.refusals:
            raise sounddevice.PortAudioError("Error opening InputStream: Device unavailable", -9985)
        return _REAL_STREAM(*args, callback=callback, **kwargs)


_REAL_STREAM = sounddevice.InputStream


@pytest.fixture
def flaky(monkeypatch, raw_project):
    monkeypatch.setattr(FlakyDevice, "opened", 0)
    monkeypatch.setattr(sounddevice, "InputStream", FlakyDevice)
    edit(raw_project, capture={"segment_seconds": 0.5, "reconnect_attempts": 2, "reconnect_delay_s": 0.05})
    return raw_project


def test_a_device_lost_mid_run_is_reopened_and_recording_goes_on(vmic, flaky, caplog):
    config = load_config(flaky)
    # 20 blocks of 1024 frames: two 0.5 s segments complete before the loss.
    exported = recording.record(config, 4, chain_factory(config))
    assert len(exported) == 4 == len(published(config.output.dir))
    manifests = [json.loads((f / MANIFEST).read_text()) for f in exported]
    assert [m["reconnects"] for m in manifests] == [0, 0, 1, 0]
    assert [m["start_frame"] for m in manifests] == [0, SEGMENT_FRAMES, 0, SEGMENT_FRAMES]  # a new stream
    assert FlakyDevice.opened == 3
    assert "stopped delivering audio" in caplog.text and "Reopening in 0.05 s (attempt 1 of 2)" in caplog.text
    assert "Device unavailable" in caplog.text and "Reopening in 0.1 s (attempt 2 of 2)" in caplog.text
    assert "reopened; capture resumes" in caplog.text


def test_a_device_that_stays_away_ends_the_run_with_completed_segments_intact(vmic, flaky, monkeypatch):
    monkeypatch.setattr(FlakyDevice, "refusals", 99)
    config = load_config(flaky)
    began = time.monotonic()
    with pytest.raises(DeviceError, match="Device unavailable.*Gave up after 2 attempts to reopen it"):
        recording.record(config, 0, chain_factory(config))
    assert time.monotonic() - began < 30
    assert len(published(config.output.dir)) == 2
    assert_only_whole_segments(config.output.dir)
    assert FlakyDevice.opened == 3  # the first stream, then 2 attempts


def test_a_device_missing_at_the_start_fails_at_once_without_retrying(vmic, flaky, monkeypatch):
    monkeypatch.setattr(FlakyDevice, "opened", 1)  # every open is refused from the first
    monkeypatch.setattr(FlakyDevice, "refusals", 99)
    config = load_config(flaky)
    with pytest.raises(DeviceError, match="cannot open 'signalcraft_vmic' for capture"):
        recording.record(config, 1, chain_factory(config), stop=threading.Event())
    assert FlakyDevice.opened == 2


def test_no_reconnect_attempts_means_the_first_loss_ends_the_run(vmic, flaky):
    edit(flaky, capture={"reconnect_attempts": 0})
    config = load_config(flaky)
    with pytest.raises(DeviceError, match="stopped delivering audio") as e:
        recording.record(config, 0, chain_factory(config))
    assert "Gave up" not in str(e.value) and FlakyDevice.opened == 1
    assert len(published(config.output.dir)) == 2


def test_a_stop_during_the_reconnect_wait_ends_cleanly(vmic, flaky, monkeypatch):
    monkeypatch.setattr(FlakyDevice, "refusals", 99)
    edit(flaky, capture={"reconnect_delay_s": 30.0})
    config = load_config(flaky)
    stop = threading.Event()
    threading.Timer(2.0, stop.set).start()  # Ctrl-C while it waits to reopen
    began = time.monotonic()
    exported = recording.record(config, 0, chain_factory(config), stop=stop)
    assert time.monotonic() - began < 15 and len(exported) == 2 and FlakyDevice.opened == 1
