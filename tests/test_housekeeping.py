"""Retention, leftovers, the shared rotating log file, quiet mode and `doctor`."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from signalcraft import clock
from signalcraft.config import OutputConfig
from signalcraft.detect.store import Store
from signalcraft.errors import ExitCode
from signalcraft.files import STAGING, remove_leftovers
from signalcraft.segments import folder_name, list_segments
from signalcraft.segments.retention import GB, folder_bytes, prune
from signalcraft.separate import save_model

from conftest import invoke, make_segment, tiny_demucs


def make_segments(output: Path, days_ago: list[float], size: int = 10_000) -> list[str]:
    """Real segment folders (a file of ``size`` bytes and a manifest) starting at
    each of ``days_ago`` before now; returns their names, oldest first."""
    now = clock.now()
    return [make_segment(output, now - dt.timedelta(days=age), size).name for age in days_ago]


def visible(output: Path) -> list[str]:
    return sorted(p.name for p in output.iterdir() if not p.name.startswith(".") and p.is_dir())


def test_keep_days_deletes_only_old_segments_that_detect_has_finished_with(tmp_path):
    output = tmp_path / "out"
    names = make_segments(output, [10, 9, 8, 1, 0.5])  # the three oldest are over 7 days
    done = {names[0], names[2], names[3]}  # names[1] is old but not scored yet
    result = prune(output, OutputConfig(keep_days=7), done)
    assert result.deleted == [names[0], names[2]]
    assert result.kept_unscored == 1
    assert visible(output) == [names[1], names[3], names[4]]
    assert not list((output / STAGING).iterdir())  # unpublished first, then removed


def test_age_is_measured_against_the_clock(tmp_path):
    output = tmp_path / "out"
    names = make_segments(output, [3, 1])
    with clock.frozen(clock.now() + dt.timedelta(days=5)):  # five days later, the first is 8 days old
        result = prune(output, OutputConfig(keep_days=7), set(names))
    assert result.deleted == names[:1] and visible(output) == names[1:]


def test_max_gb_deletes_the_oldest_finished_segments_until_under_the_limit(tmp_path):
    output = tmp_path / "out"
    names = make_segments(output, [5, 4, 3, 2, 1])
    each = folder_bytes(output / names[0])
    limit = OutputConfig(max_gb=2.5 * each / GB)  # room for two and a half segments
    dry = prune(output, limit, set(names), dry_run=True)
    assert dry.deleted == names[:3] and visible(output) == names
    result = prune(output, limit, set(names))
    assert result.deleted == names[:3] and result.freed_bytes == 3 * each
    assert result.total_bytes == 2 * each
    # Unscored segments are kept even over the limit.
    more = make_segments(output, [0.5, 0.4])
    result = prune(output, limit, set(names))
    assert result.deleted == names[3:] and result.kept_unscored == 0
    assert visible(output) == more


def test_retention_orders_segments_by_start_time_across_a_clock_change(tmp_path, berlin_fall_back):
    """When the clocks go back, the folder name (local time) of a later segment sorts
    before an earlier one: retention deletes by the start time in the manifest."""
    output = tmp_path / "out"
    first = make_segment(output, berlin_fall_back - dt.timedelta(minutes=30)).name  # 02:30 summer time
    second = make_segment(output, berlin_fall_back + dt.timedelta(minutes=10)).name  # 02:10 winter, 40 min later
    assert second < first  # by name, the later one looks older
    with clock.frozen(berlin_fall_back + dt.timedelta(days=7, minutes=5)):  # only the first is over 7 days
        result = prune(output, OutputConfig(keep_days=7), {first, second})
    assert result.deleted == [first] and visible(output) == [second]


def test_retention_through_detect_uses_the_state_database(tmp_path):
    output = tmp_path / "out"
    names = make_segments(output, [40, 30, 1])
    with Store(output / "signalcraft.sqlite") as store, store.transaction():
        for name in names[:2]:
            store.record_segment(name, "", "", 0, 0, phase="calibration")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"dir": "out", "keep_days": 7}, "detect": {"model": "det.pt"}}))
    # Calibration segments of a detector not trained yet are kept: training needs them.
    result = invoke("--config", str(config), "prune", str(output), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "0 segments, 0.00 GB would be freed; 2 kept because not scored yet" in result.stdout
    with Store(output / "signalcraft.sqlite") as store:
        store.mark_calibration_done()
    result = invoke("--config", str(config), "prune", str(output))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [f"deleted {output / n}" for n in names[:2]]
    assert visible(output) == [names[2]]


def test_detect_applies_retention_after_scoring(tmp_path):
    output = tmp_path / "out"
    names = make_segments(output, [40, 30, 0])
    with Store(output / "signalcraft.sqlite") as store, store.transaction():
        for name in names:
            store.record_segment(name, "", "", 0, 0, phase="calibration")
        store.mark_calibration_done()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"dir": "out", "keep_days": 7}, "detect": {"model": "det.pt"}}))
    result = invoke("--config", str(config), "detect", str(output))
    assert result.returncode == 0, result.stderr
    assert f"retention: deleted 2 segments ({names[0]} ... {names[1]})" in result.stderr
    assert visible(output) == [names[2]]


def test_leftovers_of_live_processes_are_kept(tmp_path):
    staging = tmp_path / STAGING
    staging.mkdir(parents=True)
    name = folder_name(clock.now())
    mine = staging / f"{name}.{os.getpid()}.0123abcd"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    dead = staging / f"{name}.{dead_pid}.0123abcd"
    for folder in (mine, dead):
        folder.mkdir()
    stray = tmp_path / f".detector.pt.{dead_pid}.89abcdef.tmp"
    stray.write_bytes(b"x")
    unrelated = tmp_path / ".keep.tmp"  # not a signalcraft temporary name
    unrelated.write_bytes(b"x")
    # A live pid on a day-old name: the pid was reused after a reboot.
    reused = tmp_path / f".clip.pt.{os.getpid()}.0badf00d.tmp"
    reused.write_bytes(b"x")
    day_ago = clock.timestamp() - 24 * 3600
    os.utime(reused, (day_ago, day_ago))
    now = clock.timestamp()
    for path in (mine, dead, stray, unrelated):  # written just now, by the clock signalcraft reads
        os.utime(path, (now, now))
    assert remove_leftovers(tmp_path) == 3
    assert mine.exists() and unrelated.exists()
    assert not dead.exists() and not stray.exists() and not reused.exists()


# Logging


def test_processes_sharing_a_rotating_log_lose_no_line(tmp_path):
    log = tmp_path / "logs" / "signalcraft.log"
    writer = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from signalcraft.config import LogConfig\n"
        "from signalcraft import logs\n"
        f"logs.add_file(LogConfig(file=Path({str(log)!r}), max_mb=4096 / 1e6, backups=200))\n"
        "for i in range(300):\n"
        "    logging.getLogger('t').info('writer %s line %03d ' + 'x' * 40, sys.argv[1], i)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, name]) for name in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    files = sorted(log.parent.glob("signalcraft.log*"))
    assert len(files) > 5  # it rotated
    lines = [line for f in files if not f.name.endswith(".lock") for line in f.read_text().splitlines()]
    for name in "ab":
        mine = sorted(line.split(f"writer {name} line ")[1][:3] for line in lines if f"writer {name} line " in line)
        assert mine == [f"{i:03d}" for i in range(300)]  # each line exactly once
    assert all(f.stat().st_size <= 4096 + 200 for f in files)


def test_quiet_mode_prints_nothing_when_all_is_well_but_logs_to_the_file(tmp_path):
    (tmp_path / "out").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"dir": "out"}, "log": {"file": "logs/sc.log"}}))
    result = invoke("-q", "--config", str(config), "detect", str(tmp_path / "out"))
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert "detect " in (tmp_path / "logs" / "sc.log").read_text()
    result = invoke("-q", "--config", str(config), "detect", str(tmp_path / "missing"))
    assert result.returncode == ExitCode.USAGE and "missing" in result.stderr  # but errors still show


# doctor


@pytest.fixture
def healthy(vmic, project, model_repo):
    """The virtual device with noise clips recorded, a separator, retention set."""
    config = yaml.safe_load(project.read_text())
    config["separation"] = {"repo": str(model_repo), "model": "tiny"}
    config["output"]["keep_days"] = 30
    project.write_text(yaml.safe_dump(config))
    calibrated = invoke("--config", str(project), "calibrate-noise")
    assert calibrated.returncode == 0, calibrated.stderr
    return project


def lines(stdout: str) -> dict[str, str]:
    """doctor's output by check name -> the whole line."""
    return {line[6:19].strip(): line for line in stdout.splitlines()}


def test_doctor_passes_a_healthy_setup(healthy):
    result = invoke("--config", str(healthy), "doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result.stdout)
    assert list(found) == ["config", "portaudio", "device", "noise clips", "separator", "recorder", "detector",
                           "alarms", "publish", "disk", "log file"]
    # Nothing recorded or scored yet: nothing to check there, and nothing wrong.
    assert found.pop("recorder").startswith("SKIP  recorder      no output folder")
    assert found.pop("alarms").startswith("SKIP  alarms        no detection state yet")
    assert found.pop("publish").startswith("SKIP  publish       publishing off (publish.mqtt: null)")
    assert all(line.startswith("OK") for line in found.values()), result.stdout
    assert "'signalcraft_vmic', channels [1, 2, 3, 4] of " in found["device"]
    assert "4 clips in" in found["noise clips"] and "sources pump, fan" in found["separator"]
    quiet = invoke("--config", str(healthy), "-q", "doctor")  # for cron: nothing to say when all is well
    assert quiet.returncode == 0 and quiet.stdout == "", quiet.stdout


def test_doctor_names_each_problem(healthy):
    for clip in (healthy.parent / "noise").glob("channel_[23].pt"):
        clip.unlink()
    config = yaml.safe_load(healthy.read_text())
    config["capture"]["device"] = "Scarlett 18i20"
    healthy.write_text(yaml.safe_dump(config))
    result = invoke("--config", str(healthy), "doctor")
    assert result.returncode == ExitCode.FAILURE
    found = lines(result.stdout)
    assert found["device"].startswith("FAIL") and "'Scarlett 18i20'" in found["device"]
    assert "signalcraft_vmic" in found["device"]  # lists what is there
    assert found["noise clips"].startswith("FAIL")
    assert "channel_2.pt missing; channel_3.pt missing" in found["noise clips"]
    assert "calibrate-noise" in found["noise clips"]
    assert found["separator"].startswith("OK") and found["config"].startswith("OK")
    quiet = invoke("--config", str(healthy), "-q", "doctor")
    assert quiet.returncode == ExitCode.FAILURE
    assert {name for name in lines(quiet.stdout)} == {"device", "noise clips"}  # only what is wrong


def test_doctor_says_what_kind_of_separator_and_refuses_an_array_model_for_other_microphones(healthy, model_repo):
    found = lines(invoke("--config", str(healthy), "doctor").stdout)
    assert "(per microphone, on torch)" in found["separator"]
    import torch

    from signalcraft.dsp.spatial import N_FFT

    save_model(tiny_demucs(audio_channels=4), model_repo, "array4")
    placed = torch.eye(4, dtype=torch.complex64).expand(2, N_FFT // 2 + 1, 4, 4) / 4
    save_model(tiny_demucs(audio_channels=4), model_repo, "placed4", spatial=placed)
    save_model(tiny_demucs(audio_channels=3), model_repo, "array3")
    config = yaml.safe_load(healthy.read_text())  # capture.channels [1, 2, 3, 4]
    for name, kind in (("array4", "no spatial filter"), ("placed4", "spatial filter 2 iterations"), ("array3", None)):
        config["separation"]["model"] = name
        healthy.write_text(yaml.safe_dump(config))
        line = lines(invoke("--config", str(healthy), "doctor").stdout)["separator"]
        if kind:
            assert line.startswith("OK") and f"(array model for 4 microphones, {kind}, on torch)" in line, line
        else:
            assert line.startswith("FAIL") and "trained on an array of 3 microphones, but 4 microphone channels are " \
                "recorded" in line, line  # the message record gives


def test_doctor_reports_a_broken_config_and_stops(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("output:\n  folder: out\n")
    result = invoke("--config", str(config), "doctor")
    assert result.returncode == ExitCode.FAILURE
    assert result.stdout.startswith("FAIL  config") and "output.folder: unknown key" in result.stdout
    assert len(result.stdout.splitlines()) == 1


def test_doctor_prints_each_config_problem_as_its_own_fail_line(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("capture:\n  sample_rate: 0\n  channels: [1, 1]\noutput:\n  folder: out\n"
                      "detect:\n  alerts: {k: 9, cusum_limit: off}\n")
    result = invoke("--config", str(config), "doctor")
    assert result.returncode == ExitCode.FAILURE
    assert result.stdout.splitlines() == [f"FAIL  config        {config}: {problem}" for problem in (
        "capture.sample_rate: must be a positive number of Hz",
        "capture.channels: lists a channel twice",
        "output.folder: unknown key. Known keys here: dir, keep_raw, keep_days, max_gb, min_free_gb.",
        "detect.alerts.cusum_limit: expected a number, got a boolean False",
        "detect.alerts.k: must be between 1 and n",
    )]


def test_doctor_warns_when_the_recorder_has_stopped(tmp_path):
    """The newest segment is stale when it started longer ago than 3 segment lengths
    and 15 minutes: `record` has stopped (cron restarts it within 10 minutes)."""
    config = tmp_path / "config.yaml"
    settings = {"capture": {"segment_seconds": 0.5}, "output": {"dir": "out"}, "log": {"file": "logs/sc.log"}}
    config.write_text(yaml.safe_dump(settings))
    output = tmp_path / "out"

    def recorder() -> str:
        return lines(invoke("--config", str(config), "doctor").stdout)["recorder"]

    assert recorder().startswith(f"SKIP  recorder      no output folder {output} yet")
    output.mkdir()
    assert recorder() == (f"WARN  recorder      no segments yet in {output}: is `signalcraft --config {config} record "
                          f"--repeat 0` running? Check its service or cron entry; its log is {tmp_path}/logs/sc.log")
    now = clock.now()
    make_segment(output, now - dt.timedelta(hours=2))
    newest = make_segment(output, now - dt.timedelta(seconds=30)).name
    with clock.frozen(now):
        assert recorder() == (f"OK    recorder      newest segment {newest} in {output}, started 30 s ago "
                              "(segments of 0.5 s)")
    with clock.frozen(now + dt.timedelta(minutes=20)):
        line = recorder()
    assert line.startswith(f"WARN  recorder      newest segment {newest} in {output} started 20 min ago, more than "
                           "15 min (the longer of 3 segments of 0.5 s and 15 min): the recorder has stopped."), line
    assert f"`signalcraft --config {config} record --repeat 0`" in line and f"{tmp_path}/logs/sc.log" in line
    # Three segments of 10 minutes are 30: twenty minutes without a new one is normal then.
    settings["capture"]["segment_seconds"] = 600
    config.write_text(yaml.safe_dump(settings))
    with clock.frozen(now + dt.timedelta(minutes=20)):
        assert recorder().startswith(f"OK    recorder      newest segment {newest} in {output}, started 20 min ago")


def wav(path: Path, samples: np.ndarray, written: float) -> Path:
    """A mono 16 kHz recording whose last sample was written at ``written`` (clock timestamp)."""
    sf.write(path, samples.astype(np.float32), 16000, subtype="FLOAT")
    os.utime(path, (written, written))
    return path


def test_doctor_names_the_machines_in_alarm(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "capture": {"channels": [1], "segment_seconds": 1.0}, "denoise": {"enabled": False},
        "separation": {"assets": {"P-101": "mix"}}, "output": {"dir": "out"}, "log": {"file": None},
        "detect": {"calibration_segments": 5, "model": "detector.pt", "alerts": {"k": 1, "n": 1}},
    }))
    output = tmp_path / "out"
    cli = ("--config", str(config))

    def alarms(*options: str) -> list[str]:
        return [line for line in invoke(*cli, *options, "doctor").stdout.splitlines() if line[6:19].strip() == "alarms"]

    assert alarms() == [f"SKIP  alarms        no detection state yet ({output / 'signalcraft.sqlite'}): `detect` has "
                        f"not run on {output}"]
    now = clock.timestamp()
    rng = np.random.default_rng(0)
    normal = wav(tmp_path / "normal.wav", 0.05 * rng.standard_normal(8 * 16000), now - 60)  # 8 segments
    fault = wav(tmp_path / "fault.wav", 0.5 * np.sin(2 * np.pi * 1234 * np.arange(2 * 16000) / 16000), now)
    for files, code in (([normal], ExitCode.OK), ([fault], ExitCode.CRITICAL)):
        assert invoke(*cli, "process", *map(str, files)).returncode == 0
        detected = invoke(*cli, "detect", str(output))
        assert detected.returncode == code, detected.stdout + detected.stderr
        if code == ExitCode.OK:  # calibrated on 5 segments, then 3 scored NORMAL
            assert alarms() == [f"OK    alarms        no machine in alarm (P-101; newest scored segment "
                                f"{list_segments(output)[-1].name})"]
    segments = list_segments(output)
    first_fault = segments[-2].start_time.isoformat()[:19]
    expected = [f"WARN  alarms        P-101 CRITICAL since {first_fault} UTC (mics 0; newest segment "
                f"{segments[-1].name}); `signalcraft --config {config} report {output}` draws its timeline"]
    assert alarms() == expected
    assert alarms("-q") == expected  # a WARN: printed for cron too
    # Only the last day before the newest segment is read: a segment two days on, not
    # scored yet, leaves nothing scored in that window.
    later = segments[-1].start_time + dt.timedelta(days=2)
    make_segment(output, later)
    window = (later - dt.timedelta(days=1)).isoformat()[:19]
    assert alarms() == [f"SKIP  alarms        no segment scored since {window} UTC (calibrating, or `detect` is not "
                        "running)"]


def test_doctor_hints_keep_the_config_and_ask_for_force_only_to_replace_clips(healthy):
    noise = healthy.parent / "noise"
    for clip in noise.glob("channel_*.pt"):
        clip.unlink()
    line = lines(invoke("--config", str(healthy), "doctor").stdout)["noise clips"]
    assert line.endswith(f"Record them with the machines off: `signalcraft --config {healthy} calibrate-noise`"), line
    # Without --config (./config.yaml found in the working folder) the hint has none.
    line = lines(invoke("doctor", cwd=healthy.parent, env={"SIGNALCRAFT_CONFIG": None}).stdout)["noise clips"]
    assert line.endswith("Record them with the machines off: `signalcraft calibrate-noise`"), line
    assert invoke("--config", str(healthy), "calibrate-noise").returncode == 0
    (noise / "channel_2.pt").unlink()  # the others are there: calibrate-noise replaces them only with --force
    line = lines(invoke("--config", str(healthy), "doctor").stdout)["noise clips"]
    assert line.startswith("FAIL") and "channel_2.pt missing" in line
    assert line.endswith(f"`signalcraft --config {healthy} calibrate-noise --force`"), line
    assert invoke("--config", str(healthy), "calibrate-noise", "--force").returncode == 0
    (noise / "channel_3.pt").write_bytes(b"damaged")
    line = lines(invoke("--config", str(healthy), "doctor").stdout)["noise clips"]
    assert line.startswith("FAIL") and "channel_3.pt: not a readable noise clip" in line
    assert line.count("calibrate-noise") == 1  # what to do, once for all the clips
    assert line.endswith(f"Record them with the machines off: `signalcraft --config {healthy} calibrate-noise --force`")


def test_doctor_tries_the_log_file_rather_than_asking(healthy):
    """A log file in /proc passes os.access for root, yet no one can create it there."""
    settings = yaml.safe_load(healthy.read_text())
    settings["log"] = {"file": "/proc/signalcraft.log"}
    healthy.write_text(yaml.safe_dump(settings))
    result = invoke("--config", str(healthy), "doctor")
    assert result.returncode == ExitCode.FAILURE
    found = lines(result.stdout)["log file"]
    assert found.startswith("FAIL") and "/proc/signalcraft.log: cannot be written" in found
    assert not list(Path("/proc").glob(".signalcraft-doctor-*"))


def test_calibrate_noise_and_doctor_know_the_reference_channels(vmic, project, model_repo):
    config = yaml.safe_load(project.read_text())
    config["capture"]["channels"] = [1, 2, 3]
    config["capture"]["reference_channels"] = [4]
    config["separation"] = {"repo": str(model_repo), "model": "tiny"}
    config["output"]["keep_days"] = 30
    project.write_text(yaml.safe_dump(config))
    calibrated = invoke("--config", str(project), "-v", "calibrate-noise")
    assert calibrated.returncode == 0, calibrated.stderr
    noise = project.parent / "noise"
    assert sorted(p.name for p in noise.glob("channel_*.pt")) == ["channel_1.pt", "channel_2.pt", "channel_3.pt"]
    assert "reference channel 4:" in calibrated.stderr  # checked, no clip
    found = lines(invoke("--config", str(project), "doctor").stdout)
    assert "channels [1, 2, 3] of 128, reference channels [4] (the canceller: nlms, 4096 taps)" in found["device"]
    assert found["noise clips"].startswith("OK") and "(reference channels [4] need none)" in found["noise clips"]
    recorded = invoke("--config", str(project), "record", "--repeat", "1")
    assert recorded.returncode == 0, recorded.stderr
    (segment,) = list_segments(project.parent / "out")
    folder = segment.path
    assert sorted(p.name for p in folder.glob("mic_*")) == ["mic_0", "mic_1", "mic_2"]  # never mic_3
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["channels"] == [1, 2, 3] and manifest["reference"]["channels"] == [4]
