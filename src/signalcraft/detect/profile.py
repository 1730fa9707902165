"""The ``profile`` scorer: each mel band's typical level against normal operation,
scored by the worst bands.

The commonest faults of a rotating machine add or raise a few narrow lines or bands: the
1x tone of an imbalance, the harmonics of looseness, a bearing's resonance at a few kHz,
a leak's hiss. Each source's ``BandProfile`` (``model.py``) holds the typical level of
every mel band in the calibration tensors (its median over frames, which a knock or a
forklift beep shorter than half the segment does not move), leaves out the few
directions along which all bands move together in normal operation (load, the room's
level, which microphone), and standardises the rest per band. The score is the mean
squared standardised deviation of the worst ``SCORE_BAND_FRACTION`` of bands, so a
fault in a few bands is not diluted by the many that did not change. Fitting takes a
fraction of a second.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import DetectConfig
from .model import BandProfile, WorstBands, fit_sources, scoring_input


@dataclasses.dataclass
class ProfileDetector:
    """One ``BandProfile`` per source type, shared across microphones."""

    kind: typing.ClassVar[str] = "profile"
    cross_fit_folds: typing.ClassVar[int] = 10

    profiles: dict[str, BandProfile]
    n_mels: int
    n_frames: int
    features: dict
    trained_on: dict

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.profiles)

    @classmethod
    def fit(cls, tensors_by_source: dict[str, torch.Tensor], features: dict, config: DetectConfig
            ) -> "ProfileDetector":
        """One profile per source from its normal tensors (at least 2), shape =
        (N, 1, n_mels, n_frames).

        Raises
        ------
        DetectorError
            No sources, fewer than 2 tensors of a source, wrong shapes, non-finite values.
        """
        profiles, n_mels, n_frames, features, trained_on = fit_sources(
            cls.kind, tensors_by_source, features, lambda x, n_mels, n_frames: BandProfile.fit(x))
        return cls(profiles=profiles, n_mels=n_mels, n_frames=n_frames, features=features, trained_on=trained_on)

    def score(self, source: str, tensors: torch.Tensor) -> np.ndarray:
        """Mean squared standardised deviation of the worst bands, float64, shape = (N,),
        of float32 dB tensors, shape = (N, 1, n_mels, n_frames); about 1 to a few for a
        normal tensor.

        Raises
        ------
        DetectorError
            ``source`` is unknown, or the tensors have the wrong shape.
        """
        _, x = scoring_input(self.profiles, source, tensors, (self.n_mels, self.n_frames))
        with torch.no_grad():
            return self.scoring_module(source)(x.to(torch.float32)).numpy()

    def scoring_module(self, source: str) -> nn.Module:
        """The scoring path of ``source`` as one module: profile deviation, worst bands."""
        return nn.Sequential(self.profiles[source].module(), WorstBands(self.n_mels)).eval()

    def to_data(self) -> dict[str, Any]:
        return {
            "args": {"n_mels": self.n_mels, "n_frames": self.n_frames},
            "features": dict(self.features),
            "trained_on": self.trained_on,
            "profiles": {s: p.to_data() for s, p in self.profiles.items()},
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "ProfileDetector":
        n_mels, n_frames = int(data["args"]["n_mels"]), int(data["args"]["n_frames"])
        if n_mels < 1 or n_frames < 1:
            raise ValueError(f"a profile of {n_mels} x {n_frames} tensors")
        profiles = {s: BandProfile.from_data(p, n_mels) for s, p in data["profiles"].items()}
        return cls(profiles=profiles, n_mels=n_mels, n_frames=n_frames, features=dict(data["features"]),
                   trained_on=dict(data["trained_on"]))
