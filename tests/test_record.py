import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml
import soundfile as sf

from signalcraft.errors import ExitCode
from signalcraft.files import STAGING
from signalcraft.segments import MANIFEST

from conftest import CHANNELS, SAMPLE_RATE, SEGMENT_FRAMES, invoke


def segment_folders(output):
    return sorted(p for p in output.iterdir() if not p.name.startswith("."))


def raw_only(project):
    """Keep each segment's audio and skip denoising (no noise clips needed)."""
    config = yaml.safe_load(project.read_text())
    config["denoise"] = {"enabled": False}
    config["output"]["keep_raw"] = True
    project.write_text(yaml.safe_dump(config))


def test_record_three_segments_equal_the_replayed_samples(vmic, project):
    raw_only(project)
    result = invoke("--config", str(project), "record", "--repeat", "3")
    assert result.returncode == 0, result.stderr
    folders = segment_folders(project.parent / "out")
    assert len(folders) == 3
    assert result.stdout.split() == [str(f) for f in folders]  # prints where it wrote

    manifests = [json.loads((f / MANIFEST).read_text()) for f in folders]
    audio = []
    for folder, manifest in zip(folders, manifests):
        data, rate = sf.read(folder / "audio.flac", dtype="int16", always_2d=True)
        assert rate == SAMPLE_RATE and data.shape == (SEGMENT_FRAMES, CHANNELS)
        audio.append(data.T)
        assert manifest["files"] == ["audio.flac", "mic_0/mix.pt", "mic_1/mix.pt", "mic_2/mix.pt", "mic_3/mix.pt"]
        assert manifest["device"] == "signalcraft_vmic" and manifest["channels"] == [1, 2, 3, 4]
        assert (manifest["overflows"], manifest["dropped_frames"], manifest["dropped_segments"]) == (0, 0, 0)
    # Consecutive, and every frame exactly as replayed: none lost or repeated at the joins.
    assert [m["start_frame"] for m in manifests] == [0, SEGMENT_FRAMES, 2 * SEGMENT_FRAMES]
    assert np.array_equal(np.concatenate(audio, axis=1), vmic.samples[:, : 3 * SEGMENT_FRAMES])


def test_sigterm_finishes_cleanly_with_the_conventional_code(vmic, project):
    output = project.parent / "out"
    raw_only(project)
    # Longer segments, so the signal lands while one is being captured.
    project.write_text(project.read_text().replace("segment_seconds: 0.5", "segment_seconds: 2.0"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "signalcraft", "--config", str(project), "record", "--repeat", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (output.exists() and segment_folders(output)) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.SIGTERM == 143, stderr
    assert "SIGTERM received" in stderr
    folders = segment_folders(output)
    assert folders and stdout.split() == [str(f) for f in folders]
    for folder in folders:  # every published segment is whole
        assert "audio.flac" in json.loads((folder / MANIFEST).read_text())["files"]
        assert sf.info(str(folder / "audio.flac")).frames == 2 * SAMPLE_RATE
    assert not list((output / STAGING).rglob("*")), "a partial segment was left behind"
    assert not list(output.rglob("*.tmp"))


def test_process_dates_a_kept_segment_audio_by_its_manifest(vmic, project):
    raw_only(project)
    assert invoke("--config", str(project), "record", "--repeat", "1").returncode == 0
    [folder] = segment_folders(project.parent / "out")
    os.utime(folder / "audio.flac", (0, 0))  # a copied file's time says nothing
    edit = yaml.safe_load(project.read_text())
    edit["output"]["dir"] = "again"
    project.write_text(yaml.safe_dump(edit))
    result = invoke("--config", str(project), "process", str(folder / "audio.flac"))
    assert result.returncode == 0, result.stderr
    [again] = segment_folders(project.parent / "again")
    assert again.name == folder.name
    original, redone = (json.loads((f / MANIFEST).read_text()) for f in (folder, again))
    assert redone["start_time_utc"] == original["start_time_utc"]
