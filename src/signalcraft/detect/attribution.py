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
out of the motor's stream in the same bands). The room (``room``: what separation gave
to no machine, with its own level from calibration) covers a drop the same way where it
rose by more than ``RISE_DB``: under a loud event the separator gives the machines' bins
to the room (in a busy shift of bench_attribution a fan's stream fell 8 dB at 50 Hz
while the room there rose 6 dB). The room never takes a rise: a fault's new sound that
the separator gave partly to the room still counts in the machine's stream.

An array separator places sound by where it comes from, which fails where two machines
reach the microphones alike: at the lowest frequencies, whose wavelengths dwarf the
array, the network's guess decides, and a fault's new tone that it never heard in
training can land in a healthy machine's stream, alone and whole (in bench_attribution's
room, a pump's 12.5 Hz half-order of looseness went to the fan: +25 dB there, nothing in
the pump). Such a band cannot be attributed on its own, but it can be explained: when
another stream of the microphone that the array cannot tell from this one in the band
(``alike``, from the separator's spatial covariances: ``SpatialAlikeness``) changed
clearly where it can be told apart (at least ``OWN_BANDS`` bands alike with no other
stream rose by more than ``RISE_DB`` without being outdone) and more than this stream
did there, this stream's rise in the band is that machine's sound too and is taken out.
A rise in such a band that no clearly changed machine explains stays (a fan's
imbalance, whose 1x tone lies where all three machines are alike, is seen).

A clearly changed machine also explains another stream's rise in the bands where its own
stream rose by more than ``RISE_DB`` too, whoever gained more power there: at the edges
of a fault's new sound, where another machine's stream is normally much the louder, the
separator gives that louder stream a few dB of it, which is more power than the faulty
stream gained there (in bench_attribution's room at the default calibration, a fan's
bearing resonance raised the motor's stream by 3 to 7 dB in the bands around it, and the
motor went CRITICAL). Two faults at once would hide the lesser one's bands that the
greater one's new sound shares (and, in machines alike at low frequencies, its low
bands), not its others.

Calibration tensors pass through the same step before the detector and its levels are
fitted on them, so scores in operation are comparable with the calibration's.
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..segments.layout import ROOM
from .model import median_over_frames

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

# A drop in a band is taken out where another stream of the microphone gained more new
# power there than this fraction of the stream's own (5 dB below it). Chosen by
# replaying bench_attribution's cases (separation.room_headroom 4): 82% of the CRITICAL
# rows fell on the faulty machine at 0.3, 81% at 0.1, 80% at 1 and 73% at 3.
COVERED = 0.3

# Two machines are alike in a band where the cosine of their spatial covariances,
# averaged over the band, is at least this (``dsp.spatial.similarity``). In
# bench_attribution's room the fan is alike with the motor in the bands centred at 13
# and 25 Hz and with the pump up to 38 Hz (0.72 to 0.85), with both in 6 bands from 1.8
# to 6.5 kHz; the pump and the motor only in the band at 250 Hz. Replays of its cases
# (room_headroom 4, every bin capped) put 97% of the CRITICAL rows on the faulty machine
# at 0.7 and at 0.6, against 82% without the rule; with the room uncapped, 73% against
# 63%.
ALIKE = 0.7
# A stream changed clearly where the array tells it apart when at least OWN_BANDS of its
# bands that are alike with no other stream rose by more than RISE_DB, dB, and no other
# stream outdid it there. In bench_attribution's room (the same replays), the median
# segment of the faulty machine's stream had 16 to 100 bands above 50 Hz risen by more
# than 3 dB in the bearing, looseness and cavitation cases (none in the imbalances:
# their 1x tone lies in alike bands); a stream in normal running had at most 9 in any
# segment, and 16 in a busy shift. OWN_BANDS 5 gave 98% in the replays, but the fan's
# imbalance went CRITICAL in 3 rows of 16 instead of 10.
RISE_DB = 3.0
OWN_BANDS = 10

# One segment's tensors by (mic, source); levels (in calibration) and profiles (in one
# segment) by (mic, source): dB per band; alike bands by (source, other source): bool
# per band.
SegmentTensors = dict[tuple[int, str], torch.Tensor]
Levels = dict[tuple[int, str], np.ndarray]
Profiles = dict[tuple[int, str], np.ndarray]
Alike = Mapping[tuple[str, str], np.ndarray]


def _profile_db(tensor: torch.Tensor) -> np.ndarray:
    """A (1, n_mels, n_frames) tensor's typical level per band: float64 dB, (n_mels,)."""
    return median_over_frames(tensor[None])[0].numpy()


def profiles(tensors: SegmentTensors) -> Profiles:
    """Each stream's typical level per band (its median over frames, as ``profile``
    scores it): float64 dB, shape = (n_mels,)."""
    return {key: _profile_db(t) for key, t in tensors.items()}


def fit_levels(segments: Sequence[SegmentTensors]) -> Levels:
    """Each (mic, source)'s typical level per band in ``segments`` (normal operation):
    the power mean of its tensors' band medians, float64 dB, shape = (n_mels,)."""
    return levels_of([profiles(tensors) for tensors in segments])


def levels_of(typical: Sequence[Profiles]) -> Levels:
    """``fit_levels`` from the segments' ``profiles``, already taken."""
    found: dict[tuple[int, str], list[np.ndarray]] = {}
    for by_stream in typical:
        for key, db in by_stream.items():
            found.setdefault(key, []).append(10.0 ** (db / 10.0))
    return {key: 10.0 * np.log10(np.mean(powers, axis=0)) for key, powers in sorted(found.items())}


def attribute(tensors: SegmentTensors, levels: Mapping[tuple[int, str], np.ndarray],
              alike: Optional[Alike] = None, rooms: Optional[Mapping[int, torch.Tensor]] = None) -> SegmentTensors:
    """``tensors`` with each stream's rise taken out of the bands in which another
    stream of the same microphone gained more new power, and its drop out of those in
    which another gained more than ``COVERED`` of what this one has there normally; and
    its rise in the bands that a clearly changed stream explains: where that stream rose
    too, and with ``alike`` (pairs of sources the array cannot tell apart, per band)
    where the two are alike (module docstring). With ``rooms`` (mic -> room tensor) and
    the room's levels (keyed (mic, ``ROOM``)), the room also covers drops where it
    clearly rose. Streams without levels, or of another number of bands, pass unchanged
    and do not count for the others. Returns a new dict; the tensors it changes are new
    tensors."""
    return shifted(tensors, band_shifts({**profiles(tensors), **room_profiles(rooms or {})}, levels, alike))


def room_profiles(rooms: Mapping[int, torch.Tensor]) -> Profiles:
    """The room tensors' typical level per band, keyed (mic, ``ROOM``) as ``band_shifts``
    takes them."""
    return {(mic, ROOM): _profile_db(t) for mic, t in rooms.items()}


def shifted(tensors: SegmentTensors, shifts: Mapping[tuple[int, str], np.ndarray]) -> SegmentTensors:
    """``tensors`` with each stream in ``shifts`` moved down by its shift per band, dB,
    in every frame (``band_shifts``); the others as they are. Returns a new dict."""
    out = dict(tensors)
    for key, shift in shifts.items():
        if key in tensors:
            t = tensors[key]
            out[key] = t - torch.from_numpy(shift).to(t.dtype)[None, :, None]
    return out


def band_shifts(typical: Profiles, levels: Mapping[tuple[int, str], np.ndarray],
                alike: Optional[Alike] = None) -> dict[tuple[int, str], np.ndarray]:
    """What ``attribute`` takes out of each stream, from the streams' typical levels per
    band (``typical``, their ``profiles``: (mic, source) -> dB, (n_mels,)): (mic, source)
    -> dB per band, for the streams that it changes. Needs only the profiles of one
    segment's streams, not their tensors."""
    by_mic: dict[int, list[str]] = {}
    for (mic, source), db in typical.items():
        ref = levels.get((mic, source))
        if ref is not None and ref.shape == db.shape and source != ROOM:
            by_mic.setdefault(mic, []).append(source)
    shifts = {}
    for mic, sources in by_mic.items():
        room = _room_gained(typical, levels, mic, typical[(mic, sources[0])].shape)
        if len(sources) < 2 and room is None:
            continue
        rise = np.stack([typical[(mic, s)] - levels[(mic, s)] for s in sources])  # dB
        normal = np.stack([10.0 ** (levels[(mic, s)] / 10.0) for s in sources])  # power per band
        gained = normal * (10.0 ** (rise / 10.0) - 1.0)
        taken = []
        for i in range(len(sources)):
            other = np.delete(gained, i, axis=0).max(axis=0, initial=-np.inf)
            outdone = (other > np.maximum(gained[i], 0.0)) & (rise[i] > 0.0)
            covering = other if room is None else np.maximum(other, room)
            covered = (covering > COVERED * normal[i]) & (rise[i] < 0.0)
            taken.append(outdone | covered)
        for i, explained in enumerate(_explained(sources, rise, taken, alike or {})):
            taken[i] |= explained & (rise[i] > 0.0)
        for i, source in enumerate(sources):
            shift = np.where(taken[i], rise[i], 0.0)
            if shift.any():
                shifts[(mic, source)] = shift
    return shifts


def _room_gained(typical: Profiles, levels: Mapping[tuple[int, str], np.ndarray], mic: int,
                 shape: tuple[int, ...]) -> Optional[np.ndarray]:
    """The room's new power per band at ``mic`` over its level, in the bands where it
    rose by more than ``RISE_DB`` (0 elsewhere); None without its profile or level."""
    db, ref = typical.get((mic, ROOM)), levels.get((mic, ROOM))
    if db is None or ref is None or db.shape != shape or ref.shape != shape:
        return None
    rise = db - ref
    return np.where(rise > RISE_DB, 10.0 ** (ref / 10.0) * (10.0 ** (rise / 10.0) - 1.0), 0.0)


def _explained(sources: list[str], rise: np.ndarray, taken: list[np.ndarray], alike: Alike) -> list[np.ndarray]:
    """Per stream of one microphone, the bands that another stream which changed
    clearly, and more than it, where the array tells them apart, explains: those in which
    the two are alike, and those in which that stream rose by more than ``RISE_DB`` too
    (bool per band)."""
    n, bands = rise.shape
    pairs = [[_pair(alike, a, b, bands) for b in sources] for a in sources]
    told_apart = [~np.logical_or.reduce(pairs[i]) for i in range(n)]
    owned = [int(((rise[i] > RISE_DB) & ~taken[i] & told_apart[i]).sum()) for i in range(n)]
    explained = []
    for i in range(n):
        bands_i = np.zeros(bands, dtype=bool)
        for j in range(n):
            if j != i and owned[j] >= OWN_BANDS and owned[j] > owned[i]:
                bands_i |= pairs[i][j] | (rise[j] > RISE_DB)
        explained.append(bands_i)
    return explained


def _pair(alike: Alike, a: str, b: str, bands: int) -> np.ndarray:
    found = alike.get((a, b)) if a != b else None
    return found if found is not None and found.shape == (bands,) else np.zeros(bands, dtype=bool)


class SpatialAlikeness:
    """Which two of the separator's streams the array cannot tell apart, per mel band:
    ``SpatialAlikeness(config)(features)`` is the ``alike`` of ``attribute`` for tensors
    of those feature settings (a manifest's or a detector's ``features``), from the
    spatial covariances that an array model carries (``dsp.spatial``). Empty without
    ``detect.attribution``, without a separator, for a model without covariances, and,
    logged once, for one that cannot be read: attribution then goes without it."""

    def __init__(self, config: "Config"):
        self._config = config
        self._similarity: Optional[np.ndarray] = None  # (sources, sources, freq), read at the first call
        self._read = False
        self._cache: dict[str, dict[tuple[str, str], np.ndarray]] = {}

    def __call__(self, features: Mapping[str, Any]) -> dict[tuple[str, str], np.ndarray]:
        if not self._read:
            self._read = True
            self._load()
        if self._similarity is None:
            return {}
        key = json.dumps(features, sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = self._bands(features)
        return self._cache[key]

    def _load(self) -> None:
        config = self._config
        sep = config.separation
        if not config.detect.attribution or sep.model is None:
            return
        from ..chain import exported_sources
        from ..dsp.spatial import similarity
        from ..separate import ModelError, model_file, read_package

        try:
            model, spatial = read_package(model_file(sep.repo, sep.model))
        except ModelError as e:
            log.warning("detect.attribution: the separator's spatial covariances are not readable, so every band "
                        "is attributed as if the array told the machines apart: %s", e)
            return
        if spatial is None:
            return
        self._names = exported_sources(config, tuple(model.sources))  # (stream name, model source index)
        self._rate = float(model.samplerate)
        self._similarity = similarity(spatial)

    def _bands(self, features: Mapping[str, Any]) -> dict[tuple[str, str], np.ndarray]:
        from ..audio_backend import torchaudio

        try:
            n_freqs = int(features["n_fft"]) // 2 + 1
            rate = float(features["sample_rate"])
            fbank = torchaudio.functional.melscale_fbanks(
                n_freqs, float(features["f_min"]), float(features["f_max"]), int(features["n_mels"]), int(rate),
                norm=features["norm"], mel_scale=features["mel_scale"]).numpy().astype(np.float64)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("detect.attribution: feature settings %.120r do not describe a mel filterbank (%s): every "
                        "band is attributed as if the array told the machines apart", features, e)
            return {}
        weights = fbank / np.maximum(fbank.sum(axis=0, keepdims=True), 1e-12)  # (freq, mels): mean per band
        spatial_hz = np.linspace(0.0, self._rate / 2, self._similarity.shape[-1])
        feature_hz = np.linspace(0.0, rate / 2, n_freqs)
        bands = {}
        for a, i in self._names:
            for b, j in self._names:
                if i != j:  # above the model's band limit nothing is alike
                    per_hz = np.interp(feature_hz, spatial_hz, self._similarity[i, j], right=0.0)
                    bands[(a, b)] = per_hz @ weights >= ALIKE
        return bands


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
