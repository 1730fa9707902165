"""The ``online`` scorer: River's HalfSpaceTrees on band statistics, still learning
after calibration.

A machine's normal sound moves over weeks (wear-in, seasons, a new belt). The other
scorers hold the normal operation of their calibration; only their levels adapt. This
one keeps learning: each (microphone, source) has its own forest of half-space trees
(``river.anomaly.HalfSpaceTrees``), first fed the calibration tensors of its source,
then every segment `detect` judged NORMAL at or below its warning level (never a
WARNING or CRITICAL one, nor one above the level that raised no alert yet, so a
developing fault is not learnt). A forest scores against the last full window of
``detect.scorer.online.window`` segments and fills the next one.

Features: ``gaussian.BandStatistics`` (each band group's level and spread), projected
on their ``COMPONENTS`` main directions of variation in calibration, plus the log of
what those directions leave (the squared distance from their subspace, the Q statistic
of process monitoring). Half-space trees split on a few features at random; on 80 raw
statistics a fault in two band groups would meet few splits, while the residual sees
any change that normal operation never showed. Each feature is scaled to the range seen
in calibration. HalfSpaceTrees' anomaly score s lies between 0 and 1 (1 - s is the
forest's normalised mass around the segment); levels fitted on a bounded score can end
above its bound, where nothing is ever flagged, so a segment's score is
``SCORE_OFFSET - log(1 - s)`` (with 1 - s at least ``MASS_FLOOR``): about 0.7 for a
typical normal segment, up to 6.9 for one where no calibration segment fell.

The forests are stored as plain data: the trees' structure follows from River's seed
and the feature limits, so only the masses of each node and the window's counter are
saved (with a fingerprint of the structure, checked when loading: a River that builds
other trees from the same seed is refused, not guessed at). Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

import numpy as np
import torch

from ..config import DetectConfig
from .gaussian import BandStatistics
from .model import RETRAIN, DetectorError, fit_sources, scoring_input

SCORE_OFFSET = 0.01  # a positive score also in the densest regions
MASS_FLOOR = 1e-3  # of the normalised mass, so that the score stays finite
COMPONENTS = 6  # main directions of the band statistics kept as features (fewer with fewer tensors)
LIMIT_MARGIN = 0.5  # feature limits: the calibration range widened by this fraction on each side


def _forest(settings: dict, limits: dict[int, tuple[float, float]]):
    from river.anomaly import HalfSpaceTrees

    return HalfSpaceTrees(n_trees=settings["trees"], height=settings["height"], window_size=settings["window"],
                          limits=limits, seed=settings["seed"])


def _as_dict(row: np.ndarray) -> dict[int, float]:
    return {i: float(v) for i, v in enumerate(row)}


def _nodes(forest) -> list[list]:
    return [list(tree.iter_dfs()) for tree in forest.trees]


def _fingerprint(forest) -> str:
    h = hashlib.sha256()
    for nodes in _nodes(forest):
        for node in nodes:
            h.update(f"{getattr(node, 'feature', '')}:{getattr(node, 'threshold', '')};".encode())
    return h.hexdigest()


@dataclasses.dataclass
class Projection:
    """Band statistics -> their coordinates on the main directions of calibration and
    the log squared residual: float64, shape = (N, k + 1)."""

    mean: np.ndarray  # (p,)
    components: np.ndarray  # (k, p), orthonormal rows

    @classmethod
    def fit(cls, statistics: np.ndarray) -> "Projection":
        mean = statistics.mean(axis=0)
        k = min(COMPONENTS, statistics.shape[0] - 1, statistics.shape[1])
        components = np.linalg.svd(statistics - mean, full_matrices=False)[2][:k]
        return cls(mean, components)

    def __call__(self, statistics: np.ndarray) -> np.ndarray:
        centred = statistics - self.mean
        coordinates = centred @ self.components.T
        residual = (centred - coordinates @ self.components) ** 2
        return np.concatenate([coordinates, np.log(residual.sum(axis=1, keepdims=True) + 1e-9)], axis=1)

    def to_data(self) -> dict[str, list]:
        return {"mean": self.mean.tolist(), "components": self.components.tolist()}

    @classmethod
    def from_data(cls, data: dict[str, list], size: int) -> "Projection":
        mean = np.asarray(data["mean"], np.float64)
        components = np.asarray(data["components"], np.float64).reshape(-1, size)
        if mean.shape != (size,) or not (np.isfinite(mean).all() and np.isfinite(components).all()):
            raise ValueError(f"online model: a projection that does not fit {size} band statistics")
        return cls(mean, components)


@dataclasses.dataclass
class Forest:
    """One (microphone, source)'s HalfSpaceTrees and the scaling of its features."""

    model: Any  # river.anomaly.HalfSpaceTrees, trees built
    limits: dict[int, tuple[float, float]]
    settings: dict

    @classmethod
    def grown(cls, features: np.ndarray, settings: dict) -> "Forest":
        """A forest fed ``features`` (n, p) in order; limits from their range."""
        lo, hi = features.min(axis=0), features.max(axis=0)
        margin = np.maximum(hi - lo, 1e-6) * LIMIT_MARGIN
        limits = {i: (float(a - m), float(b + m)) for i, (a, b, m) in enumerate(zip(lo, hi, margin))}
        forest = cls(_forest(settings, limits), limits, dict(settings))
        for row in features:
            forest.model.learn_one(_as_dict(row))
        return forest

    def score(self, features: np.ndarray) -> np.ndarray:
        anomaly = np.array([self.model.score_one(_as_dict(row)) for row in features], np.float64)
        return SCORE_OFFSET - np.log(np.maximum(1.0 - anomaly, MASS_FLOOR))

    def learn(self, features: np.ndarray) -> None:
        for row in features:
            self.model.learn_one(_as_dict(row))

    def to_data(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "limits": [list(self.limits[i]) for i in range(len(self.limits))],
            "l_mass": [[int(n.l_mass) for n in nodes] for nodes in _nodes(self.model)],
            "r_mass": [[int(n.r_mass) for n in nodes] for nodes in _nodes(self.model)],
            "counter": int(self.model.counter),
            "first_window": bool(self.model._first_window),
            "structure": _fingerprint(self.model),
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "Forest":
        settings = {k: int(data["settings"][k]) for k in ("trees", "height", "window", "seed")}
        limits = {i: (float(a), float(b)) for i, (a, b) in enumerate(data["limits"])}
        if not limits or any(not (np.isfinite(a) and np.isfinite(b) and a < b) for a, b in limits.values()):
            raise ValueError("online model: feature limits are not finite increasing pairs")
        model = _forest(settings, limits)
        model.learn_one({i: (a + b) / 2 for i, (a, b) in limits.items()})  # builds the trees (from the seed)
        if _fingerprint(model) != data["structure"]:
            raise DetectorError(f"the online model's trees differ from those this River builds from its seed "
                                f"(another River version wrote it); {RETRAIN}.")
        nodes = _nodes(model)
        if len(data["l_mass"]) != len(nodes) or len(data["r_mass"]) != len(nodes):
            raise ValueError("online model: the masses do not fit its trees")
        for tree_nodes, left, right in zip(nodes, data["l_mass"], data["r_mass"]):
            if len(left) != len(tree_nodes) or len(right) != len(tree_nodes):
                raise ValueError("online model: the masses do not fit its trees")
            for node, lm, rm in zip(tree_nodes, left, right):
                node.l_mass, node.r_mass = int(lm), int(rm)
        counter = int(data["counter"])
        if not 0 <= counter < settings["window"]:
            raise ValueError(f"online model: window counter {counter} outside 0..{settings['window'] - 1}")
        model.counter, model._first_window = counter, bool(data["first_window"])
        return cls(model, limits, settings)


@dataclasses.dataclass
class OnlineDetector:
    """Per source, the forest grown on its calibration tensors; `detect` keeps a copy
    per (microphone, source) in the state file and lets it learn."""

    kind: typing.ClassVar[str] = "online"
    cross_fit_folds: typing.ClassVar[int] = 10
    learns_online: typing.ClassVar[bool] = True

    forests: dict[str, Forest]
    projections: dict[str, Projection]
    n_mels: int
    n_frames: int
    features: dict
    trained_on: dict

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.forests)

    @classmethod
    def fit(cls, tensors_by_source: dict[str, torch.Tensor], features: dict, config: DetectConfig
            ) -> "OnlineDetector":
        """A forest per source fed its normal tensors (at least 2) in order.

        Raises
        ------
        DetectorError
            No sources, fewer than 2 tensors of a source, wrong shapes, non-finite values.
        """
        online = config.scorer.online

        def fit_one(x: torch.Tensor, n_mels: int, n_frames: int) -> tuple[Forest, Projection]:
            settings = {"trees": online.trees, "height": online.height, "seed": online.seed,
                        "window": min(online.window, int(x.shape[0]))}
            statistics = BandStatistics(n_mels, n_frames)(x).numpy()
            projection = Projection.fit(statistics)
            return Forest.grown(projection(statistics), settings), projection

        fitted, n_mels, n_frames, features, trained_on = fit_sources(cls.kind, tensors_by_source, features, fit_one)
        forests = {source: forest for source, (forest, _) in fitted.items()}
        projections = {source: projection for source, (_, projection) in fitted.items()}
        for source, forest in forests.items():
            trained_on[source].update(forest.settings)
        return cls(forests=forests, projections=projections, n_mels=n_mels, n_frames=n_frames, features=features,
                   trained_on=trained_on)

    def _values(self, source: str, tensors) -> np.ndarray:
        _, x = scoring_input(self.forests, source, tensors, (self.n_mels, self.n_frames))
        with torch.no_grad():
            statistics = BandStatistics(self.n_mels, self.n_frames)(x.to(torch.float32)).numpy()
        return self.projections[source](statistics)

    def score(self, source: str, tensors: torch.Tensor, state: dict | None = None) -> np.ndarray:
        """Anomaly scores, float64, shape = (N,), between ``SCORE_OFFSET`` and
        ``SCORE_OFFSET - log(MASS_FLOOR)``: by the forest of ``state`` (a (microphone, source)'s, from
        ``learn``) or else the source's calibration forest.

        Raises
        ------
        DetectorError
            ``source`` is unknown, the tensors have the wrong shape, or ``state`` is damaged.
        """
        values = self._values(source, tensors)
        return (self.forests[source] if state is None else _load_state(state)).score(values)

    def learn(self, source: str, tensors: torch.Tensor, state: dict | None = None) -> dict:
        """The forest of ``state`` (or the source's calibration forest) after learning
        ``tensors``, as plain data for the state file."""
        values = self._values(source, tensors)
        forest = Forest.from_data(self.forests[source].to_data()) if state is None else _load_state(state)
        forest.learn(values)
        return forest.to_data()

    def to_data(self) -> dict[str, Any]:
        return {
            "args": {"n_mels": self.n_mels, "n_frames": self.n_frames},
            "features": dict(self.features),
            "trained_on": self.trained_on,
            # JSON text: plain data whatever its nesting, and what the state file holds too.
            "forests": {s: json.dumps(f.to_data()) for s, f in self.forests.items()},
            "projections": {s: p.to_data() for s, p in self.projections.items()},
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "OnlineDetector":
        n_mels, n_frames = int(data["args"]["n_mels"]), int(data["args"]["n_frames"])
        forests = {s: Forest.from_data(json.loads(text)) for s, text in data["forests"].items()}
        size = BandStatistics(n_mels, n_frames).size
        projections = {s: Projection.from_data(data["projections"][s], size) for s in forests}
        return cls(forests=forests, projections=projections, n_mels=n_mels, n_frames=n_frames,
                   features=dict(data["features"]), trained_on=dict(data["trained_on"]))


def _load_state(state: dict) -> Forest:
    try:
        return Forest.from_data(state)
    except DetectorError:
        raise
    except Exception as e:
        raise DetectorError(f"a stored online model is damaged ({type(e).__name__}: {e}); {RETRAIN}.") from None
