"""Attribution across the machines of one microphone: new sound goes to the stream that
holds most of it.

Separation is never perfect: when one machine develops a fault, a little of its new
sound leaks into the other machines' streams at the same microphone. Against a stream
that is quiet in those bands in normal operation, a little is a lot, and the healthy
machine would alarm with the faulty one. But a leak is smaller than its origin: the
stream of the machine that changed gains more new power in those bands than any stream
it leaks into.

So before a segment is scored, each stream's typical level per mel band (its median over
frames, as ``profile`` scores it) is compared with its own typical level in calibration
(``levels``, per microphone and source, kept in the state file with the thresholds).
Where another stream of the same microphone gained more new power in a band than this
one did, this stream's rise in that band is taken out of its tensor (the band is moved
down by the rise, in every frame, so its rhythm stays): the new sound is the other
machine's. A rise that no other stream outdoes stays as it is, and so does a band that
got quieter, unless another stream gained more new power there than ``COVERED`` of what
this stream has in normal operation: then the other machine's new sound covers this one,
the separator gives the covered bins to the louder machine, and the drop is not this
machine's either (in bench_attribution's room, a fan's bearing resonance took 2 to 6 dB
out of the motor's stream in the same bands). Calibration tensors pass through the same
step before the detector and its levels are fitted on them, so scores in operation are
comparable with the calibration's.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .model import median_over_frames

log = logging.getLogger(__name__)

# A drop in a band is taken out where another stream of the microphone gained more new
# power there than this fraction of the stream's own (5 dB below it). Chosen by
# replaying bench_attribution's cases (separation.room_headroom 4): 82% of the CRITICAL
# rows fell on the faulty machine at 0.3, 81% at 0.1, 80% at 1 and 73% at 3.
COVERED = 0.3

# One segment's tensors by (mic, source); levels by (mic, source): dB per band.
SegmentTensors = dict[tuple[int, str], torch.Tensor]
Levels = dict[tuple[int, str], np.ndarray]


def _profile_db(tensor: torch.Tensor) -> np.ndarray:
    """A (1, n_mels, n_frames) tensor's typical level per band: float64 dB, (n_mels,)."""
    return median_over_frames(tensor[None])[0].numpy()


def fit_levels(segments: Sequence[SegmentTensors]) -> Levels:
    """Each (mic, source)'s typical level per band in ``segments`` (normal operation):
    the power mean of its tensors' band medians, float64 dB, shape = (n_mels,)."""
    found: dict[tuple[int, str], list[np.ndarray]] = {}
    for tensors in segments:
        for key, t in tensors.items():
            found.setdefault(key, []).append(10.0 ** (_profile_db(t) / 10.0))
    return {key: 10.0 * np.log10(np.mean(powers, axis=0)) for key, powers in sorted(found.items())}


def attribute(tensors: SegmentTensors, levels: Mapping[tuple[int, str], np.ndarray]) -> SegmentTensors:
    """``tensors`` with each stream's rise taken out of the bands in which another
    stream of the same microphone gained more new power, and its drop out of those in
    which another gained more than ``COVERED`` of what this one has there normally
    (module docstring). Streams without levels, or of another number of bands, pass
    unchanged and do not count for the others. Returns a new dict; the tensors it
    changes are new tensors."""
    out = dict(tensors)
    by_mic: dict[int, list[str]] = {}
    for mic, source in tensors:
        ref = levels.get((mic, source))
        if ref is not None and ref.shape == (tensors[(mic, source)].shape[-2],):
            by_mic.setdefault(mic, []).append(source)
    for mic, sources in by_mic.items():
        if len(sources) < 2:
            continue
        rise = np.stack([_profile_db(tensors[(mic, s)]) - levels[(mic, s)] for s in sources])  # dB
        normal = np.stack([10.0 ** (levels[(mic, s)] / 10.0) for s in sources])  # power per band
        gained = normal * (10.0 ** (rise / 10.0) - 1.0)
        for i, source in enumerate(sources):
            other = np.delete(gained, i, axis=0).max(axis=0)
            outdone = (other > np.maximum(gained[i], 0.0)) & (rise[i] > 0.0)
            covered = (other > COVERED * normal[i]) & (rise[i] < 0.0)
            shift = np.where(outdone | covered, rise[i], 0.0)
            if shift.any():
                t = tensors[(mic, source)]
                out[(mic, source)] = t - torch.from_numpy(shift).to(t.dtype)[None, :, None]
    return out


def levels_to_data(levels: Levels) -> list[dict[str, Any]]:
    """Plain data for the state file."""
    return [{"mic": int(mic), "source": source, "db": [float(x) for x in db]}
            for (mic, source), db in sorted(levels.items())]


def levels_from_data(rows: Sequence[Any]) -> Levels:
    """``levels_to_data``'s output back; a damaged entry is left out and logged (its
    stream is then scored without attribution), never trusted."""
    levels: Levels = {}
    for row in rows:
        try:
            mic, source, db = int(row["mic"]), str(row["source"]), np.asarray(row["db"], dtype=np.float64)
            if db.ndim != 1 or db.size == 0 or not all(math.isfinite(x) for x in db):
                raise ValueError("not a finite level per band")
        except (KeyError, TypeError, ValueError) as e:
            log.error("band levels for attribution: a damaged entry %.80r left out (%s); retrain with "
                      "`signalcraft train-detector` to fit them again", row, e)
            continue
        levels[(mic, source)] = db
    return levels
