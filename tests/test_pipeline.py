"""The preprocessing chain end to end through the CLI: capture from the virtual device,
noise clips, a real (tiny) Demucs model, tensors and manifests; `process` on a file."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from signalcraft import record as recording
from signalcraft.chain import chain_factory
from signalcraft.capture import Segment
from signalcraft.config import config_from_dict
from signalcraft.errors import ExitCode
from signalcraft.segments import MANIFEST, read_manifest

from conftest import CHANNELS, SAMPLE_RATE, SEGMENT_FRAMES, invoke

MANIFEST_KEYS = {
    "format", "signalcraft_version", "start_time_utc", "start_time_local", "duration_s", "sample_rate",
    "device", "channels", "start_frame", "overflows", "dropped_frames", "dropped_segments", "reconnects", "levels",
    "denoise", "separator", "features", "tensors", "reference", "room", "files",
}


def use_model(project, repo):
    config = yaml.safe_load(project.read_text())
    config["separation"] = {"repo": str(repo), "model": "tiny"}
    project.write_text(yaml.safe_dump(config))


def tensors(folder):
    return {str(p.relative_to(folder)): torch.load(p, weights_only=True) for p in sorted(folder.rglob("*.pt"))}


def test_record_then_process_the_same_samples(vmic, project, model_repo, tmp_path):
    use_model(project, model_repo)
    assert invoke("--config", str(project), "calibrate-noise").returncode == 0

    result = invoke("--config", str(project), "record", "--repeat", "2")
    assert result.returncode == 0, result.stderr
    recorded = [p for p in sorted((project.parent / "out").iterdir()) if not p.name.startswith(".")]
    assert len(recorded) == 2
    for folder in recorded:
        expected = {f"mic_{n}/{s}.pt" for n in range(CHANNELS) for s in ("pump", "fan", "_room")}
        found = tensors(folder)
        assert set(found) == expected
        for tensor in found.values():
            assert tensor.shape == (1, 240, 240) and tensor.dtype == torch.float32
            assert bool(tensor.isfinite().all())
            assert tensor.untyped_storage().nbytes() == 240 * 240 * 4  # only its own data saved
        manifest = json.loads((folder / MANIFEST).read_text())
        assert set(manifest) == MANIFEST_KEYS
        assert manifest["separator"]["name"] == "tiny" and manifest["separator"]["sources"] == ["pump", "fan"]
        assert len(manifest["separator"]["sha256"]) == 64
        assert [c["file"] for c in manifest["denoise"]["noise_clips"]] == [f"channel_{c}.pt" for c in range(1, 5)]
        assert manifest["features"]["n_mels"] == 240 and manifest["features"]["hop_length"] == 33
        assert [lv["mic"] for lv in manifest["levels"]] == [0, 1, 2, 3]
        assert all(lv["clipped_fraction"] == 0 and lv["peak"] > 0 for lv in manifest["levels"])
        assert manifest["tensors"] == {f"mic_{n}": ["pump", "fan"] for n in range(CHANNELS)}
        assert manifest["room"] == [f"mic_{n}" for n in range(CHANNELS)]
        assert sorted(manifest["files"]) == sorted(expected)

    # The same samples from a file give the same tensors.
    wav = tmp_path / "replay.wav"
    sf.write(wav, vmic.samples[:, : 2 * SEGMENT_FRAMES].T, SAMPLE_RATE, subtype="PCM_16")
    (project.parent / "out2").mkdir()
    config = yaml.safe_load(project.read_text())
    config["output"]["dir"] = "out2"
    project.write_text(yaml.safe_dump(config))
    result = invoke("--config", str(project), "process", str(wav))
    assert result.returncode == 0, result.stderr
    processed = sorted((project.parent / "out2").glob("2*"))
    assert len(processed) == 2
    for a, b in zip(recorded, processed):
        ta, tb = tensors(a), tensors(b)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_process_continues_past_a_bad_file_and_exits_1(project, tmp_path):
    config = yaml.safe_load(project.read_text())
    config["denoise"] = {"enabled": False}
    project.write_text(yaml.safe_dump(config))
    good = tmp_path / "good.flac"
    sf.write(good, np.zeros((SEGMENT_FRAMES * 2 + 123, CHANNELS), np.float32) + 0.01, SAMPLE_RATE)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVE")
    wrong = tmp_path / "two_channels.wav"
    sf.write(wrong, np.zeros((SEGMENT_FRAMES, 2), np.float32), SAMPLE_RATE)
    result = invoke("--config", str(project), "process", str(bad), str(wrong), str(good))
    assert result.returncode == ExitCode.FAILURE
    assert "bad.wav: cannot read as audio" in result.stderr
    assert "two_channels.wav: has 2 channels but capture.channels lists 4" in result.stderr
    assert "2 of 3 files failed" in result.stderr
    # The good file's two whole segments were exported; its short tail was not.
    assert len(result.stdout.split()) == 2
    assert "shorter than a segment" in result.stderr


def test_missing_noise_clip_fails_before_capture(vmic, project):
    result = invoke("--config", str(project), "record")
    assert result.returncode == ExitCode.FAILURE
    assert "channel_1.pt missing" in result.stderr
    assert f"`signalcraft --config {project} calibrate-noise`" in result.stderr  # with the config given
    assert not (project.parent / "out").exists()


def test_a_noise_clip_at_another_rate_names_both(vmic, project):
    assert invoke("--config", str(project), "calibrate-noise").returncode == 0
    config = yaml.safe_load(project.read_text())
    config["capture"]["sample_rate"] = 8000
    project.write_text(yaml.safe_dump(config))
    result = invoke("--config", str(project), "record")
    assert result.returncode == ExitCode.FAILURE
    assert "recorded at 16000 Hz, the audio is 8000 Hz" in result.stderr


def test_a_slow_worker_drops_segments_with_a_warning_and_counts_them(vmic, project, monkeypatch, caplog):
    """Capture never waits: when processing falls behind the queue bound, segments are
    dropped, logged, and counted in the next exported manifest."""
    data = yaml.safe_load(project.read_text())
    data["pipeline"] = {"queue_segments": 1}
    data["denoise"] = {"enabled": False}
    config = config_from_dict(data, project)
    release = threading.Event()
    seen: list[tuple[int, int]] = []

    def slow_factory(channels, references=()):
        def process(segment: Segment, dropped: int):
            release.wait(timeout=30)  # hold the worker until capture has run ahead
            seen.append((segment.start_frame, dropped, segment.dropped_frames))
            return project.parent
        return process

    threading.Timer(1.0, release.set).start()
    recording.record(config, 6, slow_factory)
    assert len(seen) == 6  # --repeat counts processed segments
    drops = [d for _, d, _ in seen]
    assert sum(drops) > 0
    assert caplog.text.count("dropped the segment") == sum(drops)
    # Each processed segment starts after the segments dropped before it. (The virtual
    # device delivers far faster than real time, so while the worker is held the
    # capture queue may overflow too: those frames are counted, never hidden.)
    assert seen[0][0] == 0
    for (a, _, lost), (b, d, _) in zip(seen, seen[1:]):
        assert b - a >= (1 + d) * SEGMENT_FRAMES + lost
    if any(lost for *_, lost in seen):
        assert "capture queue full" in caplog.text


def test_non_stationary_denoising_runs_without_noise_clips(project, tmp_path):
    config = yaml.safe_load(project.read_text())
    config["denoise"] = {"stationary": False}
    project.write_text(yaml.safe_dump(config))
    audio = tmp_path / "plant.wav"
    sf.write(audio, np.random.default_rng(0).standard_normal((SEGMENT_FRAMES, CHANNELS)).astype(np.float32) * 0.05,
             SAMPLE_RATE)
    result = invoke("--config", str(project), "process", str(audio))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((Path(result.stdout.split()[0]) / MANIFEST).read_text())
    assert manifest["denoise"]["stationary"] is False and manifest["denoise"]["noise_clips"] is None


def test_a_file_truncated_mid_way_does_not_stop_the_others(project, tmp_path):
    config = yaml.safe_load(project.read_text())
    config["denoise"] = {"enabled": False}
    project.write_text(yaml.safe_dump(config))
    data = np.random.default_rng(1).standard_normal((SEGMENT_FRAMES * 3, CHANNELS)).astype(np.float32) * 0.05
    broken = tmp_path / "broken.flac"
    sf.write(broken, data, SAMPLE_RATE)
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # a copy cut short
    good = tmp_path / "good.wav"
    sf.write(good, data[:SEGMENT_FRAMES], SAMPLE_RATE)
    result = invoke("--config", str(project), "process", str(broken), str(good))
    assert result.returncode == ExitCode.FAILURE
    assert "broken.flac" in result.stderr and "Traceback" not in result.stderr
    assert "1 of 2 files failed" in result.stderr
    # The good file's segment, and the segments of the broken one before the damage.
    devices = [read_manifest(Path(folder)).device for folder in result.stdout.split()]
    assert devices.count("file:good.wav") == 1 and devices.count("file:broken.flac") >= 1


def test_an_error_after_export_stops_record_instead_of_hanging(vmic, project):
    data = yaml.safe_load(project.read_text())
    data["denoise"] = {"enabled": False}
    config = config_from_dict(data, project)

    def broken_pipe(path):
        raise BrokenPipeError("stdout closed")

    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(
        pytest.raises(BrokenPipeError, recording.record, config, 3, chain_factory(config),
                      on_exported=broken_pipe)))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "record hung after its worker failed"
    assert outcome and outcome[0].type is BrokenPipeError


def test_only_the_machines_in_the_room_are_exported_under_their_names(project, model_repo, tmp_path):
    """separation.assets: the model separates pump and fan; the room has one pump, P-101."""
    settings = yaml.safe_load(project.read_text())
    settings["separation"] = {"repo": str(model_repo), "model": "tiny", "assets": {"P-101": "pump"}}
    settings["denoise"] = {"enabled": False}
    project.write_text(yaml.safe_dump(settings))
    wav = tmp_path / "room.wav"
    sf.write(wav, 0.05 * np.random.default_rng(0).standard_normal((SEGMENT_FRAMES, CHANNELS)), SAMPLE_RATE)
    result = invoke("--config", str(project), "process", str(wav))
    assert result.returncode == 0, result.stderr
    folder, = sorted((project.parent / "out").glob("2*"))
    found = tensors(folder)
    assert set(found) == {f"mic_{n}/{name}.pt" for n in range(CHANNELS) for name in ("P-101", "_room")}
    manifest = read_manifest(folder)
    assert manifest.tensors == {n: ("P-101",) for n in range(CHANNELS)} and manifest.room == tuple(range(CHANNELS))
    # The room is what separation gave to no machine of the room: the fan is not one.
    config = config_from_dict(settings, project)
    chain = chain_factory(config, SAMPLE_RATE)(tuple(range(1, CHANNELS + 1)))
    audio = sf.read(wav, dtype="float32")[0].T
    split = chain.separator(audio)  # (mics, sources: pump, fan, samples)
    room = chain.logmel((audio - split[:, 0])[:, None])
    for n in range(CHANNELS):
        torch.testing.assert_close(found[f"mic_{n}/_room.pt"], room[n], atol=1e-3, rtol=0)
    assert manifest.separator["assets"] == {"P-101": "pump"} and manifest.separator["sources"] == ["pump", "fan"]

    settings["separation"]["assets"] = {"P-101": "pump", "V-7": "valve"}
    project.write_text(yaml.safe_dump(settings))
    wrong = invoke("--config", str(project), "process", str(wav))
    assert wrong.returncode == ExitCode.USAGE  # a configuration error, as the README's exit codes say
    assert "separation.assets: V-7: valve: no such source in the separator tiny, whose sources are pump, fan" \
        in wrong.stderr
    assert "V-7: valve" in invoke("--config", str(project), "doctor").stdout
    # The same set-up error for another file of the same layout is said once; a missing
    # file is named as missing.
    again = tmp_path / "room2.wav"
    sf.write(again, 0.05 * np.random.default_rng(1).standard_normal((SEGMENT_FRAMES, CHANNELS)), SAMPLE_RATE)
    both = invoke("--config", str(project), "process", str(wav), str(again), str(tmp_path / "gone.wav"))
    assert both.returncode == ExitCode.FAILURE  # a configuration error and a missing file
    assert both.stderr.count("no such source in the separator") == 1
    assert f"{again}: not processed: {wav} failed to set up the same way" in both.stderr
    assert f"{tmp_path / 'gone.wav'}: no such file." in both.stderr
    assert "3 of 3 files failed\n" in both.stderr and "the others were processed" not in both.stderr


@pytest.mark.parametrize("assets, message", [
    ({"P-101": "pump", "P-102": "pump"}, "source 'pump' is mapped to more than one machine"),
    ({"../P-101": "pump"}, "cannot name a tensor file"),
    ({}, "must name at least one machine"),
    (["pump"], "expected a mapping of names to names"),
    ({"P-101": 3}, r"separation\.assets\.P-101: expected a string"),
])
def test_a_wrong_asset_map_is_a_config_error(assets, message):
    from signalcraft.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"separation": {"assets": assets}})


def test_a_file_processed_twice_is_skipped_unless_forced_and_out_chooses_the_folder(project, tmp_path):
    settings = yaml.safe_load(project.read_text())
    settings["denoise"] = {"enabled": False}
    project.write_text(yaml.safe_dump(settings))
    wav = tmp_path / "room.wav"
    sf.write(wav, 0.05 * np.random.default_rng(1).standard_normal((2 * SEGMENT_FRAMES, CHANNELS)), SAMPLE_RATE)
    out = tmp_path / "elsewhere"
    first = invoke("--config", str(project), "process", str(wav), "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.split()) == 2 and all(Path(p).parent == out for p in first.stdout.split())
    assert not (project.parent / "out").exists() or not list((project.parent / "out").glob("2*"))

    again = invoke("--config", str(project), "process", str(wav), "--out", str(out))
    assert again.returncode == 0 and again.stdout == ""
    assert "2 segment(s) already in" in again.stderr and "--force" in again.stderr
    assert len(list(out.glob("2*"))) == 2

    forced = invoke("--config", str(project), "process", str(wav), "--out", str(out), "--force")
    assert forced.returncode == 0 and len(forced.stdout.split()) == 2
    assert len(list(out.glob("2*"))) == 4
