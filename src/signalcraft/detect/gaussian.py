"""Scorers that describe a segment by a few statistics and score it by how far they
lie from a shrunk Gaussian of normal operation: ``bands``, ``modulation``, ``frames``,
``flux``.

Each kind is a feature module, tensors of shape = (N, 1, n_mels, n_frames) in dB ->
float64 features, and the same scoring path, an ``nn.Module``:

- ``bands`` (``BandStatistics``): for each of ``GROUPS`` groups of adjacent mel bands,
  the mean level over the segment and its standard deviation over frames. A new tone,
  a resonance, more broadband noise change the means; a machine that runs rougher or
  steadier changes the spreads.
- ``modulation`` (``ModulationFeatures``): how each group's level fluctuates: the
  magnitude spectrum over frames of the level minus its mean, averaged over ``MOD_BINS``
  ranges of rates, as log magnitude. A slide rail that rattles, a belt that slaps, a
  bearing that squeaks once a stroke change a machine's rhythm before its spectrum, and
  last too few frames to move a mean; a louder machine moves the levels, not their
  fluctuation.
- ``frames`` (``FrameWindows``): every ``WINDOW`` consecutive frames of the groups'
  levels, one window per frame. The score is the mean distance of the worst
  ``WORST_FRACTION`` of a segment's windows: a knock, a scrape or a squeal that lasts a
  fraction of a second is not averaged away by the rest of the segment.
- ``flux`` (``FluxFeatures``): for each pair of adjacent mel bands from
  ``detect.scorer.flux_min_hz`` up, how unsteadily its level changes from frame to
  frame: the log of the standard deviation over frames of the frame-to-frame change.
  Friction, rattle and scraping (a slide rail running dry) make the upper bands' levels
  jump faster and by more; the lower bands of a plant carry the room's own varying hum,
  which would only add spread. The first band is found from the cutoff in Hz and the
  feature settings, so the cutoff means the same at other ``n_mels`` and ``f_max``; it
  is saved in the detector file with the pair width.

Normal operation is a Gaussian over the features. With tens of calibration segments
and hundreds or thousands of features the sample covariance is singular, so it is shrunk
towards a multiple of the identity by the Ledoit-Wolf rule (the amount that minimises
the expected error, computed from the data). The score is the squared Mahalanobis
distance (about the number of features for a normal segment), computed as
``(|d|^2 - |d W|^2) / b`` with d the deviation from the mean and W a p x r matrix: from
the centred calibration features themselves when there are fewer of them than features
(the Woodbury identity, never a p x p inverse), from the eigenvectors of their
covariance otherwise. Fitting takes about a second and the detector file stays small.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import DetectConfig
from .model import RETRAIN, DetectorError, _state_sha256, fit_sources, scoring_input

GROUPS = 40  # groups of adjacent mel bands (the largest divisor of n_mels up to this)
MOD_BINS = 40  # ranges of modulation rate, up to half the frame rate
LOG_FLOOR = 1e-6  # added to magnitudes before the log (a band at the floor does not fluctuate)
VAR_FLOOR = 1e-6  # relative floor of the shrunk covariance's identity part
WINDOW = 5  # frames per window of the frames scorer (about 0.2 s at the default hop)
WORST_FRACTION = 0.1  # of a segment's windows, averaged for the frames scorer's score
FLUX_WIDTH = 2  # adjacent mel bands per pair of the flux scorer


def _groups(n_mels: int) -> int:
    return max(g for g in range(1, min(GROUPS, n_mels) + 1) if n_mels % g == 0)


def _group_levels(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, 1, n_mels, n_frames) dB -> (N, groups, n_frames): each group's mean level, float64."""
    n, _, n_mels, n_frames = x.shape
    return x[:, 0].double().reshape(n, groups, n_mels // groups, n_frames).mean(dim=2)


class BandStatistics(nn.Module):
    """dB tensors, shape = (N, 1, n_mels, n_frames) -> (N, 2 * groups): each group's
    mean level and its standard deviation over frames."""

    def __init__(self, n_mels: int, n_frames: int):
        super().__init__()
        self.groups = _groups(n_mels)
        self.size = 2 * self.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = _group_levels(x, self.groups)
        return torch.cat([level.mean(dim=-1), level.std(dim=-1)], dim=1)


class ModulationFeatures(nn.Module):
    """dB tensors, shape = (N, 1, n_mels, n_frames) -> (N, groups * bins): the log
    magnitude of each group's level fluctuation in ``bins`` ranges of rate."""

    def __init__(self, n_mels: int, n_frames: int):
        super().__init__()
        self.groups = _groups(n_mels)
        rates = n_frames // 2  # rfft bins 1 .. n_frames // 2 (bin 0 is the mean, taken out)
        self.bins = min(MOD_BINS, rates)
        self.width = rates // self.bins
        self.size = self.groups * self.bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        level = _group_levels(x, self.groups)
        level = level - level.mean(dim=-1, keepdim=True)
        spectrum = torch.fft.rfft(level, dim=-1).abs()[:, :, 1:1 + self.bins * self.width]
        spectrum = spectrum.reshape(n, self.groups, self.bins, self.width).mean(dim=-1)
        return torch.log(spectrum + LOG_FLOOR).reshape(n, -1)


class FrameWindows(nn.Module):
    """dB tensors, shape = (N, 1, n_mels, n_frames) -> (N, windows, groups * WINDOW):
    the groups' levels in every ``WINDOW`` consecutive frames."""

    def __init__(self, n_mels: int, n_frames: int):
        super().__init__()
        self.groups = _groups(n_mels)
        self.window = min(WINDOW, n_frames)
        self.size = self.groups * self.window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = _group_levels(x, self.groups).unfold(2, self.window, 1)  # (N, groups, windows, window)
        return level.permute(0, 2, 1, 3).reshape(x.shape[0], -1, self.size)


class FluxFeatures(nn.Module):
    """dB tensors, shape = (N, 1, n_mels, n_frames) -> (N, pairs): for each ``width``
    adjacent mel bands from band ``first`` up, the log of the standard deviation over
    frames of their mean level's frame-to-frame change. A last band short of a full
    group is left out."""

    def __init__(self, n_mels: int, n_frames: int, first: int = 0, width: int = FLUX_WIDTH):
        super().__init__()
        if not (0 <= first and 1 <= width and first + width <= n_mels and n_frames >= 3):
            raise ValueError(f"no band group of {width} from band {first} in {n_mels} x {n_frames} tensors")
        self.first, self.width = int(first), int(width)
        self.groups = (n_mels - first) // width
        self.size = self.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, _, n_frames = x.shape
        bands = x[:, 0, self.first:self.first + self.groups * self.width].double()
        level = bands.reshape(n, self.groups, self.width, n_frames).mean(dim=2)
        change = level[:, :, 1:] - level[:, :, :-1]  # plain slicing: exports to ONNX as it is
        return torch.log(change.std(dim=-1) + LOG_FLOOR)


def flux_first_band(features: dict, min_hz: float, width: int = FLUX_WIDTH) -> int:
    """The first mel band at or above ``min_hz``: the lowest whose centre frequency is
    ``min_hz`` or more, for tensors made with ``features`` (``LogMel.settings()``:
    ``n_mels``, ``f_min``, ``f_max``, ``mel_scale``).

    Raises
    ------
    DetectorError
        The settings are missing, or fewer than ``width`` bands lie above ``min_hz``.
    """
    import librosa

    missing = [k for k in ("n_mels", "f_min", "f_max") if features.get(k) is None]
    if missing:
        raise DetectorError(f"the flux scorer needs the feature settings of the tensors ({', '.join(missing)} "
                            "missing) to find the bands above detect.scorer.flux_min_hz; pass LogMel.settings().")
    n_mels, f_min, f_max = int(features["n_mels"]), float(features["f_min"]), float(features["f_max"])
    # The filterbank has n_mels + 2 points equally spaced in mel; band k peaks at point k + 1.
    centres = librosa.mel_frequencies(n_mels + 2, fmin=f_min, fmax=f_max,
                                      htk=features.get("mel_scale", "slaney") == "htk")[1:-1]
    first = int(np.searchsorted(centres, min_hz, side="left"))
    if first + width > n_mels:
        raise DetectorError(f"detect.scorer.flux_min_hz: {min_hz:g} Hz leaves fewer than {width} of the {n_mels} "
                            f"mel bands above it (they reach {f_max:g} Hz, features.f_max); lower it.")
    return first


class ShrunkGaussian(nn.Module):
    """Squared Mahalanobis distance under a Ledoit-Wolf shrunk covariance
    ``(1 - s) S + s mu I`` (S the sample covariance, mu its mean eigenvalue), as
    ``(|d|^2 - |d W|^2) / b``."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, b: float):
        super().__init__()
        # Kept as float32 (what the file holds, so a loaded model scores exactly the same);
        # the arithmetic is in float64.
        self.register_buffer("mean", mean.float())  # (p,)
        self.register_buffer("basis", basis.float())  # W, (p, r), r <= min(n, p)
        self.b = float(b)

    @classmethod
    def fit(cls, features: torch.Tensor) -> "ShrunkGaussian":
        """From normal features, shape = (n, p), n >= 2."""
        f = features.double()
        n, p = f.shape
        mean = f.mean(dim=0)
        x = f - mean
        # The Ledoit-Wolf amount needs the trace and squared Frobenius norm of the sample
        # covariance x^T x / n, which the n x n Gram matrix gives as well as the p x p one.
        small = x @ x.T if n <= p else x.T @ x
        trace = float(x.pow(2).sum()) / n
        mu = trace / p
        delta_ = float(small.pow(2).sum()) / n**2
        beta_ = float(x.pow(2).sum(dim=1).pow(2).sum())
        beta = (beta_ / n - delta_) / (p * n)
        delta = (delta_ - 2 * mu * trace + p * mu**2) / p
        shrinkage = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
        b = max(shrinkage * mu, VAR_FLOOR * max(mu, VAR_FLOOR))
        c = (1 - shrinkage) / n  # covariance = c x^T x + b I
        if c <= 0:
            basis = torch.zeros((p, 0), dtype=torch.float64)
        elif n <= p:
            # Woodbury: (b I + c x^T x)^-1 = (I - x^T (b/c I + x x^T)^-1 x) / b.
            inverse = torch.linalg.inv(b / c * torch.eye(n, dtype=torch.float64) + small)
            basis = x.T @ torch.linalg.cholesky((inverse + inverse.T) / 2)
        else:
            # x^T x = V diag(l) V^T: the inverse is (I - V diag(c l / (c l + b)) V^T) / b.
            eigenvalues, vectors = torch.linalg.eigh(small)
            eigenvalues = eigenvalues.clamp_min(0)
            basis = vectors * (c * eigenvalues / (c * eigenvalues + b)).sqrt()
        return cls(mean, basis, b)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features, shape = (..., p) -> distances, float64, shape = (...)."""
        d = features.double() - self.mean.double()
        return (d.pow(2).sum(dim=-1) - (d @ self.basis.double()).pow(2).sum(dim=-1)) / self.b


class GaussianScorer(nn.Module):
    """The whole scoring path of one source: tensors -> scores, float64, shape = (N,).
    Features with a window axis, shape = (N, windows, p), score the mean of the worst
    ``WORST_FRACTION`` of windows."""

    def __init__(self, features: nn.Module, gaussian: ShrunkGaussian):
        super().__init__()
        self.features = features
        self.gaussian = gaussian

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distance = self.gaussian(self.features(x))
        if distance.ndim == 2:
            worst = max(1, round(WORST_FRACTION * distance.shape[1]))
            distance = distance.topk(worst, dim=1).values.mean(dim=1)
        return distance


@dataclasses.dataclass
class GaussianDetector:
    """One ``GaussianScorer`` per source type, shared across microphones. Subclasses
    name their ``kind`` and feature module."""

    kind: typing.ClassVar[str]
    extractor: typing.ClassVar[type]
    # Fitting costs a second, so the levels are fitted on scores of models that left
    # out a tenth of the calibration data each: close to how the final model, fitted on
    # all of it, scores new normal segments.
    cross_fit_folds: typing.ClassVar[int] = 10

    models: dict[str, GaussianScorer]
    n_mels: int
    n_frames: int
    features: dict  # LogMel.settings() of the training data
    trained_on: dict  # source -> tensors, date, seconds

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.models)

    @classmethod
    def fit(cls, tensors_by_source: dict[str, torch.Tensor], features: dict, config: DetectConfig):
        """Fit one Gaussian per source on its normal tensors (at least 2), shape =
        (N, 1, n_mels, n_frames).

        Raises
        ------
        DetectorError
            No sources, fewer than 2 tensors of a source, wrong shapes, non-finite values.
        """
        def fit_one(x: torch.Tensor, n_mels: int, n_frames: int) -> GaussianScorer:
            extract = cls.extractor(n_mels, n_frames)
            return GaussianScorer(extract, ShrunkGaussian.fit(extract(x).reshape(-1, extract.size))).eval()

        models, n_mels, n_frames, features, trained_on = fit_sources(cls.kind, tensors_by_source, features, fit_one)
        return cls(models=models, n_mels=n_mels, n_frames=n_frames, features=features, trained_on=trained_on)

    def score(self, source: str, tensors: torch.Tensor) -> np.ndarray:
        """Anomaly scores, float64, shape = (N,), of float32 dB tensors, shape = (N, 1,
        n_mels, n_frames): the squared Mahalanobis distance of their features from
        normal (about the number of features for a normal tensor).

        Raises
        ------
        DetectorError
            ``source`` is unknown, or the tensors have the wrong shape.
        """
        model, x = scoring_input(self.models, source, tensors, (self.n_mels, self.n_frames))
        with torch.no_grad():
            return model(x.to(torch.float32)).numpy()

    def scoring_module(self, source: str) -> nn.Module:
        """The scoring path of ``source``: its ``GaussianScorer``."""
        return self.models[source]

    @classmethod
    def _extractor(cls, n_mels: int, n_frames: int, args: dict) -> nn.Module:
        """The feature module of a saved model, from the file's ``args``."""
        return cls.extractor(n_mels, n_frames)

    def to_data(self) -> dict[str, Any]:
        states = {s: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                  for s, m in self.models.items()}
        return {
            "args": {"n_mels": self.n_mels, "n_frames": self.n_frames},
            "features": dict(self.features),
            "trained_on": self.trained_on,
            "identity": {s: m.gaussian.b for s, m in self.models.items()},
            "state_dicts": states,
            "sha256": {s: _state_sha256(state) for s, state in states.items()},
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]):
        n_mels, n_frames = int(data["args"]["n_mels"]), int(data["args"]["n_frames"])
        models = {}
        for source, state in data["state_dicts"].items():
            if _state_sha256(state) != data["sha256"][source]:
                raise DetectorError(f"the model of source {source!r} fails its checksum (the file is damaged). "
                                    f"Restore the file or {RETRAIN}.")
            extract = cls._extractor(n_mels, n_frames, data["args"])
            mean, basis = state["gaussian.mean"], state["gaussian.basis"]
            b = float(data["identity"][source])
            if mean.shape != (extract.size,) or basis.ndim != 2 or basis.shape[0] != extract.size \
                    or basis.shape[1] > extract.size or not (math.isfinite(b) and b > 0):
                raise ValueError(f"the model of source {source!r} does not fit {n_mels} x {n_frames} tensors")
            models[source] = GaussianScorer(extract, ShrunkGaussian(mean, basis, b)).eval()
        return cls(models=models, n_mels=n_mels, n_frames=n_frames, features=dict(data["features"]),
                   trained_on=dict(data["trained_on"]))


class BandsDetector(GaussianDetector):
    """The scorer of kind ``bands``: each band group's level and spread."""

    kind = "bands"
    extractor = BandStatistics


class ModulationDetector(GaussianDetector):
    """The scorer of kind ``modulation``: how each band group's level fluctuates."""

    kind = "modulation"
    extractor = ModulationFeatures


class FramesDetector(GaussianDetector):
    """The scorer of kind ``frames``: the worst short windows of each segment."""

    kind = "frames"
    extractor = FrameWindows


class FluxDetector(GaussianDetector):
    """The scorer of kind ``flux``: how unsteadily each pair of upper bands changes
    level. The first band and the pair width are saved in the file's ``args``
    (``first_band``, ``band_width``), so a loaded detector reads the bands it was fitted
    on whatever ``detect.scorer.flux_min_hz`` says now."""

    kind = "flux"
    extractor = FluxFeatures

    @classmethod
    def fit(cls, tensors_by_source: dict[str, torch.Tensor], features: dict, config: DetectConfig):
        """Fit one Gaussian per source on its normal tensors (at least 2), shape =
        (N, 1, n_mels, n_frames), on the bands from ``config.scorer.flux_min_hz`` up.

        Raises
        ------
        DetectorError
            No feature settings, a cutoff with too few bands above it, or what
            ``GaussianDetector.fit`` raises.
        """
        first = flux_first_band(dict(features or {}), config.scorer.flux_min_hz)

        def fit_one(x: torch.Tensor, n_mels: int, n_frames: int) -> GaussianScorer:
            extract = FluxFeatures(n_mels, n_frames, first, FLUX_WIDTH)
            return GaussianScorer(extract, ShrunkGaussian.fit(extract(x))).eval()

        models, n_mels, n_frames, features, trained_on = fit_sources(cls.kind, tensors_by_source, features, fit_one)
        return cls(models=models, n_mels=n_mels, n_frames=n_frames, features=features, trained_on=trained_on)

    @classmethod
    def _extractor(cls, n_mels: int, n_frames: int, args: dict) -> nn.Module:
        if "first_band" not in args or "band_width" not in args:
            raise DetectorError(f"this flux detector file does not say which mel bands it reads (no first_band "
                                f"and band_width); {RETRAIN}.")
        return FluxFeatures(n_mels, n_frames, int(args["first_band"]), int(args["band_width"]))

    def to_data(self) -> dict[str, Any]:
        data = super().to_data()
        extract = next(iter(self.models.values())).features
        data["args"].update(first_band=extract.first, band_width=extract.width)
        return data
