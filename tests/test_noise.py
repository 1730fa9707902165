import numpy as np
import pytest
import torch

from signalcraft import clock
from signalcraft.config import NoiseConfig
from signalcraft.errors import ExitCode, NoiseClipError
from signalcraft.noise import NoiseClip, check_clip, clip_path, levels, load_clip, save_clip

from conftest import CHANNELS, SAMPLE_RATE, known_samples, invoke

CONFIG = NoiseConfig()


def tone(amplitude: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_a_good_clip_has_no_problems():
    audio = tone(0.1)
    assert check_clip(audio, CONFIG) == []
    assert levels(audio, 0.999).rms_dbfs == pytest.approx(20 * np.log10(0.1 / np.sqrt(2)), abs=0.01)


def test_digital_silence_is_dead():
    (problem,) = check_clip(np.zeros(16000, np.float32), CONFIG)
    assert problem.startswith("digital silence")


def test_a_level_below_the_floor_is_dead():
    (problem,) = check_clip(tone(1e-5), CONFIG)  # about -103 dBFS
    assert "dead channel: RMS -103.0 dBFS is below noise.dead_rms_dbfs (-80 dBFS)" in problem


def test_clipping_over_the_limit_is_reported():
    audio = tone(0.1)
    audio[:32] = 1.0  # 0.2% of samples at full scale
    (problem,) = check_clip(audio, CONFIG)
    assert "clipping: 0.20% of samples" in problem and "lower the input gain" in problem
    audio[16:32] = 0.5  # 0.1%: at the limit, accepted
    assert check_clip(audio, CONFIG) == []


def test_clip_round_trip_and_backup(tmp_path):
    first = NoiseClip(tone(0.1), SAMPLE_RATE, 3, "dev", clock.now())
    path = save_clip(first, tmp_path)
    assert path == clip_path(tmp_path, 3) == tmp_path / "channel_3.pt"
    loaded = load_clip(path)
    assert np.array_equal(loaded.audio, first.audio) and loaded.audio.dtype == np.float32
    assert (loaded.sample_rate, loaded.channel, loaded.device, loaded.recorded_at) == (
        SAMPLE_RATE, 3, "dev", first.recorded_at)
    second = NoiseClip(tone(0.2), SAMPLE_RATE, 3, "dev", first.recorded_at)
    third = NoiseClip(tone(0.3), SAMPLE_RATE, 3, "dev", first.recorded_at)
    with clock.frozen(clock.now()):  # both replacements in the same second
        save_clip(second, tmp_path)
        save_clip(third, tmp_path)
    assert np.array_equal(load_clip(path).audio, third.audio)
    backups = sorted(tmp_path.glob("channel_3.pt.*.bak"))  # every earlier clip is kept
    assert len(backups) == 2 and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["channel_3.pt", *(p.name for p in backups)])
    kept = [torch.load(p, weights_only=True)["clip"].numpy() for p in backups]
    assert any(np.array_equal(k, first.audio) for k in kept) and any(np.array_equal(k, second.audio) for k in kept)


def test_a_clip_with_samples_that_are_not_numbers_is_refused(tmp_path):
    audio = tone(0.1)
    audio[1000:1100] = np.nan
    path = save_clip(NoiseClip(audio, SAMPLE_RATE, 1, "dev", clock.now()), tmp_path)
    with pytest.raises(NoiseClipError, match="100 of .* samples are not finite"):
        load_clip(path)
    assert check_clip(audio, NoiseConfig()) == [
        "100 samples are not finite (NaN or infinity): the interface or its driver is faulty"]


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_a_corrupt_or_missing_clip_names_the_file(tmp_path, content):
    path = tmp_path / "channel_1.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NoiseClipError) as e:
        load_clip(path)
    assert str(path) in str(e.value) and "calibrate-noise" in str(e.value)


def test_calibrate_noise_saves_the_replayed_samples(vmic, project):
    result = invoke("--config", str(project), "calibrate-noise")
    assert result.returncode == 0, result.stderr
    noise_dir = project.parent / "noise"
    assert sorted(p.name for p in noise_dir.iterdir()) == [f"channel_{c}.pt" for c in range(1, CHANNELS + 1)]
    for c in range(1, CHANNELS + 1):
        clip = load_clip(noise_dir / f"channel_{c}.pt")
        assert (clip.channel, clip.sample_rate, clip.device) == (c, SAMPLE_RATE, "signalcraft_vmic")
        assert np.array_equal(clip.audio, vmic.float32()[c - 1, :SAMPLE_RATE])  # noise.seconds = 1
    assert str(noise_dir / "channel_1.pt") in result.stdout

    again = invoke("--config", str(project), "calibrate-noise")
    assert again.returncode == ExitCode.USAGE and "--force" in again.stderr

    vmic.set(known_samples(seed=9))
    forced = invoke("--config", str(project), "calibrate-noise", "--force", "--seconds", "0.5")
    assert forced.returncode == 0, forced.stderr
    assert np.array_equal(load_clip(noise_dir / "channel_2.pt").audio, vmic.float32()[1, :8000])
    assert len(list(noise_dir.glob("channel_2.pt.*.bak"))) == 1


def test_calibrate_noise_rejects_dead_and_clipping_channels(vmic, project):
    samples = known_samples()
    samples[1] = 0  # channel 2 unplugged
    samples[3, ::100] = 32767  # channel 4 clips on 1% of samples
    vmic.set(samples)
    result = invoke("--config", str(project), "calibrate-noise")
    assert result.returncode == ExitCode.FAILURE
    assert "channel 2: digital silence" in result.stderr
    assert "channel 4: clipping" in result.stderr
    assert "channel 1" not in result.stderr and "nothing saved" in result.stderr
    assert not (project.parent / "noise").exists() or not any((project.parent / "noise").iterdir())
