import librosa
import numpy as np
import pytest

from signalcraft.config import FeaturesConfig
from signalcraft.features import LogMel, hop_length

SR = 16000


def test_default_segment_gives_exactly_240_frames_without_cropping():
    import torch

    logmel = LogMel(FeaturesConfig(), SR, 160000)
    assert logmel.hop == hop_length(160000, 240) == 669
    assert logmel._mel(torch.zeros(160000)).shape[-1] == 240  # the spectrogram before any crop


def test_shape_dtype_and_batch_dims():
    logmel = LogMel(FeaturesConfig(), SR, 160000)
    audio = np.random.default_rng(0).standard_normal((3, 2, 160000)).astype(np.float32) * 0.1
    out = logmel(audio)
    assert out.shape == (3, 2, 240, 240) and str(out.dtype) == "torch.float32"
    assert bool(out.isfinite().all())


def test_short_segments_keep_the_first_n_frames():
    logmel = LogMel(FeaturesConfig(), SR, 8000)  # 0.5 s: hop 33 gives 243 frames
    assert logmel(np.zeros((1, 8000), np.float32)).shape == (1, 240, 240)


def test_matches_librosa_with_the_same_settings():
    rng = np.random.default_rng(1)
    t = np.arange(160000) / SR
    audio = (0.1 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    config = FeaturesConfig()
    ours = LogMel(config, SR, audio.size)(audio).numpy()
    mel = librosa.feature.melspectrogram(
        y=audio, sr=SR, n_fft=config.n_fft, hop_length=669, n_mels=240, fmin=0.0, fmax=SR / 2, power=2.0,
        center=True, pad_mode="constant", htk=False, norm="slaney",
    )
    theirs = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None)
    assert theirs.shape == ours.shape == (240, 240)
    assert np.max(np.abs(ours - theirs)) < 0.01  # dB


def test_levels_are_absolute_not_normalised_per_tensor():
    rng = np.random.default_rng(2)
    audio = (0.05 * rng.standard_normal(160000)).astype(np.float32)
    logmel = LogMel(FeaturesConfig(), SR, audio.size)
    quiet, loud = logmel(audio), logmel(2 * audio)
    assert float((loud - quiet).mean()) == pytest.approx(20 * np.log10(2), abs=0.01)  # +6.02 dB


def test_silence_sits_at_the_floor():
    out = LogMel(FeaturesConfig(floor_db=-90.0), SR, 160000)(np.zeros(160000, np.float32))
    assert float(out.min()) == float(out.max()) == -90.0


def test_settings_describe_the_tensor():
    settings = LogMel(FeaturesConfig(), SR, 160000).settings()
    assert settings["hop_length"] == 669 and settings["n_mels"] == 240 and settings["f_max"] == 8000
