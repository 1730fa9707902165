"""Scorer kinds: the modulation scorer, the registry that the detector file's kind
selects, and the one cross-fitting used by detect, train-detector and the benchmarks."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from signalcraft.detect import scorers
from signalcraft.detect.model import MODEL_FORMAT, DetectorError, load_detector, save_detector
from signalcraft.detect.modulation import ModulationDetector, ModulationFeatures, ShrunkGaussian
from signalcraft.detect.scorers import SCORERS, cross_fit, fit_detector, pooled

from test_detect_model import FEATURES, PUMP_LINES, SMALL, spectrogram

MODULATION = dataclasses.replace(SMALL, scorer="modulation")


def rattling(n: int, seed: int, period: int = 16, bands=(150, 200)) -> torch.Tensor:
    """Pump tensors with a short knock every ``period`` frames in ``bands``: the mean
    level of those bands rises by well under a dB, their rhythm changes."""
    x = spectrogram(n, PUMP_LINES, seed=seed)
    lo, hi = bands
    x[:, :, lo:hi, ::period] += 8.0
    return x


@pytest.fixture(scope="module")
def modulation() -> ModulationDetector:
    return fit_detector({"pump": spectrogram(40, PUMP_LINES, seed=1)}, FEATURES, MODULATION)


def test_the_kind_in_the_config_selects_the_scorer(modulation):
    assert isinstance(modulation, ModulationDetector) and SCORERS["modulation"] is ModulationDetector
    assert modulation.sources == ("pump",) and modulation.trained_on["pump"]["tensors"] == 40


def test_a_knock_every_few_frames_scores_far_above_normal(modulation):
    normal = modulation.score("pump", spectrogram(20, PUMP_LINES, seed=50))
    knocking = modulation.score("pump", rattling(20, seed=51))
    assert knocking.min() > 1.5 * normal.max()
    assert float((rattling(1, 7) - spectrogram(1, PUMP_LINES, seed=7))[0, 0, 150:200].mean()) <= 0.5  # dB


def test_a_louder_machine_is_not_a_different_rhythm(modulation):
    """The modulation scorer describes fluctuation, not level: slow load or room changes
    do not look like a fault (the autoencoder and band profiles watch levels)."""
    normal = modulation.score("pump", spectrogram(20, PUMP_LINES, seed=60))
    louder = modulation.score("pump", spectrogram(20, PUMP_LINES, seed=60, gain_db=6.0))
    assert np.allclose(louder, normal, rtol=0.05)


def test_the_shrunk_gaussian_is_ledoit_wolf():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train = rng.standard_normal((30, 200)) @ rng.standard_normal((200, 200)) * 0.1 + 3.0  # n < p
    test = rng.standard_normal((10, 200)) * 0.3 + 3.0
    ours = ShrunkGaussian.fit(torch.from_numpy(train))(torch.from_numpy(test)).numpy()
    theirs = LedoitWolf().fit(train).mahalanobis(test)
    assert np.allclose(ours, theirs, rtol=1e-3)


def test_features_have_the_documented_size():
    extract = ModulationFeatures(240, 240)
    assert (extract.groups, extract.bins, extract.width) == (40, 40, 3)
    assert extract(torch.zeros(2, 1, 240, 240)).shape == (2, 1600)
    assert ModulationFeatures(64, 32).groups == 32


def test_save_and_load_give_identical_scores(modulation, tmp_path):
    path = save_detector(modulation, tmp_path / "detector.pt")
    data = torch.load(path, weights_only=True)
    assert data["format"] == MODEL_FORMAT and data["kind"] == "modulation"
    loaded = load_detector(path, features=FEATURES)
    x = torch.cat([spectrogram(5, PUMP_LINES, seed=9), rattling(5, seed=10)])
    assert isinstance(loaded, ModulationDetector)
    assert np.array_equal(loaded.score("pump", x), modulation.score("pump", x))


def test_a_file_of_an_unknown_kind_or_an_older_format_is_refused(modulation, tmp_path):
    data = torch.load(save_detector(modulation, tmp_path / "d.pt"), weights_only=True)
    torch.save({**data, "kind": "forest"}, tmp_path / "forest.pt")
    with pytest.raises(DetectorError, match="forest.pt: a detector of kind 'forest'.*train-detector"):
        load_detector(tmp_path / "forest.pt")
    torch.save({**data, "format": 3}, tmp_path / "old.pt")
    with pytest.raises(DetectorError, match="old.pt: detector format 3 .*reads format 4.*train-detector"):
        load_detector(tmp_path / "old.pt")
    damaged = {**data, "state_dicts": {"pump": {**data["state_dicts"]["pump"],
                                               "gaussian.mean": data["state_dicts"]["pump"]["gaussian.mean"] + 1}}}
    torch.save(damaged, tmp_path / "damaged.pt")
    with pytest.raises(DetectorError, match="fails its checksum"):
        load_detector(tmp_path / "damaged.pt")


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
