"""Scorer kinds: what each sees, their round trip through the detector file, the
ensemble's standardisation, the registry that the file's kind selects, and the one
cross-fitting used by detect, train-detector and the benchmarks."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from signalcraft.config import ConfigError, DetectConfig, ScorerConfig, config_from_dict
from signalcraft.detect import scorers
from signalcraft.detect.ensemble import EnsembleDetector
from signalcraft.detect.gaussian import FluxFeatures, FrameWindows, ModulationFeatures, ShrunkGaussian, flux_first_band
from signalcraft.detect.model import MODEL_FORMAT, DetectorError, load_detector, save_detector
from signalcraft.detect.scorers import SCORERS, cross_fit, fit_detector, pooled

from test_detect_model import FEATURES, PUMP_LINES, SMALL, spectrogram


def kind(name: str, **settings) -> DetectConfig:
    return DetectConfig(scorer=ScorerConfig(kind=name, autoencoder=SMALL.scorer.autoencoder, **settings))


MODULATION = kind("modulation")


def rattling(n: int, seed: int, period: int = 16, bands=(150, 200)) -> torch.Tensor:
    """Pump tensors with a short knock every ``period`` frames in ``bands``: the mean
    level of those bands rises by well under a dB, their rhythm changes."""
    x = spectrogram(n, PUMP_LINES, seed=seed)
    lo, hi = bands
    x[:, :, lo:hi, ::period] += 8.0
    return x


def knocked(n: int, seed: int, at: int = 100, frames: int = 4, bands=(150, 200)) -> torch.Tensor:
    """Pump tensors with one knock of ``frames`` frames: 20 dB in ``bands``."""
    x = spectrogram(n, PUMP_LINES, seed=seed)
    lo, hi = bands
    x[:, :, lo:hi, at:at + frames] += 20.0
    return x


def wandering(n: int, seed: int, fast: bool = False, lo: int = 150, db: float = 2.0) -> torch.Tensor:
    """Pump tensors whose upper bands (``lo`` up) wander in level together: slowly (a
    sine of 120 frames, random phase), or, ``fast``, through exactly the same levels in a
    shuffled order, so each band's median, mean and spread over frames stay as they were
    and only how fast the level changes from frame to frame is new."""
    x = spectrogram(n, PUMP_LINES, seed=seed)
    rng = np.random.default_rng(seed + 1000)
    t = np.arange(x.shape[-1])
    for k in range(n):
        wander = db * np.sin(2 * np.pi * t / 120 + rng.uniform(0, 2 * np.pi))
        if fast:
            wander = rng.permutation(wander)
        x[k, 0, lo:] += torch.from_numpy(wander.astype(np.float32))
    return x


@pytest.fixture(scope="module")
def fitted() -> dict:
    """A detector of every kind, fitted on the same normal pump tensors."""
    train = {"pump": spectrogram(40, PUMP_LINES, seed=1)}
    return {name: fit_detector(train, FEATURES, kind(name)) for name in SCORERS}


def test_the_kind_in_the_config_selects_the_scorer(fitted):
    for name, detector in fitted.items():
        assert type(detector) is SCORERS[name] and detector.kind == name
        assert detector.sources == ("pump",)
    assert isinstance(fitted["ensemble"], EnsembleDetector) and DetectConfig().scorer.kind == "ensemble"
    assert set(fitted["ensemble"].members) == {"profile", "modulation"}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_save_and_load_give_identical_scores(fitted, tmp_path, name):
    detector = fitted[name]
    path = save_detector(detector, tmp_path / "detector.pt")
    data = torch.load(path, weights_only=True)
    assert data["format"] == MODEL_FORMAT and data["kind"] == name
    loaded = load_detector(path, features=FEATURES)
    assert type(loaded) is type(detector)
    x = torch.cat([spectrogram(5, PUMP_LINES, seed=9), rattling(3, seed=10), spectrogram(3, seed=11,
                                                                                          extra_lines=(60,))])
    assert np.array_equal(loaded.score("pump", x), detector.score("pump", x))


def test_a_knock_every_few_frames_scores_far_above_normal(fitted):
    normal = fitted["modulation"].score("pump", spectrogram(20, PUMP_LINES, seed=50))
    knocking = fitted["modulation"].score("pump", rattling(20, seed=51))
    assert knocking.min() > 1.5 * normal.max()
    assert float((rattling(1, 7) - spectrogram(1, PUMP_LINES, seed=7))[0, 0, 150:200].mean()) <= 0.5  # dB


def test_a_louder_machine_is_not_a_different_rhythm(fitted):
    """The modulation scorer describes fluctuation, not level: slow load or room changes
    do not look like a fault (the profile watches levels)."""
    normal = fitted["modulation"].score("pump", spectrogram(20, PUMP_LINES, seed=60))
    louder = fitted["modulation"].score("pump", spectrogram(20, PUMP_LINES, seed=60, gain_db=6.0))
    assert np.allclose(louder, normal, rtol=0.05)


def test_a_new_tone_is_the_profiles_and_a_single_knock_the_frames(fitted):
    normal = spectrogram(20, PUMP_LINES, seed=70)
    tone = spectrogram(20, PUMP_LINES, seed=70, extra_lines=(60,))
    knock = knocked(20, seed=70)
    profile, frames = fitted["profile"], fitted["frames"]
    assert profile.score("pump", tone).min() > 3 * profile.score("pump", normal).max()
    assert frames.score("pump", knock).min() > 3 * frames.score("pump", normal).max()
    # One knock of 4 frames in 240 hardly moves a band's median level.
    assert profile.score("pump", knock).max() < 1.5 * profile.score("pump", normal).max()


def test_the_ensemble_flags_what_any_member_sees(fitted):
    ensemble = fitted["ensemble"]
    normal = ensemble.score("pump", spectrogram(20, PUMP_LINES, seed=80))
    for fault in (rattling(20, seed=81), spectrogram(20, PUMP_LINES, seed=81, extra_lines=(60,))):
        z = ensemble.member_z("pump", fault)
        assert np.allclose(ensemble.score("pump", fault), np.log1p(np.exp(np.maximum(z["profile"], z["modulation"]))))
        assert ensemble.score("pump", fault).min() > normal.max()
    # Standardised on scores of data each member did not see: a typical normal is about 0.7.
    assert 0.1 < float(np.median(normal)) < 3


def test_the_ensemble_standardises_each_member_on_a_blocked_cross_fit(fitted):
    """Each member's mean and spread come from scores of five contiguous blocks of the
    calibration tensors (stretches of time), each scored by a model fitted on the rest."""
    train = spectrogram(40, PUMP_LINES, seed=1)
    for name in ("profile", "modulation"):
        member = SCORERS[name]
        held_out = np.concatenate([
            member.fit({"pump": torch.cat([train[:8 * k], train[8 * (k + 1):]])}, FEATURES, kind(name))
            .score("pump", train[8 * k:8 * (k + 1)]) for k in range(5)])
        logs = np.log(held_out + 1e-12)
        assert fitted["ensemble"].standard["pump"][name] == pytest.approx((logs.mean(), logs.std()), rel=1e-9)
        # Out-of-block scores are higher than in-sample ones, which would make every new segment look abnormal.
        assert logs.mean() > np.log(fitted[name].score("pump", train)).mean()


def test_the_online_scorer_learns_only_what_it_is_given(fitted):
    online = fitted["online"]
    x = spectrogram(3, PUMP_LINES, seed=90)
    state = online.learn("pump", x)
    json.dumps(state)  # plain data, as the state file stores it
    again = online.learn("pump", x)
    assert state == again  # the calibration forest itself did not change
    assert np.array_equal(online.score("pump", x), online.score("pump", x, state=None))
    later = online.learn("pump", spectrogram(60, PUMP_LINES, seed=91), state=state)
    assert later["counter"] != state["counter"] or later["r_mass"] != state["r_mass"]
    with pytest.raises(DetectorError, match="damaged"):
        online.score("pump", x, state={**state, "l_mass": state["l_mass"][:1]})
    with pytest.raises(DetectorError, match="another River"):
        online.score("pump", x, state={**state, "structure": "0" * 64})


@pytest.mark.parametrize("n, p", [(30, 200), (200, 30)])
def test_the_shrunk_gaussian_is_ledoit_wolf(n, p):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train = rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) * 0.1 + 3.0
    test = rng.standard_normal((10, p)) * 0.3 + 3.0
    ours = ShrunkGaussian.fit(torch.from_numpy(train))(torch.from_numpy(test)).numpy()
    theirs = LedoitWolf().fit(train).mahalanobis(test)
    assert np.allclose(ours, theirs, rtol=1e-3)


def test_features_have_the_documented_size():
    extract = ModulationFeatures(240, 240)
    assert (extract.groups, extract.bins, extract.width) == (40, 40, 3)
    assert extract(torch.zeros(2, 1, 240, 240)).shape == (2, 1600)
    assert ModulationFeatures(64, 32).groups == 32
    assert FrameWindows(240, 240)(torch.zeros(2, 1, 240, 240)).shape == (2, 236, 200)


def test_a_file_of_an_unknown_kind_or_an_older_format_is_refused(fitted, tmp_path):
    data = torch.load(save_detector(fitted["modulation"], tmp_path / "d.pt"), weights_only=True)
    torch.save({**data, "kind": "forest"}, tmp_path / "forest.pt")
    with pytest.raises(DetectorError, match="forest.pt: a detector of kind 'forest'.*train-detector"):
        load_detector(tmp_path / "forest.pt")
    torch.save({**data, "format": 4}, tmp_path / "old.pt")
    with pytest.raises(DetectorError, match=f"old.pt: detector format 4 .*reads format {MODEL_FORMAT}.*train-detector"):
        load_detector(tmp_path / "old.pt")
    damaged = {**data, "state_dicts": {"pump": {**data["state_dicts"]["pump"],
                                               "gaussian.mean": data["state_dicts"]["pump"]["gaussian.mean"] + 1}}}
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(DetectorError, match="fails its checksum"):
        load_detector(tmp_path / "damaged.pt")


def test_a_damaged_ensemble_or_profile_file_is_refused(fitted, tmp_path):
    data = torch.load(save_detector(fitted["ensemble"], tmp_path / "e.pt"), weights_only=True)
    data["standard"]["pump"]["profile"] = [float("nan"), 1.0]
    torch.save(data, tmp_path / "nan.pt")
    with pytest.raises(DetectorError, match="nan.pt: damaged detector model.*not finite"):
        load_detector(tmp_path / "nan.pt")
    data = torch.load(save_detector(fitted["profile"], tmp_path / "p.pt"), weights_only=True)
    data["profiles"]["pump"]["std"][3] = -1.0
    torch.save(data, tmp_path / "negative.pt")
    with pytest.raises(DetectorError, match="negative.pt: damaged detector model.*positive spreads"):
        load_detector(tmp_path / "negative.pt")


def test_the_scorer_section_is_checked_and_old_keys_are_pointed_to_their_new_place():
    with pytest.raises(ConfigError, match=r"detect\.scorer\.members: 'online' is not a scorer an ensemble can hold"):
        config_from_dict({"detect": {"scorer": {"members": ["profile", "online"]}}})
    with pytest.raises(ConfigError, match=r"detect\.scorer: now a section; write detect\.scorer: \{kind: modulation\}"):
        config_from_dict({"detect": {"scorer": "modulation"}})
    with pytest.raises(ConfigError, match=r"detect\.alert_k: this key is now detect\.alerts\.k"):
        config_from_dict({"detect": {"alert_k": 2}})
    with pytest.raises(ConfigError, match=r"detect\.epochs: this key is now detect\.scorer\.autoencoder\.epochs"):
        config_from_dict({"detect": {"epochs": 2}})
    config = config_from_dict({"detect": {"scorer": {"kind": "frames"}, "alerts": {"k": 2, "n": 4}}})
    assert config.detect.scorer.kind == "frames" and (config.detect.alerts.k, config.detect.alerts.n) == (2, 4)


def test_cross_fit_scores_each_segment_with_a_model_that_did_not_see_it():
    segments = [{(0, "pump"): t, (1, "pump"): t + 0.1} for t in spectrogram(12, PUMP_LINES, seed=3)]
    segments[5] = {(0, "pump"): rattling(1, seed=4)[0], (1, "pump"): rattling(1, seed=5)[0]}
    seen = []

    def fit(tensors):
        seen.append(len(tensors["pump"]))
        return fit_detector(tensors, FEATURES, MODULATION)

    scores = cross_fit(segments, fit, folds=4)
    assert seen == [18, 18, 18, 18]  # three segments (six tensors) held out each time
    assert sorted(scores) == [(0, "pump"), (1, "pump")] and len(scores[(0, "pump")]) == 12
    assert int(np.argmax(scores[(0, "pump")])) == 5  # the odd one out stands out, as it would not in-sample
    assert pooled(segments[:2])["pump"].shape == (4, 1, 240, 240)


def test_the_detection_benchmark_uses_the_products_cross_fit():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_detection.py"
    spec = importlib.util.spec_from_file_location("bench_detection", path)
    bench = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(path.parent))
    assert bench.cross_fit is scorers.cross_fit and bench.fit_detector is scorers.fit_detector


def test_the_ensemble_needs_three_tensors_per_source_and_says_so():
    with pytest.raises(DetectorError, match="source 'pump': 2 tensor\\(s\\) to fit on; the ensemble needs at least 3"):
        fit_detector({"pump": spectrogram(2, PUMP_LINES, seed=12)}, FEATURES, kind("ensemble"))
    assert fit_detector({"pump": spectrogram(3, PUMP_LINES, seed=12)}, FEATURES, kind("ensemble")).sources == ("pump",)


def test_flux_hears_faster_level_changes_in_the_upper_bands_that_band_levels_do_not():
    """A slide rail that starts to scrape: its upper bands pass through the same levels
    as before, but jump between them from frame to frame. Each band's median (profile)
    and each group's mean and spread (bands) do not move; the flux scorer does."""
    train = {"pump": wandering(40, seed=1)}
    normal, fault = wandering(20, seed=100), wandering(20, seed=100, fast=True)
    for name in ("profile", "bands"):
        detector = fit_detector(train, FEATURES, kind(name))
        assert detector.score("pump", fault).max() < 1.5 * detector.score("pump", normal).max(), name
    flux = fit_detector(train, FEATURES, kind("flux"))
    assert flux.score("pump", fault).min() > 3 * flux.score("pump", normal).max()
    # Below the cutoff nothing is read: the same fault under 2.5 kHz goes unheard.
    low = wandering(20, seed=100, fast=True, lo=0)
    low[:, :, 150:] = normal[:, :, 150:]
    assert flux.score("pump", low).max() < 1.5 * flux.score("pump", normal).max()


def test_the_flux_cutoff_is_in_hz_and_saved_with_the_detector(fitted, tmp_path):
    # 2.5 kHz is band 150 of 240 Slaney bands up to 8 kHz, and band 75 of 120; the pairs above it.
    assert flux_first_band(FEATURES, 2500.0) == 150
    assert flux_first_band({**FEATURES, "n_mels": 120}, 2500.0) == 75
    assert flux_first_band({**FEATURES, "f_max": 4000.0}, 2500.0) > 150
    assert flux_first_band(FEATURES, 0.0) == 0
    extract = FluxFeatures(240, 240, 150, 2)
    assert extract.size == 45 and extract(torch.zeros(3, 1, 240, 240)).shape == (3, 45)
    assert FluxFeatures(240, 240, 151, 2).size == 44  # a last band short of a pair is left out
    flux = fitted["flux"]
    data = torch.load(save_detector(flux, tmp_path / "flux.pt"), weights_only=True)
    assert (data["args"]["first_band"], data["args"]["band_width"]) == (150, 2)
    # A detector fitted with another cutoff keeps its own bands through the file.
    other = fit_detector({"pump": spectrogram(40, PUMP_LINES, seed=1)}, FEATURES,
                         kind("flux", flux_min_hz=1000.0))
    loaded = load_detector(save_detector(other, tmp_path / "other.pt"))
    assert loaded.models["pump"].features.first == flux_first_band(FEATURES, 1000.0) < 150
    x = wandering(4, seed=5, fast=True)
    assert np.array_equal(loaded.score("pump", x), other.score("pump", x))
    # An ensemble holding flux goes through the file the same way.
    ensemble = fit_detector({"pump": spectrogram(20, PUMP_LINES, seed=1)}, FEATURES,
                            kind("ensemble", members=("profile", "modulation", "flux")))
    again = load_detector(save_detector(ensemble, tmp_path / "ensemble.pt"), features=FEATURES)
    assert set(again.members) == {"profile", "modulation", "flux"}
    assert np.array_equal(again.score("pump", x), ensemble.score("pump", x))
    # A flux file that does not say which bands it reads is refused, not guessed.
    del data["args"]["first_band"]
    torch.save(data, tmp_path / "old.pt")
    with pytest.raises(DetectorError, match="old.pt: this flux detector file does not say which mel bands.*train-detector"):
        load_detector(tmp_path / "old.pt")


def test_the_flux_cutoff_is_checked_against_the_mel_bands():
    with pytest.raises(ConfigError, match=r"detect\.scorer\.flux_min_hz: must be 0 Hz or more"):
        config_from_dict({"detect": {"scorer": {"flux_min_hz": -1}}})
    with pytest.raises(ConfigError, match=r"detect\.scorer\.flux_min_hz: 8000 Hz is not below the top of the mel "
                                          r"bands \(8000 Hz: half of capture\.sample_rate\)"):
        config_from_dict({"detect": {"scorer": {"kind": "flux", "flux_min_hz": 8000}}})
    with pytest.raises(ConfigError, match=r"detect\.scorer\.flux_min_hz: 5000 Hz .*\(4000 Hz: features\.f_max\)"):
        config_from_dict({"features": {"f_max": 4000}, "detect": {"scorer": {
            "kind": "ensemble", "members": ["profile", "flux"], "flux_min_hz": 5000}}})
    # Unused, it is not in the way; in range, it is taken.
    assert config_from_dict({"detect": {"scorer": {"kind": "profile", "flux_min_hz": 9000}}}).detect.scorer.kind == "profile"
    assert config_from_dict({"detect": {"scorer": {"kind": "flux", "flux_min_hz": 3000}}}).detect.scorer.flux_min_hz == 3000
    # Below f_max but above every band's centre, or without the feature settings: the fit says so.
    train = {"pump": spectrogram(4, PUMP_LINES, seed=1)}
    with pytest.raises(DetectorError, match=r"flux_min_hz: 7990 Hz leaves fewer than 2 of the 240 mel bands above it"):
        fit_detector(train, FEATURES, kind("flux", flux_min_hz=7990.0))
    with pytest.raises(DetectorError, match=r"needs the feature settings.*f_min, f_max missing"):
        fit_detector(train, {"n_mels": 240}, kind("flux"))
