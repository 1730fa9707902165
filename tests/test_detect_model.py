import dataclasses
import resource
import signal

import numpy as np
import pytest
import torch

from signalcraft.config import AutoencoderConfig, DetectConfig, ScorerConfig
from signalcraft.detect.model import (
    MIN_PROFILE_STD_DB,
    MODEL_FORMAT,
    AutoencoderArgs,
    BandProfile,
    ConvAutoencoder,
    Detector,
    DetectorError,
    load_detector,
    save_detector,
    train_detector_models,
)
from signalcraft.errors import ExitCode, SignalcraftError

N_MELS = N_FRAMES = 240
FLOOR_DB = -100.0
FEATURES = {"kind": "log-mel", "sample_rate": 16000, "segment_samples": 160000, "n_mels": N_MELS,
            "n_frames": N_FRAMES, "n_fft": 2048, "hop_length": 669, "f_min": 0.0, "f_max": 8000.0,
            "power": 2.0, "mel_scale": "slaney", "norm": "slaney", "db_reference": 1.0, "floor_db": FLOOR_DB}
PUMP_LINES = (20, 45, 80, 130)  # mel bins of the pump's harmonics
FAN_LINES = (30, 100, 190)
def autoencoder(**settings) -> DetectConfig:
    """A DetectConfig of the autoencoder scorer with these network and training settings."""
    return DetectConfig(scorer=ScorerConfig(kind="autoencoder", autoencoder=AutoencoderConfig(**settings)))


SMALL = autoencoder(channels=8, epochs=6, batch_size=8, learning_rate=2e-3, seed=0)


def spectrogram(n: int, lines=PUMP_LINES, seed: int = 0, gain_db: float = 0.0, extra_lines=(),
                band=None) -> torch.Tensor:
    """Synthetic machine tensors, shape = (n, 1, N_MELS, N_FRAMES) in dB: a noise floor
    around -85 dB and steady tones 2 bins wide around -35 dB, each tensor with its own
    level jitter (+-1 dB). ``extra_lines`` adds tones, ``band`` = (low, high) a broadband
    rattle at -55 dB; ``gain_db`` raises everything (a louder machine)."""
    rng = np.random.default_rng(seed)
    x = -85.0 + 2.0 * rng.standard_normal((n, 1, N_MELS, N_FRAMES))
    for k in range(n):
        jitter = rng.normal(0.0, 1.0)
        for b in lines:
            x[k, 0, b:b + 2] = -35.0 + jitter + 0.5 * rng.standard_normal((2, N_FRAMES))
        for b in extra_lines:
            x[k, 0, b:b + 2] = -40.0 + 0.5 * rng.standard_normal((2, N_FRAMES))
        if band is not None:
            lo, hi = band
            x[k, 0, lo:hi] = np.maximum(x[k, 0, lo:hi], -55.0 + 2.0 * rng.standard_normal((hi - lo, N_FRAMES)))
    return torch.from_numpy(np.clip(x + gain_db, FLOOR_DB, 0.0).astype(np.float32))


@pytest.fixture(scope="module")
def detector() -> Detector:
    data = {"pump": spectrogram(24, PUMP_LINES, seed=1), "fan": spectrogram(12, FAN_LINES, seed=2)}
    return train_detector_models(data, FEATURES, SMALL, progress=False, device="cpu")


def flat_norm(args):
    """Per-band normalisation of -70 dB mean and 15 dB spread in every band."""
    return torch.full((args.n_mels,), -70.0), torch.full((args.n_mels,), 15.0)


@pytest.fixture(scope="module")
def normal_scores(detector) -> np.ndarray:
    return detector.score("pump", spectrogram(12, seed=100))  # held out: a seed not trained on


def test_the_autoencoder_returns_the_shape_it_is_given():
    torch.manual_seed(0)
    model = ConvAutoencoder(AutoencoderArgs())
    assert model(torch.randn(2, 1, 240, 240)).shape == (2, 1, 240, 240)
    small = ConvAutoencoder(AutoencoderArgs(n_mels=64, n_frames=128, channels=4))
    assert small(torch.randn(3, 1, 64, 128)).shape == (3, 1, 64, 128)
    with pytest.raises(ValueError, match="multiple of 16"):
        AutoencoderArgs(n_mels=100)


def test_detector_is_trained_per_source_with_its_data_recorded(detector):
    assert set(detector.models) == {"pump", "fan"} and detector.args.channels == SMALL.scorer.autoencoder.channels
    assert detector.trained_on["pump"]["tensors"] == 24 and detector.trained_on["fan"]["tensors"] == 12
    assert all(not m.training for m in detector.models.values())
    mean, std = detector.norm["pump"]
    assert mean.shape == std.shape == (N_MELS,)  # per band, from the training tensors, not per tensor
    assert -90 < float(mean.mean()) < -60 and float(std.min()) >= 1.0
    assert detector.features == FEATURES


def test_anomalies_score_higher_than_held_out_normal_tensors(detector, normal_scores):
    new_tones = detector.score("pump", spectrogram(8, seed=200, extra_lines=(60, 170)))
    rattle = detector.score("pump", spectrogram(8, seed=201, band=(150, 200)))
    print(f"\nnormal {normal_scores.min():.3f}..{normal_scores.max():.3f}, new tones "
          f"{new_tones.min():.3f}..{new_tones.max():.3f}, rattle {rattle.min():.3f}..{rattle.max():.3f}")
    assert normal_scores.dtype == np.float64 and normal_scores.shape == (12,)
    assert new_tones.min() > normal_scores.max() and rattle.min() > normal_scores.max()
    assert new_tones.mean() > 2 * normal_scores.mean() and rattle.mean() > 2 * normal_scores.mean()


def test_a_louder_machine_scores_higher(detector, normal_scores):
    louder = detector.score("pump", spectrogram(12, seed=100, gain_db=6.0))
    print(f"\nnormal mean {normal_scores.mean():.3f}, +6 dB mean {louder.mean():.3f}")
    assert louder.min() > normal_scores.max()


def test_one_louder_tone_scores_higher(detector, normal_scores):
    """An imbalance: one existing line 8 dB up, everything else as in training."""
    x = spectrogram(12, seed=100)
    x[:, 0, PUMP_LINES[0]:PUMP_LINES[0] + 2] += 8.0
    louder_tone = detector.score("pump", x)
    print(f"\nnormal max {normal_scores.max():.3f}, one tone +8 dB min {louder_tone.min():.3f}")
    assert louder_tone.min() > normal_scores.max()


def test_band_profile_leaves_out_common_variation_but_not_a_changed_band():
    rng = np.random.default_rng(0)
    gains = rng.uniform(-3.0, 3.0, 40)  # load and room level: every band moves together
    train = torch.cat([spectrogram(1, seed=10 + k, gain_db=g) for k, g in enumerate(gains)])
    profile = BandProfile.fit(train)
    assert profile.components.shape == (4, N_MELS) and profile.std.shape == (N_MELS,)
    assert torch.allclose(profile.components @ profile.components.T, torch.eye(4), atol=1e-4)
    louder = profile.deviation(spectrogram(6, seed=99, gain_db=3.0))
    normal = profile.deviation(spectrogram(6, seed=99))
    one_band = spectrogram(6, seed=99)
    one_band[:, 0, 150:152] += 3.0  # a quiet band 3 dB up: no gain change does that
    changed = profile.deviation(one_band)
    print(f"\nmean deviation per band: normal {normal.mean():.2f}, all +3 dB {louder.mean():.2f}, "
          f"band 150 +3 dB {changed[:, 150].mean():.1f}")
    assert normal.shape == (6, N_MELS) and normal.mean() < 3.0 and louder.mean() < 3.0
    assert changed[:, 150:152].min() > 10 * max(normal.mean(), louder.mean())


def test_band_profile_from_a_few_tensors_keeps_a_spread():
    profile = BandProfile.fit(spectrogram(3, seed=5))  # too few to learn directions of variation
    assert profile.components.shape == (0, N_MELS) and float(profile.std.min()) >= MIN_PROFILE_STD_DB
    one = BandProfile.fit(spectrogram(1, seed=5))
    assert torch.equal(one.std, torch.full((N_MELS,), MIN_PROFILE_STD_DB))
    assert torch.isfinite(one.deviation(spectrogram(2, seed=6))).all()


def test_each_source_has_its_own_model(detector):
    fan_as_fan = detector.score("fan", spectrogram(6, FAN_LINES, seed=300))
    fan_as_pump = detector.score("pump", spectrogram(6, FAN_LINES, seed=300))
    assert fan_as_pump.min() > fan_as_fan.max()


def test_scoring_leaves_the_input_alone_and_is_batch_independent(detector):
    x = spectrogram(40, seed=400)  # more than one scoring batch
    before = x.clone()
    scores = detector.score("pump", x)
    assert torch.equal(x, before)
    assert np.allclose(scores[35:], detector.score("pump", x[35:]), rtol=1e-5)
    assert detector.score("pump", x[:0]).shape == (0,)
    x[3, 0, 0, 0] = float("nan")  # one damaged tensor does not spoil the others in its batch
    damaged = detector.score("pump", x)
    assert np.isnan(damaged[3]) and np.allclose(np.delete(damaged, 3), np.delete(scores, 3), rtol=1e-6)


def test_save_and_load_give_identical_scores(detector, tmp_path):
    path = save_detector(detector, tmp_path / "models" / "detector.pt")
    data = torch.load(path, weights_only=True)
    assert data["format"] == MODEL_FORMAT and data["args"] == dataclasses.asdict(detector.args)
    assert set(data["state_dicts"]) == {"pump", "fan"} and len(data["sha256"]["pump"]) == 64
    loaded = load_detector(path, features=FEATURES)
    x = spectrogram(5, seed=500, extra_lines=(60,))
    for source in ("pump", "fan"):
        assert np.array_equal(loaded.score(source, x), detector.score(source, x))
    assert loaded.norm.keys() == detector.norm.keys() and loaded.trained_on == detector.trained_on
    for source, (mean, std) in detector.norm.items():
        assert torch.equal(loaded.norm[source][0], mean) and torch.equal(loaded.norm[source][1], std)
    for source, profile in detector.profiles.items():
        for field in ("mean", "components", "std"):
            assert torch.equal(getattr(loaded.profiles[source], field), getattr(profile, field))
    assert loaded.args == detector.args


def test_a_full_size_detector_file_is_under_10_mb(tmp_path):
    args = AutoencoderArgs()  # the default width, as `signalcraft train-detector` uses
    torch.manual_seed(0)
    sources = ("pump", "fan", "valve", "slider")
    models = {s: ConvAutoencoder(args).eval() for s in sources}
    profile = BandProfile(torch.full((args.n_mels,), -70.0), torch.randn(4, args.n_mels),
                          torch.full((args.n_mels,), 2.0))
    detector = Detector(models, {s: flat_norm(args) for s in sources}, args, FEATURES, {},
                        {s: profile for s in sources})
    path = save_detector(detector, tmp_path / "detector.pt")
    size = path.stat().st_size
    print(f"\n{sum(p.numel() for p in models['pump'].parameters())} parameters per source, "
          f"{size / 1e6:.2f} MB for {len(sources)} sources")
    assert size < 10e6


def test_a_failed_save_keeps_the_previous_file(detector, tmp_path):
    """A write cut short (here by a file-size limit below the detector's size) raises a
    StorageError naming the file, and the previous detector stays whole."""
    path = save_detector(detector, tmp_path / "detector.pt")
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
    try:
        with pytest.raises(SignalcraftError, match="file too large") as e:
            save_detector(detector, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_unreadable_files_raise_detector_error_naming_the_file(detector, tmp_path):
    good = save_detector(detector, tmp_path / "good.pt").read_bytes()
    missing = tmp_path / "missing.pt"
    with pytest.raises(DetectorError, match="not found.*train-detector") as e:
        load_detector(missing)
    assert str(missing) in str(e.value) and e.value.exit_code == ExitCode.FAILURE
    cases = {
        "corrupt.pt": np.random.default_rng(0).bytes(4096),
        "truncated.pt": good[: len(good) // 2],
        "empty.pt": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DetectorError, match="not a readable detector model") as e:
            load_detector(path)
        assert str(path) in str(e.value)


def test_unknown_format_and_damaged_weights_are_refused(detector, tmp_path):
    path = save_detector(detector, tmp_path / "detector.pt")
    data = torch.load(path, weights_only=True)
    torch.save({**data, "format": MODEL_FORMAT + 1}, tmp_path / "future.pt")
    with pytest.raises(DetectorError, match=rf"future\.pt: detector format {MODEL_FORMAT + 1}"):
        load_detector(tmp_path / "future.pt")
    data["state_dicts"]["pump"]["encoder.0.weight"][0, 0, 0, 0] += 1.0
    torch.save(data, tmp_path / "damaged.pt")
    with pytest.raises(DetectorError, match=r"damaged\.pt: .*'pump' fail their checksum"):
        load_detector(tmp_path / "damaged.pt")
    torch.save({"something": "else"}, tmp_path / "other.pt")
    with pytest.raises(DetectorError, match=r"other\.pt: not a signalcraft detector"):
        load_detector(tmp_path / "other.pt")


def test_other_feature_settings_are_refused_with_the_difference(detector, tmp_path):
    path = save_detector(detector, tmp_path / "detector.pt")
    with pytest.raises(DetectorError, match=r"hop_length: model 669, data 33.*train-detector") as e:
        load_detector(path, features={**FEATURES, "hop_length": 33})
    assert str(path) in str(e.value) and "n_fft" not in str(e.value)
    with pytest.raises(DetectorError, match=r"sample_rate: model 16000, data 48000"):
        load_detector(path, features={**FEATURES, "sample_rate": 48000})


def test_scoring_an_unknown_source_or_wrong_shape_raises(detector):
    with pytest.raises(DetectorError, match=r"'valve'.*knows: fan, pump"):
        detector.score("valve", spectrogram(1))
    with pytest.raises(DetectorError, match=r"shape \(1, 240, 240\).*\(N, 1, 240, 240\)"):
        detector.score("pump", spectrogram(1)[0])
    with pytest.raises(DetectorError, match=r"shape \(2, 1, 120, 240\)"):
        detector.score("pump", torch.zeros(2, 1, 120, 240))


def test_training_refuses_tensors_it_cannot_use():
    with pytest.raises(DetectorError, match="'pump'.*shape \\(4, 240, 240\\)"):
        train_detector_models({"pump": torch.zeros(4, 240, 240)}, FEATURES, SMALL, progress=False)
    with pytest.raises(DetectorError, match="n_mels = 240 but the tensors have 64"):
        train_detector_models({"pump": torch.zeros(4, 1, 64, 64)}, FEATURES, SMALL, progress=False)
    with pytest.raises(DetectorError, match="multiple of 16"):
        train_detector_models({"pump": torch.zeros(4, 1, 100, 100)}, {}, SMALL, progress=False)
    with pytest.raises(DetectorError, match="no training tensors"):
        train_detector_models({}, FEATURES, SMALL, progress=False)


def test_training_is_repeatable_with_the_same_seed(capsys):
    config = autoencoder(channels=4, epochs=2, batch_size=4, seed=7)
    data = {"pump": spectrogram(8, seed=3)}
    x = spectrogram(4, seed=4, extra_lines=(60,))
    first = train_detector_models(data, FEATURES, config, progress=False, device="cpu")
    second = train_detector_models(data, FEATURES, config, progress=False, device="cpu")
    other = train_detector_models(data, FEATURES, autoencoder(channels=4, epochs=2, batch_size=4, seed=8), progress=False, device="cpu")
    assert np.array_equal(first.score("pump", x), second.score("pump", x))
    assert not np.array_equal(first.score("pump", x), other.score("pump", x))
    assert capsys.readouterr().err == ""  # progress=False: no bar
