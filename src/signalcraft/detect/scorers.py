"""Scorers: the kinds of detector, and the cross-fitting that sets their levels.

A scorer kind is a class with

- ``kind``: its name, saved in the detector file (``model.save_detector``) and used to
  pick the class that reads the file back (``model.load_detector``);
- ``fit(tensors_by_source, features, config)``: a detector fitted on normal tensors,
  source -> float32 dB tensors of shape = (N, 1, n_mels, n_frames), microphones pooled;
- ``score(source, tensors)``: float64 anomaly scores, shape = (N,), higher is more
  abnormal;
- ``sources``, ``features`` (the ``LogMel.settings()`` it was fitted on);
- ``to_data()`` / ``from_data(data)``: plain data that loads with ``weights_only``;
- ``cross_fit_folds``: how many folds ``cross_fit`` uses for it;
- optionally ``learns_online = True`` with ``score(source, tensors, state=None)`` and
  ``learn(source, tensors, state=None) -> state``: `detect` keeps a state per
  (microphone, source) and has it learn every NORMAL segment at or below the warning
  level (``online``).

``detect.scorer.kind`` chooses the kind. Add a kind by writing such a class and listing it
in ``SCORERS``. The kinds: ``ensemble`` (the default; ``ensemble.py``), ``profile``
(``profile.py``), ``modulation``, ``bands``, ``frames`` and ``flux`` (``gaussian.py``),
``autoencoder`` (``model.py``) and ``online`` (``online.py``).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ..config import DetectConfig
from .ensemble import EnsembleDetector
from .gaussian import BandsDetector, FluxDetector, FramesDetector, ModulationDetector
from .model import Detector
from .online import OnlineDetector
from .profile import ProfileDetector

log = logging.getLogger(__name__)

SCORERS: dict[str, type] = {cls.kind: cls for cls in (EnsembleDetector, ProfileDetector, ModulationDetector,
                                                      BandsDetector, FramesDetector, FluxDetector, Detector,
                                                      OnlineDetector)}

# One segment's tensors by (mic, source).
SegmentTensors = dict[tuple[int, str], torch.Tensor]


def fit_detector(tensors_by_source: dict[str, torch.Tensor], features: dict, config: DetectConfig):
    """A detector of the kind ``config.scorer.kind``, fitted on normal tensors."""
    return SCORERS[config.scorer.kind].fit(tensors_by_source, features, config)


def pooled(segments: Sequence[SegmentTensors]) -> dict[str, torch.Tensor]:
    """source -> the tensors of every microphone of ``segments``, stacked."""
    by_source: dict[str, list[torch.Tensor]] = {}
    for tensors in segments:
        for (mic, source), t in sorted(tensors.items()):
            by_source.setdefault(source, []).append(t)
    return {s: torch.stack(ts) for s, ts in by_source.items()}


def cross_fit(segments: Sequence[SegmentTensors], fit: Callable[[dict[str, torch.Tensor]], object],
              folds: int) -> dict[tuple[int, str], list[float]]:
    """Scores of every calibration tensor by a detector that did not see its segment.

    Segment k goes to fold ``k % folds`` (at most one fold per segment); for each fold a
    detector is fitted (``fit``, on the pooled tensors of the other folds) and scores the
    fold's tensors. A score from a model that saw the tensor is too low (an autoencoder
    reproduces what it trained on), and levels fitted on such scores flag normal
    operation; these out-of-fold scores are what the levels are fitted on, in `detect`,
    `train-detector` and the benchmarks alike.

    Returns
    -------
    dict
        (mic, source) -> out-of-fold scores, in the order of ``segments``. A source
        missing from the other folds' data is not scored.
    """
    folds = max(2, min(folds, len(segments)))
    found: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for k in range(folds):
        held = [j for j in range(len(segments)) if j % folds == k]
        model = fit(pooled([segments[j] for j in range(len(segments)) if j % folds != k]))
        for j in held:
            for (mic, source), t in sorted(segments[j].items()):
                if source in model.sources:
                    found.setdefault((mic, source), []).append((j, float(model.score(source, t[None])[0])))
        log.info("cross-fitting the levels: fold %d of %d done", k + 1, folds)
    return {key: [score for _, score in sorted(scores)] for key, scores in found.items()}
