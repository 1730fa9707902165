"""Hostile and careless input, on real parts: a second real user attacking the lock
folder, crafted model files, malformed manifests, folders that are not segments,
audio that is not numbers, broken config files."""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from signalcraft import clock, locks
from signalcraft.config import SeparationConfig, config_from_dict
from signalcraft.detect.run import detect
from signalcraft.detect.store import Store
from signalcraft.errors import ExitCode, StorageError
from signalcraft.locks import LockBusy, RunLock, device_lock_path
from signalcraft.noise import NoiseClip, save_clip
from signalcraft.record import process_files
from signalcraft.segments import MANIFEST, list_segments
from signalcraft.separate import ModelError, load_separator

from conftest import CHANNELS, SAMPLE_RATE, SEGMENT_FRAMES, invoke, make_segment

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second, unprivileged user")


def as_nobody(script: str, **kwargs) -> subprocess.Popen:
    """``sh -c script`` as the unprivileged user nobody: a real second uid."""
    def demote():
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return subprocess.Popen(["sh", "-c", script], preexec_fn=demote, cwd="/", stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run_as_nobody(script: str) -> None:
    proc = as_nobody(script)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


@pytest.fixture
def lock_base(monkeypatch):
    """A sticky world-writable folder standing in for /run/lock, that nobody can reach."""
    base = Path(tempfile.mkdtemp(prefix="signalcraft-lockbase-"))
    os.chmod(base, 0o1777)
    monkeypatch.setattr(locks, "LOCK_BASE", base)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=True)


@pytest.fixture
def victim(tmp_path):
    """A file only root may change, as /etc/shadow is."""
    path = tmp_path / "victim"
    path.write_text("root:secret\n")
    os.chmod(path, 0o600)
    return path


def untouched(path: Path) -> bool:
    st = path.stat()
    return path.read_text() == "root:secret\n" and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0


# 1. The lock folder


@needs_root
def test_another_user_planting_a_link_in_the_lock_folder_cannot_touch_its_target(lock_base, victim, project, vmic):
    folder = locks.lock_dir()  # root's own, not made yet
    link = device_lock_path("signalcraft_vmic")
    # The attack: make root's lock folder first and plant a link where root's lock goes.
    run_as_nobody(f"mkdir -m 777 {folder} && ln -s {victim} {link}")
    assert link.is_symlink() and folder.stat().st_uid == NOBODY

    with pytest.raises(StorageError, match=f"belongs to uid {NOBODY} \\(nobody\\).*does not trust it"):
        with RunLock(link, "audio device 'x'", "record", private=True):
            pass
    result = invoke("--config", str(project), "calibrate-noise")  # the command of the report
    assert result.returncode == ExitCode.FAILURE and "does not trust it" in result.stderr
    assert untouched(victim)
    assert not (project.parent / "noise").exists()


@needs_root
def test_a_link_in_this_users_own_lock_folder_is_never_followed(lock_base, victim):
    folder = locks.lock_dir()
    folder.mkdir(mode=0o700)
    link = device_lock_path("card")
    link.symlink_to(victim)
    with pytest.raises(StorageError, match="it is a link, which signalcraft never follows"):
        with RunLock(link, "audio device 'card'", "record", private=True):
            pass
    hard = device_lock_path("card2")
    os.link(victim, hard)  # root could; an attacker can't (protected_hardlinks), but never trust it
    with pytest.raises(StorageError, match="a hard link to another file"):
        with RunLock(hard, "audio device 'card2'", "record", private=True):
            pass
    assert untouched(victim)


def test_a_lock_folder_that_others_can_write_is_refused(lock_base):
    folder = locks.lock_dir()
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(StorageError, match="writable by other users \\(mode 777\\)"):
        with RunLock(device_lock_path("card"), "audio device 'card'", "record", private=True):
            pass


# 2. Forged and squatted locks


@needs_root
def test_another_users_forged_lock_does_not_stop_this_users_record(lock_base):
    theirs = lock_base / f"signalcraft-{NOBODY}"
    forged = theirs / device_lock_path("card").name
    holder = as_nobody(f"mkdir -m 700 {theirs} && echo '{{\"pid\": 1, \"command\": \"record\"}}' > {forged} "
                       f"&& flock {forged} -c 'echo held; cat'")
    try:
        assert holder.stdout.readline().strip() == "held"
        with RunLock(device_lock_path("card"), "audio device 'card'", "record", private=True) as lock:
            assert lock.path.parent == lock_base / "signalcraft-0"  # each user locks in a folder of their own
    finally:
        holder.communicate("", timeout=30)


@needs_root
def test_a_squatted_lock_folder_names_its_real_owner_not_the_forged_holder(lock_base):
    folder = locks.lock_dir()
    lock = device_lock_path("card")
    holder = as_nobody(f"mkdir -m 755 {folder} && echo '{{\"pid\": 1, \"command\": \"record\"}}' > {lock} "
                       f"&& chmod 644 {lock} && flock -s {lock} -c 'echo held; cat'")
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StorageError) as e:
            with RunLock(lock, "audio device 'card'", "record", private=True):
                pass
        assert f"uid {NOBODY} (nobody)" in str(e.value) and "pid 1" not in str(e.value)
        assert not isinstance(e.value, LockBusy)
    finally:
        holder.communicate("", timeout=30)


def test_runs_of_the_same_user_still_exclude_each_other(lock_base):
    path = device_lock_path("card")
    with RunLock(path, "audio device 'card'", "record", private=True):
        with pytest.raises(LockBusy, match="in use by another `signalcraft record`"):
            with RunLock(path, "audio device 'card'", "calibrate-noise", private=True):
                pass
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


# 3. Separator files


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_separator_file_that_would_run_code_is_refused_unread(tmp_path, model_repo, project):
    marker = tmp_path / "ran"
    [good] = model_repo.glob("tiny-*.th")
    package = torch.load(good, weights_only=False)
    package["kwargs"]["extra"] = _RunsCode(marker)  # a crafted file: code runs when torch.load unpickles it
    evil = model_repo / "evil.th"
    evil.write_bytes(pickle.dumps(package))
    with pytest.raises(ModelError, match="evil.th: refused: the file holds more than a demucs model") as e:
        load_separator(SeparationConfig(repo=model_repo, model="evil"), SAMPLE_RATE)
    assert "weights_only" not in str(e.value)  # torch's advice to load it unsafely is never passed on
    config = yaml.safe_load(project.read_text())
    config["separation"] = {"repo": str(model_repo), "model": "evil"}
    project.write_text(yaml.safe_dump(config))
    doctor = invoke("--config", str(project), "doctor")
    assert doctor.returncode == ExitCode.FAILURE and "evil.th: refused" in doctor.stdout
    assert not marker.exists()
    # A real model still loads, through the same path.
    assert load_separator(SeparationConfig(repo=model_repo, model="tiny"), SAMPLE_RATE).sources == ("pump", "fan")


def test_a_separator_file_not_matching_its_checksum_is_refused(model_repo):
    [good] = model_repo.glob("tiny-*.th")
    data = bytearray(good.read_bytes())
    data[-100] ^= 0xFF
    good.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="tiny-.*th: cannot load separator: .*checksum"):
        load_separator(SeparationConfig(repo=model_repo, model="tiny"), SAMPLE_RATE)


# 4. Malformed manifests do not stop detection


SMALL = {"capture": {"channels": [1], "segment_seconds": 1.0}, "denoise": {"enabled": False}, "output": {"dir": "out"},
         "detect": {"calibration_segments": 5, "model": "detector.pt"}}


def noise_wav(folder: Path, seconds: float, seed: int = 0) -> Path:
    path = folder / f"noise-{seed}.wav"
    rng = np.random.default_rng(seed)
    sf.write(path, (0.05 * rng.standard_normal(round(seconds * 16000))).astype(np.float32), 16000, subtype="FLOAT")
    return path


@pytest.fixture
def small(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(SMALL))
    return tmp_path, config_from_dict(SMALL, tmp_path / "config.yaml")


@pytest.mark.parametrize("damage", [
    [], {"format": 1, "tensors": {"micX": ["mix"]}}, {"tensors": {"mic_x": ["mix"]}}, {"tensors": "x"},
    {"features": "x"}, {"start_time_utc": 1700000000},
], ids=["a list", "micX", "mic_x", "tensors string", "features string", "integer start time"])
def test_a_malformed_manifest_is_passed_by_counted_and_shown_in_doctor(small, damage):
    root, config = small
    made, _ = process_files(config, [noise_wav(root, 2.0)])  # two segments
    manifest = made[0] / MANIFEST
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(damage if isinstance(damage, list) else {**data, **damage}))
    first = detect(config, root / "out")
    assert (first.rejected, first.segments) == (1, 1)
    again = detect(config, root / "out")
    assert (again.rejected, again.segments) == (0, 0)  # recorded: passed by, never retried
    with Store(root / "out" / "signalcraft.sqlite") as store:
        assert list(store.rejected_folders()) == [made[0].name] and store.counts()["rejected_segments"] == 1
    process_files(config, [noise_wav(root, 1.0, seed=1)])
    assert detect(config, root / "out").segments == 1  # later segments go on being handled
    doctor = invoke("--config", str(root / "config.yaml"), "doctor", "--output", str(root / "out"))
    line = next(line for line in doctor.stdout.splitlines() if "detector" in line[:20])
    assert line.startswith("WARN") and "1 folders look like segments but have an unusable manifest" in line
    assert made[0].name in line


def test_a_detect_stopped_while_training_does_not_take_one_more_segment_into_calibration(small, monkeypatch):
    root, config = small
    process_files(config, [noise_wav(root, 5.0)])  # the five calibration segments
    import signalcraft.detect.run as run

    real = run.fit_detector
    monkeypatch.setattr(run, "fit_detector", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while the detector trains from cold
        detect(config, root / "out")
    monkeypatch.setattr(run, "fit_detector", real)
    later, _ = process_files(config, [noise_wav(root, 1.0, seed=5)])
    result = detect(config, root / "out")
    assert result.trained and result.segments == 1
    with Store(root / "out" / "signalcraft.sqlite") as store:
        assert store.calibration_count() == 5 and store.phase(later[0].name) == "scored"


# 5. Only segments are segments


def test_folders_that_are_not_segments_are_never_pruned_or_scored(tmp_path):
    output = tmp_path / "out"
    backup = output / "000_backup"
    (backup / "mic_0").mkdir(parents=True)
    old = make_segment(output, clock.now() - dt.timedelta(days=40))
    (backup / MANIFEST).write_text((old / MANIFEST).read_text())  # a copy of a real manifest
    assert [s.name for s in list_segments(output)] == [old.name]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output": {"dir": "out", "keep_days": 7}}))
    with Store(output / "signalcraft.sqlite") as store, store.transaction():
        store.record_segment(old.name, "", "", 0, 0, phase="scored")
    result = invoke("--config", str(config), "prune", str(output))
    assert result.returncode == 0 and result.stdout.splitlines()[0] == f"deleted {old}"
    assert backup.is_dir() and (backup / MANIFEST).exists()


# 6. Audio that is not numbers


def test_non_finite_samples_are_counted_and_never_hidden_in_a_tensor(project, tmp_path):
    config = yaml.safe_load(project.read_text())
    config["denoise"] = {"enabled": False}
    project.write_text(yaml.safe_dump(config))
    audio = (0.05 * np.random.default_rng(0).standard_normal((SEGMENT_FRAMES, CHANNELS))).astype(np.float32)
    audio[100:150, 1] = np.nan
    audio[200, 2] = np.inf
    wav = tmp_path / "broken-interface.wav"
    sf.write(wav, audio, SAMPLE_RATE, subtype="FLOAT")
    result = invoke("--config", str(project), "process", str(wav))
    assert result.returncode == 0, result.stderr
    assert "mic_1 (channel 2): 50 samples" in result.stderr and "mic_2 (channel 3): 1 samples" in result.stderr
    [folder] = result.stdout.split()
    text = (Path(folder) / MANIFEST).read_text()
    assert "NaN" not in text and "Infinity" not in text
    [segment] = list_segments(Path(folder).parent)
    assert [lv.nonfinite_samples for lv in segment.manifest.levels] == [0, 50, 1, 0]
    assert sorted(segment.manifest.tensors) == [0, 3]  # no tensor of the broken channels
    tensors, corrupt = segment.load_tensors()
    assert corrupt == 0 and all(bool(t.isfinite().all()) for t in tensors.values())


def test_a_noise_clip_with_nan_samples_is_refused_by_process_and_doctor(project, tmp_path):
    for channel in range(1, CHANNELS + 1):
        audio = (0.01 * np.random.default_rng(channel).standard_normal(SAMPLE_RATE)).astype(np.float32)
        if channel == 2:
            audio[:100] = np.nan
        save_clip(NoiseClip(audio, SAMPLE_RATE, channel, "signalcraft_vmic", clock.now()), project.parent / "noise")
    wav = tmp_path / "plant.wav"
    sf.write(wav, np.zeros((SEGMENT_FRAMES, CHANNELS), np.float32), SAMPLE_RATE)
    result = invoke("--config", str(project), "process", str(wav))
    assert result.returncode == ExitCode.FAILURE
    assert "channel_2.pt: 100 of 16000 samples are not finite" in result.stderr
    doctor = invoke("--config", str(project), "doctor")
    assert "channel_2.pt: 100 of 16000 samples are not finite" in doctor.stdout


# 7. Careless input


@pytest.mark.parametrize("content, message", [
    (b"\x00\xff\xfe binary", "not a text file in UTF-8"),
    ("output:\n  dir: x\n".encode("utf-16"), "not a text file in UTF-8"),
    (b"capture:\n  segment_seconds: .inf\n", "capture.segment_seconds: must be a finite number"),
    (b"noise:\n  dead_rms_dbfs: .nan\n", "noise.dead_rms_dbfs: must be a finite number"),
    (b"features:\n  f_max: 100000\n", "features.f_max: 100000 Hz is above half of capture.sample_rate"),
    (b"features:\n  f_min: -500\n", "features.f_min: must be 0 Hz or more"),
    (b"output:\n  keep_days: 7\n  keep_days: 30\n", "key 'keep_days' is given twice"),
    (b"# " + b"x" * 2_000_000 + b"\n", "too large for a config file"),
], ids=["binary", "utf-16", "inf", "nan", "f_max", "f_min", "duplicate key", "huge"])
def test_a_broken_config_is_a_usage_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    result = invoke("--config", str(path), "devices")
    assert result.returncode == ExitCode.USAGE == 2, result.stderr
    assert str(path) in result.stderr and message in result.stderr


def test_empty_and_truncated_audio_files_are_reported(project, tmp_path):
    config = yaml.safe_load(project.read_text())
    config["denoise"] = {"enabled": False}
    project.write_text(yaml.safe_dump(config))
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, CHANNELS), np.float32), SAMPLE_RATE)
    result = invoke("--config", str(project), "process", str(empty))
    assert result.returncode == ExitCode.FAILURE and "empty.wav: holds no audio (0 frames)" in result.stderr
    whole = tmp_path / "copy.wav"
    sf.write(whole, np.full((5 * SEGMENT_FRAMES, CHANNELS), 0.01, np.float32), SAMPLE_RATE, subtype="PCM_16")
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # a copy cut short in its data
    result = invoke("--config", str(project), "process", str(whole))
    assert result.returncode == 0 and "copy.wav: ends before its header says" in result.stderr
    assert len(result.stdout.split()) == 2


@needs_root
def test_report_to_a_read_only_filesystem_says_so(tmp_path):
    output = tmp_path / "out"
    make_segment(output, clock.now())
    with Store(output / "signalcraft.sqlite"):
        pass
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        result = invoke("report", str(output), "--out", str(readonly / "report"))
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert result.returncode == ExitCode.FAILURE
    assert "report/images: cannot write: the filesystem is read-only" in result.stderr
    assert "internal error" not in result.stderr


def test_a_busy_detect_exits_before_loading_the_models(tmp_path):
    """The lock is taken first: a second run under load exits 5 at once, without the
    seconds it takes to import torch."""
    output = tmp_path / "out"
    output.mkdir()
    with RunLock(locks.output_lock_path(output), "x", "detect"):
        probe = subprocess.run(
            [sys.executable, "-c",
             "import sys\nfrom signalcraft.cli import cli\n"
             f"try:\n    cli(['detect', {str(output)!r}], prog_name='signalcraft')\n"
             "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert probe.stdout.split() == [str(int(ExitCode.BUSY)), "False"], probe.stderr


# Review findings: hostile manifests, rejected folders that change, old segments, names


@pytest.mark.parametrize("damage", ["duration", "start", "deep", "fifo", "link to /dev/zero"])
def test_a_hostile_manifest_is_rejected_never_crashes_or_hangs(small, damage):
    root, config = small
    made, _ = process_files(config, [noise_wav(root, 2.0)])
    manifest = made[0] / MANIFEST
    data = json.loads(manifest.read_text())
    manifest.unlink()
    if damage == "duration":
        manifest.write_text(json.dumps(data).replace('"duration_s": 1.0', '"duration_s": 1' + "0" * 400))
    elif damage == "start":
        manifest.write_text(json.dumps({**data, "start_time_utc": "0001-01-01T00:00:00+01:00"}))
    elif damage == "deep":
        manifest.write_text("[" * 100_000)
    elif damage == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")
    result = detect(config, root / "out")
    assert (result.rejected, result.segments) == (1, 1)
    doctor = invoke("--config", str(root / "config.yaml"), "doctor", "--output", str(root / "out"))
    assert "1 folders look like segments but have an unusable manifest" in doctor.stdout


def test_a_tensor_that_is_a_fifo_or_a_link_is_skipped_not_waited_for(small):
    root, config = small
    made, _ = process_files(config, [noise_wav(root, 2.0)])
    (made[0] / "mic_0" / "mix.pt").unlink()
    os.mkfifo(made[0] / "mic_0" / "mix.pt")
    target = made[1] / "mic_0" / "mix.pt"
    target.unlink()
    target.symlink_to("/dev/zero")
    result = detect(config, root / "out")
    assert (result.segments, result.corrupt) == (2, 2)


def test_a_rejected_folder_is_read_again_once_its_manifest_is_fixed(small):
    root, config = small
    made, _ = process_files(config, [noise_wav(root, 2.0)])
    manifest = made[0] / MANIFEST
    good = manifest.read_text()
    manifest.write_text(json.dumps({**json.loads(good), "format": 99}))  # from a newer signalcraft
    assert detect(config, root / "out").rejected == 1
    assert detect(config, root / "out").rejected == 0  # unchanged: passed by, not reported again
    manifest.write_text(good)  # fixed (or signalcraft upgraded: the signature holds the format read)
    again = detect(config, root / "out")
    assert (again.rejected, again.segments) == (0, 1)


def test_segments_of_the_first_manifest_format_are_still_read(tmp_path):
    folder = make_segment(tmp_path, clock.now())
    data = json.loads((folder / MANIFEST).read_text())
    del data["reconnects"]  # not written by the earliest format-1 manifests
    del data["reference"], data["room"]  # keys of later formats
    data["format"] = 1
    data["levels"] = [{k: v for k, v in lv.items() if k != "nonfinite_samples"} for lv in data["levels"]]
    (folder / MANIFEST).write_text(json.dumps(data))
    [segment] = list_segments(tmp_path)
    assert segment.manifest.reconnects == 0 and segment.manifest.levels[0].nonfinite_samples == 0


def test_source_names_in_any_script_work_and_unsafe_ones_are_refused_at_load(tmp_path, project):
    from signalcraft.separate import save_model

    from conftest import tiny_demucs

    repo = tmp_path / "models"
    save_model(tiny_demucs(sources=("Kühlpumpe", "fan 2")), repo, "plant")
    assert load_separator(SeparationConfig(repo=repo, model="plant"), SAMPLE_RATE).sources == ("Kühlpumpe", "fan 2")
    save_model(tiny_demucs(sources=("../pump", "fan")), repo, "bad")
    with pytest.raises(ModelError, match="cannot name tensor files"):
        load_separator(SeparationConfig(repo=repo, model="bad"), SAMPLE_RATE)


def test_yaml_merge_keys_still_work(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("denoise:\n  <<: {enabled: false, prop_decrease: 0.5}\n  prop_decrease: 0.8\n")
    from signalcraft.config import load_config

    config = load_config(path)
    assert config.denoise.enabled is False and config.denoise.prop_decrease == 0.8
