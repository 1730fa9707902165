"""The ``ensemble`` scorer: several scorers, each standardised on its own calibration
scores, combined by the most abnormal.

No one description of a segment catches every fault. A bearing's resonance or a
cavitating pump's hiss changes the levels of a few bands and leaves their rhythm alone; a
rattling slide rail or a slapping belt changes the rhythm and hardly moves a level. So
the ensemble fits each member kind (``detect.scorer.members``) on the same normal
tensors, and learns per source how each member scores normal data it did not see: the
log-scores of a blocked cross-fit over the calibration tensors (``MEMBER_FOLDS``
contiguous blocks, so a block is a stretch of time and a member whose scores drift
over the calibration gets the wider spread it will show in operation). A tensor's score
is ``softplus(max_m z_m) = log(1 + exp(max_m z_m))``, with ``z_m`` its standardised
log-score under member m: positive, about 0.7 for a typical normal segment, and for an
abnormal one about as many standard deviations as the member that finds it most
abnormal says (3.05 at 3). Members' scales (a Mahalanobis distance of thousands of
features, a band deviation) never meet. Softplus rather than ``exp``: the levels are
fitted to the calibration scores' mean and variance, and an exponential tail would let
one unusual calibration segment raise them far above what any fault reaches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from typing import Any

import numpy as np
import torch

from ..config import ENSEMBLE_MEMBERS, DetectConfig
from .model import DetectorError, _check_training_tensors

log = logging.getLogger(__name__)

MEMBER_FOLDS = 5  # blocks of the blocked cross-fit that standardises each member
MIN_LOG_STD = 0.02  # floor of a member's log-score spread (scores that hardly vary)
LOG_FLOOR = 1e-12  # added to member scores before the log


def _registry() -> dict[str, type]:
    from .scorers import SCORERS

    return SCORERS


def blocked_scores(kind: type, x: torch.Tensor, source: str, features: dict, config: DetectConfig,
                   folds: int) -> np.ndarray:
    """Scores of each of ``x`` (one source's tensors, in time order) by a ``kind``
    model fitted on the other blocks: ``folds`` contiguous blocks."""
    n = x.shape[0]
    block = np.arange(n) * folds // n
    scores = np.empty(n)
    for k in range(folds):
        held = torch.from_numpy(block == k)
        model = kind.fit({source: x[~held]}, features, config)
        scores[held.numpy()] = model.score(source, x[held])
    return scores


class EnsembleScore(torch.nn.Module):
    """``EnsembleDetector.score`` of one source as a module: float32 dB tensors
    (N, 1, n_mels, n_frames) -> float64 (N,)."""

    def __init__(self, members: dict[str, torch.nn.Module], standard: dict[str, tuple[float, float]]):
        super().__init__()
        self.members = torch.nn.ModuleList(members.values())
        self.register_buffer("mean", torch.tensor([standard[k][0] for k in members], dtype=torch.float64))
        self.register_buffer("std", torch.tensor([standard[k][1] for k in members], dtype=torch.float64))

    def forward(self, tensors: torch.Tensor) -> torch.Tensor:
        logs = torch.stack([torch.log(m(tensors) + LOG_FLOOR) for m in self.members], dim=1)
        top = ((logs - self.mean) / self.std).max(dim=1).values
        return top.clamp_min(0) + torch.log1p(torch.exp(-top.abs()))  # log(1 + exp(top)), stable


@dataclasses.dataclass
class EnsembleDetector:
    """Member detectors of other kinds, and per source and member the mean and spread
    of its calibration log-scores."""

    kind: typing.ClassVar[str] = "ensemble"
    cross_fit_folds: typing.ClassVar[int] = 10

    members: dict[str, Any]  # kind -> fitted detector of that kind
    standard: dict[str, dict[str, tuple[float, float]]]  # source -> kind -> (mean, std) of log-scores
    features: dict
    trained_on: dict

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.standard)

    @classmethod
    def fit(cls, tensors_by_source: dict[str, torch.Tensor], features: dict, config: DetectConfig
            ) -> "EnsembleDetector":
        """Fit each member on all tensors and standardise it on its blocked cross-fit.

        Raises
        ------
        DetectorError
            Fewer than 3 tensors of a source to cross-fit, or what a member's own fit
            raises.
        """
        registry = _registry()
        kinds = config.scorer.members  # ScorerConfig admits only ENSEMBLE_MEMBERS
        features = dict(features or {})
        _check_training_tensors(tensors_by_source, features, multiple=1)
        members = {kind: registry[kind].fit(tensors_by_source, features, config) for kind in kinds}
        standard: dict[str, dict[str, tuple[float, float]]] = {}
        for source in sorted(tensors_by_source):
            x = tensors_by_source[source]
            if x.shape[0] < 3:  # each member is fitted on all blocks but one, and needs 2 tensors
                raise DetectorError(f"source {source!r}: {x.shape[0]} tensor(s) to fit on; the ensemble needs "
                                    "at least 3.")
            folds = min(MEMBER_FOLDS, x.shape[0])
            standard[source] = {}
            for kind in kinds:
                logs = np.log(blocked_scores(registry[kind], x, source, features, config, folds) + LOG_FLOOR)
                standard[source][kind] = (float(logs.mean()), max(float(logs.std()), MIN_LOG_STD))
        trained_on = {kind: member.trained_on for kind, member in members.items()}
        return cls(members=members, standard=standard, features=features, trained_on=trained_on)

    def member_z(self, source: str, tensors: torch.Tensor) -> dict[str, np.ndarray]:
        """kind -> standardised log-scores of ``tensors``, float64, shape = (N,)."""
        if source not in self.standard:
            # The members raise the full message (which sources there are, what to do).
            next(iter(self.members.values())).score(source, tensors)
        z = {}
        for kind, member in self.members.items():
            mean, std = self.standard[source][kind]
            z[kind] = (np.log(member.score(source, tensors) + LOG_FLOOR) - mean) / std
        return z

    def score(self, source: str, tensors: torch.Tensor) -> np.ndarray:
        """Softplus of the largest standardised member log-score, float64, shape = (N,).

        Raises
        ------
        DetectorError
            ``source`` is unknown, or the tensors have the wrong shape.
        """
        return np.logaddexp(0.0, np.max(np.stack(list(self.member_z(source, tensors).values())), axis=0))

    def scoring_module(self, source: str) -> torch.nn.Module:
        """The scoring path of ``source`` as one module (``EnsembleScore``).

        Raises
        ------
        DetectorError
            A member has no scoring module (``online``).
        """
        modules = {}
        for kind, member in self.members.items():
            module = getattr(member, "scoring_module", None)
            if module is None:
                raise DetectorError(f"ensemble member {kind!r} has no scoring module (it is not a network)")
            modules[kind] = module(source)
        return EnsembleScore(modules, self.standard[source]).eval()

    def to_data(self) -> dict[str, Any]:
        return {
            "members": {kind: member.to_data() for kind, member in self.members.items()},
            "standard": {s: {k: list(v) for k, v in by_kind.items()} for s, by_kind in self.standard.items()},
            "features": dict(self.features),
            "trained_on": self.trained_on,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "EnsembleDetector":
        registry = _registry()
        members = {}
        for kind, member in data["members"].items():
            if kind not in registry or kind not in ENSEMBLE_MEMBERS:
                raise DetectorError(f"an ensemble member of kind {kind!r}, which this signalcraft does not know")
            members[kind] = registry[kind].from_data(member)
        standard = {}
        for source, by_kind in data["standard"].items():
            standard[source] = {}
            for kind in members:
                mean, std = (float(v) for v in by_kind[kind])
                if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                    raise ValueError(f"the standardisation of member {kind!r} for {source!r} is not finite")
                if source not in members[kind].sources:
                    raise ValueError(f"member {kind!r} has no model for {source!r}")
                standard[source][kind] = (mean, std)
        if not members or not standard:
            raise ValueError("an ensemble without members or sources")
        return cls(members=members, standard=standard, features=dict(data["features"]),
                   trained_on=dict(data["trained_on"]))
