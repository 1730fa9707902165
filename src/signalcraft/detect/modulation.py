"""The ``modulation`` scorer: how each band's level fluctuates within a segment,
against a shrunk Gaussian of normal operation.

Many real faults change a machine's rhythm before its spectrum: a slide rail that
rattles, a loose belt that slaps, a dry bearing that squeaks once a stroke. A
segment's median or mean spectrum hides these (they last a few frames), and an
autoencoder trained on a few minutes of audio reconstructs them about as well as it
reconstructs everything else. What they change is the *modulation spectrum*: for each
group of mel bands, how strongly the band level (dB) fluctuates at each rate over the
segment. So each tensor, shape = (1, n_mels, n_frames), becomes

- ``MOD_GROUPS`` groups of adjacent mel bands, each the mean of its bands (dB);
- per group, the magnitude spectrum over frames of its level minus its mean level,
  averaged over ``MOD_BINS`` equal ranges of rates up to half the frame rate, as log
  magnitude: ``MOD_GROUPS * MOD_BINS`` features. A louder machine moves the levels,
  not their fluctuation: the features describe the machine's rhythm, not the room's
  loudness, so a slow change of load or room level does not look like a fault.

Normal operation is a Gaussian over those features. With tens of calibration segments
and thousands of features the sample covariance is singular, so it is shrunk towards
a multiple of the identity by the Ledoit-Wolf rule (the amount that minimises the
expected error, computed from the data). The score is the squared Mahalanobis distance,
computed through the Woodbury identity from the centred calibration features
themselves (an n x n inverse, never a p x p one), so fitting takes a second and the
detector file stays small. Scoring is an ``nn.Module``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import clock
from ..config import DetectConfig
from .model import RETRAIN, DetectorError, _check_training_tensors, _state_sha256, scoring_input

MOD_GROUPS = 40  # groups of adjacent mel bands (the largest divisor of n_mels up to this)
MOD_BINS = 40  # ranges of modulation rate, up to half the frame rate
LOG_FLOOR = 1e-6  # added to magnitudes before the log (a band at the floor does not fluctuate)
VAR_FLOOR = 1e-6  # relative floor of the shrunk covariance's identity part


def _groups(n_mels: int) -> int:
    return max(g for g in range(1, min(MOD_GROUPS, n_mels) + 1) if n_mels % g == 0)


class ModulationFeatures(nn.Module):
    """float32 dB tensors, shape = (N, 1, n_mels, n_frames) -> float64 features, shape = (N, groups * bins)."""

    def __init__(self, n_mels: int, n_frames: int):
        super().__init__()
        self.n_mels, self.n_frames = n_mels, n_frames
        self.groups = _groups(n_mels)
        rates = n_frames // 2  # rfft bins 1 .. n_frames // 2 (bin 0 is the mean, taken out)
        self.bins = min(MOD_BINS, rates)
        self.width = rates // self.bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        level = x[:, 0].double().reshape(n, self.groups, self.n_mels // self.groups, self.n_frames).mean(dim=2)
        level = level - level.mean(dim=-1, keepdim=True)
        spectrum = torch.fft.rfft(level, dim=-1).abs()[:, :, 1:1 + self.bins * self.width]
        spectrum = spectrum.reshape(n, self.groups, self.bins, self.width).mean(dim=-1)
        return torch.log(spectrum + LOG_FLOOR).reshape(n, -1)


class ShrunkGaussian(nn.Module):
    """Squared Mahalanobis distance under a Ledoit-Wolf shrunk covariance
    ``c * X^T X + b * I`` (X: the centred calibration features, n x p)."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, inverse: torch.Tensor, b: float):
        super().__init__()
        # Kept as float32 (what the file holds, so a loaded model scores exactly the same);
        # the arithmetic is in float64.
        self.register_buffer("mean", mean.float())  # (p,)
        self.register_buffer("basis", basis.float())  # X, (n, p)
        self.register_buffer("inverse", inverse.float())  # (b / c * I + X X^T)^-1, (n, n); zeros when c = 0
        self.b = float(b)

    @classmethod
    def fit(cls, features: torch.Tensor) -> "ShrunkGaussian":
        """From normal features, shape = (n, p), n >= 2."""
        f = features.double()
        n, p = f.shape
        mean = f.mean(dim=0)
        x = f - mean
        gram = x @ x.T  # (n, n): everything below needs only this, never a p x p matrix
        trace = x.pow(2).sum() / n  # trace of the sample covariance
        mu = float(trace) / p
        delta_ = float(gram.pow(2).sum()) / n**2  # squared Frobenius norm of the sample covariance
        beta_ = float(x.pow(2).sum(dim=1).pow(2).sum())
        beta = (beta_ / n - delta_) / (p * n)
        delta = (delta_ - 2 * mu * float(trace) + p * mu**2) / p
        shrinkage = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
        b = max(shrinkage * mu, VAR_FLOOR * max(mu, VAR_FLOOR))
        c = (1 - shrinkage) / n
        if c > 0:
            inverse = torch.linalg.inv(b / c * torch.eye(n, dtype=torch.float64) + gram)
        else:
            inverse = torch.zeros((n, n), dtype=torch.float64)
        return cls(mean, x, inverse, b)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        d = features.double() - self.mean.double()
        projected = d @ self.basis.double().T  # (N, n)
        return ((d * d).sum(dim=-1) - ((projected @ self.inverse.double()) * projected).sum(dim=-1)) / self.b


class ModulationScorer(nn.Module):
    """The whole scoring path of one source: tensors -> scores, float64, shape = (N,)."""

    def __init__(self, features: ModulationFeatures, gaussian: ShrunkGaussian):
        super().__init__()
        self.features = features
        self.gaussian = gaussian

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gaussian(self.features(x))


@dataclasses.dataclass
class ModulationDetector:
    """One ``ModulationScorer`` per source type, shared across microphones: the scorer
    of kind ``modulation``."""

    kind: typing.ClassVar[str] = "modulation"
    # Fitting costs a second, so the levels are fitted on scores of models that left
    # out a tenth of the calibration data each: close to how the final model, fitted on
    # all of it, scores new normal segments.
    cross_fit_folds: typing.ClassVar[int] = 10

    models: dict[str, ModulationScorer]
    n_mels: int
    n_frames: int
    features: dict  # LogMel.settings() of the training data
    trained_on: dict  # source -> tensors, date, seconds

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.models)

    @classmethod
    def fit(cls, tensors_by_source: dict[str, torch.Tensor], features: dict, config: DetectConfig
            ) -> "ModulationDetector":
        """Fit one Gaussian per source on its normal tensors (at least 2), shape =
        (N, 1, n_mels, n_frames).

        Raises
        ------
        DetectorError
            No sources, fewer than 2 tensors of a source, wrong shapes, non-finite values.
        """
        features = dict(features or {})
        n_mels, n_frames = _check_training_tensors(tensors_by_source, features, multiple=1)
        models, trained_on = {}, {}
        for source in sorted(tensors_by_source):
            x = tensors_by_source[source].detach().to("cpu", torch.float32)
            if x.shape[0] < 2:
                raise DetectorError(f"source {source!r}: {x.shape[0]} tensor to fit on; the modulation scorer "
                                    "needs at least 2.")
            began = time.monotonic()
            extract = ModulationFeatures(n_mels, n_frames)
            with torch.no_grad():
                models[source] = ModulationScorer(extract, ShrunkGaussian.fit(extract(x))).eval()
            trained_on[source] = {"tensors": int(x.shape[0]), "date": clock.now().isoformat(timespec="seconds"),
                                  "seconds": round(time.monotonic() - began, 3)}
        return cls(models=models, n_mels=n_mels, n_frames=n_frames, features=features, trained_on=trained_on)

    def score(self, source: str, tensors: torch.Tensor) -> np.ndarray:
        """Anomaly scores, float64, shape = (N,), of float32 dB tensors, shape = (N, 1,
        n_mels, n_frames): the squared Mahalanobis distance of their modulation
        features from normal (about the number of features for a normal tensor).

        Raises
        ------
        DetectorError
            ``source`` is unknown, or the tensors have the wrong shape.
        """
        model, x = scoring_input(self.models, source, tensors, (self.n_mels, self.n_frames))
        with torch.no_grad():
            return model(x).numpy()

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
    def from_data(cls, data: dict[str, Any]) -> "ModulationDetector":
        n_mels, n_frames = int(data["args"]["n_mels"]), int(data["args"]["n_frames"])
        models = {}
        for source, state in data["state_dicts"].items():
            if _state_sha256(state) != data["sha256"][source]:
                raise DetectorError(f"the model of source {source!r} fails its checksum (the file is damaged). "
                                    f"Restore the file or {RETRAIN}.")
            extract = ModulationFeatures(n_mels, n_frames)
            p = extract.groups * extract.bins
            mean, basis, inverse = (state[f"gaussian.{k}"] for k in ("mean", "basis", "inverse"))
            b = float(data["identity"][source])
            if mean.shape != (p,) or basis.ndim != 2 or basis.shape[1] != p \
                    or inverse.shape != (basis.shape[0],) * 2 or not (math.isfinite(b) and b > 0):
                raise ValueError(f"the model of source {source!r} does not fit {n_mels} x {n_frames} tensors")
            models[source] = ModulationScorer(extract, ShrunkGaussian(mean, basis, inverse, b)).eval()
        return cls(models=models, n_mels=n_mels, n_frames=n_frames, features=dict(data["features"]),
                   trained_on=dict(data["trained_on"]))
