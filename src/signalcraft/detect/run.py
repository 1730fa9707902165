"""`signalcraft detect OUTPUT`: score new segments, learn what normal is, raise alerts.

Each run finds the complete segments under OUTPUT (manifest present) that the state
database has not seen, oldest first, and handles each in one transaction:

- cold start (no detector yet): the segment is taken as normal calibration data. Once
  ``detect.calibration_segments`` are collected, a detector of ``detect.scorer.kind``
  is fitted per source on all of them (shared by the microphones), and WARNING/CRITICAL
  levels per (microphone, source) are fitted to scores that models gave to data they
  were not fitted on (``scorers.cross_fit`` over the calibration segments: in-sample
  scores are too low and would set the levels too low).
- scoring: each (mic, source) tensor gets the detector's score; the thresholds decide
  NORMAL / WARNING / CRITICAL (k of n segments above its level for either, or the CUSUM
  for CRITICAL) and adapt to slow drift from scores at or below the warning level only.
  A scorer that learns online (``online``) keeps a model per (mic, source) in the state
  and learns each of those segments, in the same transaction as its score.
- operators: an acknowledged machine (``signalcraft ack``) raises alerts that the
  acknowledgement covers (they do not count for the exit code) until its state changes;
  after ``signalcraft maintenance`` a machine's tensors are collected as CALIBRATING
  until ``detect.calibration_segments`` of them are there, then it is refitted on them
  alone (``recalibrated.with_source``) with new levels, and scored again. Each change of
  a machine's state is logged with the segment.

Segments come from the segment store (``signalcraft.segments``), oldest first. A
corrupt or wrong-shape tensor is skipped, logged and counted; a folder without a
manifest is left for a later run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import clock
from ..config import Config
from ..files import keep_backup, temp_path
from ..publish.messages import Outbox
from ..segments import ManifestError, StoredSegment, candidate_names, list_segments, manifest_signature, open_segment
from ..segments.layout import ROOM
from . import thresholds as th
from .attribution import (Levels, Profiles, SegmentTensors, SpatialAlikeness, attribute, band_shifts, fit_levels,
                          levels_from_data, levels_of, levels_to_data, profiles, room_profiles, shifted)
from .model import Detector, DetectorError, load_detector, save_detector
from .recalibrated import with_source
from .room import fit_room_levels, masked
from .scorers import SCORERS, cross_fit, fit_detector, pooled
from .store import Store

log = logging.getLogger(__name__)

CALIBRATING = "CALIBRATING"
STATE_FILE = "signalcraft.sqlite"
MASK_META = "room_mask_db"  # the state file's record of the room mask the detector trained with


@dataclasses.dataclass(frozen=True)
class Row:
    """One scored tensor."""

    folder: str  # segment folder, relative to the output folder
    start_time: str  # UTC, ISO 8601
    mic: int
    source: str
    score: Optional[float]
    warning: Optional[float]
    critical: Optional[float]
    status: str  # NORMAL, WARNING, CRITICAL or CALIBRATING
    acknowledged: bool = False  # an alert that an acknowledgement of its machine covers


@dataclasses.dataclass
class DetectResult:
    rows: list[Row] = dataclasses.field(default_factory=list)
    segments: int = 0  # new segments handled in this run
    corrupt: int = 0  # tensors skipped as unreadable or of the wrong shape
    calibration: tuple[int, int] = (0, 0)  # (segments collected, needed) while calibrating
    trained: bool = False  # the detector was trained in this run
    rejected: int = 0  # folders named like segments whose manifest is unusable (passed by from now on)

    recalibrated: list[str] = dataclasses.field(default_factory=list)  # machines refitted after maintenance

    @property
    def anomalies(self) -> int:
        """WARNING or CRITICAL rows that no acknowledgement covers."""
        return sum(r.status in (th.WARNING, th.CRITICAL) and not r.acknowledged for r in self.rows)

    @property
    def critical(self) -> int:
        """CRITICAL rows that no acknowledgement covers."""
        return sum(r.status == th.CRITICAL and not r.acknowledged for r in self.rows)

    @property
    def acknowledged(self) -> int:
        """WARNING or CRITICAL rows that an acknowledgement covers."""
        return sum(r.acknowledged for r in self.rows)


def state_path(config: Config, output_dir: Path) -> Path:
    return config.detect.state or Path(output_dir) / STATE_FILE


def detect(
    config: Config,
    output_dir: Path,
    on_segment: Callable[[], None] = lambda: None,
) -> DetectResult:
    """Handle every new complete segment under ``output_dir``; see the module docstring."""
    output_dir = Path(output_dir)
    c = config.detect
    result = DetectResult()
    if not candidate_names(output_dir) and not state_path(config, output_dir).exists() \
            and output_dir.resolve() != Path(config.output.dir).resolve():
        # Not output.dir and nothing there: most likely a wrong path (in a crontab, say).
        # Said on every run, and no state file is left there. (In output.dir itself the
        # recorder may not have written its first segment yet.)
        log.warning("%s: no segment folders (named like 2026-12-01_08-11-28) and no state file here: nothing to "
                    "score. Give the folder that `record` or `process` writes (output.dir: %s).", output_dir,
                    config.output.dir)
        result.calibration = (0, c.calibration_segments)
        return result
    with Store(state_path(config, output_dir)) as store:
        detector = load_detector(c.model) if c.model.exists() else None
        if detector is not None and not store.has_thresholds():
            raise DetectorError(
                f"{c.model}: a trained detector, but the state file {store.path} holds no thresholds for it "
                "(a new or moved state file). Run `signalcraft train-detector OUTPUT` to retrain and set "
                "thresholds, point detect.state at the state file that goes with this detector, or move the "
                "detector file away to calibrate from scratch."
            )
        names = candidate_names(output_dir)
        seen = store.scored_folders(among=names) | still_rejected(store, output_dir, names)

        def reject(folder: Path, error: ManifestError) -> None:
            if error.transient:  # unreadable this time: tried again next run
                log.warning("%s: manifest not readable now, tried again next run: %s", folder.name, error)
                return
            # Recorded, so that one bad folder never stops every later run at the same place.
            with store.transaction():
                store.reject(folder.name, manifest_signature(folder), str(error), clock.now_iso())
            log.error("%s: not a usable segment, passed by until its manifest changes: %s", folder.name, error)
            result.rejected += 1

        scoring = _Scoring(config)  # the detector as compute.runtime runs it
        if detector is not None:
            scoring(detector)  # a missing or stale export fails now, not at the first new segment
        last_state: dict[str, Optional[str]] = {}  # machine -> its state in its newest scored segment
        outbox = Outbox.of(config)  # None: publishing off
        # Enough may have been collected by a run that was stopped while training.
        detector = _train_when_ready(config, output_dir, store, detector, result)
        c = _as_trained(config.detect, store)
        levels = _levels(store, c, detector is not None)
        alike = SpatialAlikeness(config)
        unmasked_said = False
        for segment in list_segments(output_dir, skip=seen, on_error=reject):
            tensors, corrupt = segment.load_tensors()
            result.segments += 1
            if detector is not None and detector.features != segment.manifest.features:
                # Recorded with other feature settings: not comparable. Recorded as seen
                # (so no later run stops here again) with its tensors skipped.
                try:
                    load_detector(c.model, features=segment.manifest.features)
                except DetectorError as e:
                    log.error("%s: skipped: %s", segment.name, e)
                corrupt += len(tensors)
                tensors = {}
            rooms = {}
            if detector is not None and tensors and _uses_room(c) and segment.manifest.room:
                if not any(key[1] == ROOM for key in levels) and not unmasked_said:
                    unmasked_said = True
                    log.info("the detector was trained without the room's levels (by an earlier signalcraft, or on "
                             "segments without room tensors): segments are scored without them until `signalcraft "
                             "train-detector` retrains it")
                rooms = segment.load_room()
                tensors = masked(tensors, rooms, levels, c.room_mask_db)
            result.corrupt += corrupt
            with store.transaction():
                if detector is None:
                    _calibrate(store, segment, tensors, corrupt, result)
                else:
                    _score(store, scoring(detector), segment,
                           attribute(tensors, levels, alike(segment.manifest.features), rooms), corrupt, c, result,
                           last_state, outbox)
            on_segment()
            trained, recalibrated = result.trained, len(result.recalibrated)
            detector = _train_when_ready(config, output_dir, store, detector, result)
            if detector is not None:
                detector = _recalibrate_when_ready(dataclasses.replace(config, detect=c), output_dir, store, detector,
                                                   result)
            if (result.trained, len(result.recalibrated)) != (trained, recalibrated):
                c = _as_trained(config.detect, store)
                levels = _levels(store, c, True)
        result.calibration = (store.calibration_count(), c.calibration_segments) if detector is None else (0, 0)
    return result


class _Scoring:
    """The detector in use, wrapped for ``compute.runtime`` (onnxruntime: its ONNX
    export scores, ``edge.runtime.EdgeScored``); wrapped again only when it changes."""

    def __init__(self, config: Config):
        self._config = config
        self._detector = self._wrapped = None

    def __call__(self, detector):
        if detector is not self._detector:
            self._detector = self._wrapped = detector
            if self._config.compute.runtime == "onnxruntime":
                from ..edge.runtime import EdgeScored, OnnxScorer

                onnx = OnnxScorer(self._config.detect.model, self._config.compute.precision)
                self._wrapped = EdgeScored(detector, onnx)
                log.info("scoring with ONNX Runtime (%s): %s%s", self._config.compute.precision,
                         ", ".join(onnx.sources) or "no source",
                         "".join(f"; {s} on its own scorer ({r})" for s, r in onnx.not_exported.items()))
        return self._wrapped


def _levels(store: Store, c, trained: bool) -> Levels:
    """The band levels that attribution compares each stream with (none with
    ``detect.attribution`` off, or before the detector trained with it on), and the
    room's levels that masking and attribution compare the room tensors with (keyed
    (mic, ``ROOM``); none with both off); ``trained``: there is a detector."""
    levels = {key: db for key, db in levels_from_data(store.band_levels()).items()
              if (_uses_room(c) if key[1] == ROOM else c.attribution)}
    if c.attribution and trained and not any(key[1] != ROOM for key in levels):
        log.info("detect.attribution is on, but the detector was trained without band levels (by an earlier "
                 "signalcraft, or with it off): streams are scored without attribution until `signalcraft "
                 "train-detector` retrains it")
    return levels


def _as_trained(c, store: Store):
    """``c`` (``DetectConfig``) with the ``room_mask_db`` that the detector in use was
    trained with (its thresholds were fitted on tensors masked so): a changed value takes
    effect when the detector trains again, and until then each run says so."""
    text = store.get_meta(MASK_META)
    if text is None:  # not trained yet, or by a signalcraft before room masking
        return c
    try:
        value = json.loads(text)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError("not a positive number or null")
    except (TypeError, ValueError):
        log.error("%s: the room mask the detector trained with is recorded as %.40r, which is damaged: using "
                  "detect.room_mask_db (%s); retrain with `signalcraft train-detector`", store.path, text,
                  _as_yaml(c.room_mask_db))
        return c
    if value != c.room_mask_db:
        log.warning("detect.room_mask_db is %s, but the detector was trained with %s: scoring with %s until "
                    "`signalcraft train-detector` retrains it", _as_yaml(c.room_mask_db), _as_yaml(value),
                    _as_yaml(value))
    return dataclasses.replace(c, room_mask_db=value)


def _as_yaml(db: Optional[float]) -> str:
    return "null" if db is None else f"{db:g}"


def _uses_room(c) -> bool:
    """Whether ``detect`` reads the room tensors: for masking, and for attribution (the
    room covers a machine's drop)."""
    return c.room_mask_db is not None or c.attribution


def still_rejected(store: Store, output_dir: Path, names: list[str]) -> set[str]:
    """The folders among ``names`` that were rejected and whose manifest has not changed
    since: `detect` passes them by (a changed one is read again)."""
    rejected = store.rejected_folders()
    return {name for name in names if name in rejected and rejected[name] == manifest_signature(output_dir / name)}


def _train_when_ready(config: Config, output_dir: Path, store: Store, detector: Optional[Detector],
                      result: DetectResult) -> Optional[Detector]:
    """The detector; trained now if there is none yet and calibration is complete."""
    if detector is None and store.calibration_count() >= config.detect.calibration_segments:
        detector = train_from_calibration(config, output_dir, store)
        result.trained = True
    return detector


def _calibrate(store: Store, segment: StoredSegment, tensors, corrupt: int, result: DetectResult) -> None:
    start = segment.start_time.isoformat()
    seg = store.record_segment(segment.name, start, clock.now_iso(), len(tensors), corrupt, phase="calibration")
    for (mic, source) in sorted(tensors):
        store.add_score(seg, mic, source, None, None, None, CALIBRATING)
        result.rows.append(Row(segment.name, start, mic, source, None, None, None, CALIBRATING))


def _score(store: Store, detector: Detector, segment: StoredSegment, tensors, corrupt: int, c,
           result: DetectResult, last_state: dict[str, Optional[str]], outbox: Optional[Outbox] = None) -> None:
    """Score one segment; ``last_state``: machine -> its state before this segment,
    filled from the store on first need and kept up to date here. With ``outbox``, each
    machine's scores (and a change of its state) are queued for the broker in the same
    transaction."""
    start = segment.start_time.isoformat()
    at = clock.now_iso()
    seg = store.record_segment(segment.name, start, at, len(tensors), corrupt, phase="scored")
    recalibrating = {m["source"]: m["at_utc"] for m in store.maintenance(pending=True)}
    alerts: dict[str, list[tuple[int, str, float]]] = {}  # source -> (mic, status, score)
    states: dict[str, list[tuple[int, str]]] = {}  # source -> (mic, status) scored in this segment
    rows = []
    collected: set[str] = set()  # machines collected for their recalibration in this segment
    for (mic, source), tensor in sorted(tensors.items()):
        if source in recalibrating and start >= recalibrating[source]:  # after its maintenance
            store.add_score(seg, mic, source, None, None, None, CALIBRATING)
            result.rows.append(Row(segment.name, start, mic, source, None, None, None, CALIBRATING))
            collected.add(source)
            continue
        saved = store.get_threshold(mic, source)
        if saved is None or source not in detector.sources:  # not there at calibration
            log.warning("%s mic_%d/%s: not scored: no model or thresholds for it (not seen, or too few of its "
                        "tensors readable, during calibration); retrain with `signalcraft train-detector`",
                        segment.name, mic, source)
            store.add_score(seg, mic, source, None, None, None, CALIBRATING)
            continue
        learns = getattr(detector, "learns_online", False)
        if learns:
            score, model_state = _online_score(store, detector, segment, mic, source, tensor)
        else:
            score = float(detector.score(source, tensor[None])[0])
        state = th.ThresholdState.from_dict(saved)
        decision = th.decide(state, score, c)
        store.add_score(seg, mic, source, score, state.warning, state.critical, decision.status)
        if learns and decision.status == th.NORMAL and not decision.above_warning:
            # a WARNING or CRITICAL segment is never learnt, nor a lone one above the warning level
            store.set_scorer_state(mic, source, detector.learn(source, tensor[None], state=model_state), at)
        if decision.state != state:
            store.set_threshold(mic, source, decision.state.to_dict(), decision.change or "", at,
                                log_change=decision.change is not None)
        if decision.change:
            log.info("mic_%d/%s thresholds: %s", mic, source, decision.change)
        if decision.status != th.NORMAL:
            alerts.setdefault(source, []).append((mic, decision.status, score))
        states.setdefault(source, []).append((mic, decision.status))
        rows.append(Row(segment.name, start, mic, source, score, state.warning, state.critical, decision.status))
    if outbox is not None:  # a machine's first segment after its maintenance: its state is CALIBRATING
        for source in sorted(collected):
            if store.recalibration_folders(source, recalibrating[source]) == [segment.name]:
                outbox.scored(store, source, segment.name, start, CALIBRATING, store.machine_state(source),
                              [r for r in result.rows if r.folder == segment.name and r.source == source],
                              acknowledged=False)
    covered = {}
    for source, by_mic in states.items():
        status = max((s for _, s in by_mic), key=RANK.__getitem__)
        if source not in last_state:  # once per machine and run, not per segment
            last_state[source] = store.machine_state(source, before_segment=seg)
        _log_change(source, last_state[source], status, by_mic, segment)
        previous, last_state[source] = last_state[source], status
        ack = store.active_ack(source)
        if ack is not None and ack["status"] != status:  # its state changed: the acknowledgement ends
            store.end_ack(ack["id"], at, segment.name)
            log.info("%s: the acknowledgement of %s ends: %s in %s", source, ack["status"], status, segment.name)
            ack = None
        covered[source] = ack["id"] if ack is not None else None
        for mic, alert_status, score in alerts.get(source, []):
            store.add_alert(seg, mic, source, alert_status, score, at, ack_id=covered[source])
        if outbox is not None:
            outbox.scored(store, source, segment.name, start, status, previous,
                          [r for r in rows if r.source == source], acknowledged=covered[source] is not None)
    result.rows.extend(dataclasses.replace(r, acknowledged=r.status != th.NORMAL and covered.get(r.source) is not None)
                       for r in rows)


RANK = {th.NORMAL: 0, th.WARNING: 1, th.CRITICAL: 2}  # severity of a machine state


def _log_change(source: str, before: Optional[str], status: str, by_mic: list[tuple[int, str]],
                segment: StoredSegment) -> None:
    """Log the machine's state when it differs from ``before``, its state in its previous
    scored segment."""
    if before == status:
        return
    mics = ",".join(str(m) for m, s in by_mic if s != th.NORMAL)
    log.info("%s: %s -> %s in %s%s", source, before or "calibrated", status, segment.name,
             f" (mics {mics})" if mics else "")


def _online_score(store: Store, detector, segment: StoredSegment, mic: int, source: str, tensor
                  ) -> tuple[float, Optional[dict]]:
    """(score, the model state it came from) of a scorer that learns online. A stored
    state that is damaged is logged and replaced by the detector's own calibration
    model, so that one bad row never stops every later run."""
    model_state = store.get_scorer_state(mic, source)
    try:
        return float(detector.score(source, tensor[None], state=model_state)[0]), model_state
    except DetectorError as e:
        if model_state is None:
            raise
        log.error("%s mic_%d/%s: %s; starting again from the detector's calibration model", segment.name, mic,
                  source, e)
        return float(detector.score(source, tensor[None], state=None)[0]), None


def train_from_calibration(config: Config, output_dir: Path, store: Store) -> Detector:
    """Cold start: train on the calibration segments recorded in ``store``."""
    # A folder whose manifest cannot be used, and a damaged tensor, were reported when
    # detect came to the segment.
    chosen = [s for s in list_segments(output_dir, on_error=lambda folder, error: None)
              if store.phase(s.name) == "calibration"]
    return train_on_segments(config, output_dir, store, chosen, reported=True)


def trainable(store: Store, segments: list[StoredSegment]) -> list[StoredSegment]:
    """The segments among ``segments`` that may be trained on as normal: not labelled
    anomaly, and without alerts or scores above the WARNING level (a fault's first
    segments score above it before 3 of 5 make a WARNING) unless labelled normal (a
    false alarm)."""
    labels, flagged = store.labels(), store.alert_folders() | store.above_warning_folders()
    kept = [s for s in segments if labels.get(s.name, "normal" if s.name not in flagged else None) == "normal"]
    if len(kept) < len(segments):
        log.info("left out of training: %d segments labelled anomaly, or with alerts or scores above the WARNING "
                 "level and not labelled normal", len(segments) - len(kept))
    return kept


def train_on_segments(config: Config, output_dir: Path, store: Store, chosen: list[StoredSegment],
                      max_segments: Optional[int] = None, reported: bool = False) -> Detector:
    """Train the detector on ``chosen`` segments, taken as normal, and
    fit thresholds per (mic, source). More than ``max_segments`` are thinned evenly
    (every tensor is held in memory while training). The previous detector file stays in
    place until the new one is saved, and is then kept as ``<model>.<time>.bak``.
    ``reported``: their damaged machine tensors were logged already (by ``detect``
    calibrating them), so only the debug log has them again."""
    c = config.detect
    if max_segments is not None and len(chosen) > max_segments:
        keep = np.linspace(0, len(chosen) - 1, max_segments).round().astype(int)
        log.info("training on %d of %d segments, evenly spread", max_segments, len(chosen))
        chosen = [chosen[k] for k in keep]
    if len(chosen) < 2:
        raise DetectorError(f"{output_dir}: {len(chosen)} segment(s) to train on; need at least 2 "
                            f"(detect.calibration_segments is {c.calibration_segments}).")
    features = chosen[0].manifest.features
    if any(s.manifest.features != features for s in chosen):
        raise DetectorError(f"{output_dir}: the segments to train on were made with different feature settings "
                            "(features in their manifests); choose a period of one setting with --since/--until.")
    loaded = [s.load_tensors(reported)[0] for s in chosen]
    rooms = [s.load_room() if _uses_room(c) else {} for s in chosen]
    room_levels = fit_room_levels(rooms)
    loaded = [masked(tensors, room, room_levels, c.room_mask_db) for tensors, room in zip(loaded, rooms)]
    levels = {**(fit_levels(loaded) if c.attribution else {}), **room_levels}
    alike = SpatialAlikeness(config)(features)
    loaded = [attribute(tensors, levels, alike, room) for tensors, room in zip(loaded, rooms)]  # as they are scored
    del rooms
    kind = SCORERS[c.scorer.kind]
    folds = max(2, min(kind.cross_fit_folds, len(chosen)))
    sources = sorted({source for tensors in loaded for _, source in tensors})
    log.info("training the %s detector on %d segments of %d source(s): %d cross-fitting folds for the thresholds, "
             "then all%s", c.scorer.kind, len(chosen), len(sources), folds,
             f" ({folds + 1} autoencoder trainings per source; progress follows)" if c.scorer.kind == "autoencoder"
             else "")
    out_of_fold = cross_fit(loaded, lambda tensors: fit_detector(tensors, features, c), kind.cross_fit_folds)
    detector = fit_detector(pooled(loaded), features, c)

    def commit(at: str) -> None:
        store.set_band_levels(levels_to_data(levels), at)
        store.set_meta(MASK_META, json.dumps(c.room_mask_db))
        store.clear_scorer_states()  # online models start again from the new detector's
        store.mark_calibration_done()
        for m in store.maintenance(pending=True):  # the new detector was fitted on the period chosen
            store.mark_recalibrated(m["source"], at)

    _install(config, store, detector, out_of_fold, commit, pooled(loaded))
    return detector


def _install(config: Config, store: Store, detector, out_of_fold: dict[tuple[int, str], list[float]],
             commit: Callable[[str], None], tensors_by_source: dict) -> None:
    """Save ``detector`` and the levels fitted on ``out_of_fold`` scores; ``commit(at)``
    records the rest of the change in the same transaction. With ``compute.runtime:
    onnxruntime`` the new detector is then exported, checked on ``tensors_by_source``
    (its training tensors).

    The detector and its thresholds change together: the new file is written beside the
    old one, the thresholds are committed, and only then is the file renamed into place.
    A failure before the rename leaves the previous detector with its own thresholds."""
    c = config.detect
    at = clock.now_iso()
    # A stream with too few readable calibration tensors (each was logged) does not hold
    # the others back: it is left unscored until a retraining fits it.
    counts = {key: int(np.isfinite(scores).sum()) for key, scores in out_of_fold.items()}
    some = any(n >= th.MIN_FIT_SCORES for n in counts.values())
    fitted, unfitted = {}, []
    for (mic, source), scores in sorted(out_of_fold.items()):
        if some and counts[(mic, source)] < th.MIN_FIT_SCORES:
            log.error("mic_%d/%s: only %d of its calibration tensors could be scored, thresholds need at least "
                      "%d: it is not scored; run `signalcraft train-detector` once more of its segments are "
                      "recorded", mic, source, counts[(mic, source)], th.MIN_FIT_SCORES)
            unfitted.append((mic, source))
            continue
        fitted[(mic, source)] = th.fit(np.asarray(scores), c, where=f"mic_{mic}/{source}")
    staged = temp_path(c.model)
    save_detector(detector, staged)
    try:
        backup = keep_backup(c.model)  # a hard link: the file in place stays the previous detector
        with store.transaction():
            for (mic, source), state in fitted.items():
                store.set_threshold(mic, source, state.to_dict(), th.describe_fit(state), at)
                log.info("mic_%d/%s: WARNING above %.4g, CRITICAL above %.4g", mic, source, state.warning,
                         state.critical)
            for mic, source in unfitted:  # levels of the previous detector do not fit the new one
                store.drop_threshold(mic, source)
            commit(at)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, c.model)
    log.info("detector saved to %s%s", c.model, f" (the previous one kept as {backup.name})" if backup else "")
    if config.compute.runtime == "onnxruntime":  # the export of the previous detector no longer fits
        from ..edge.export import export_detector

        log.info("compute.runtime is onnxruntime: exporting the new detector")
        export_detector(detector, c.model, tensors_by_source, int8=config.compute.precision == "int8")


def _recalibrate_when_ready(config: Config, output_dir: Path, store: Store, detector,
                            result: DetectResult):
    """Refit each machine whose maintenance is pending once enough of its segments after
    the maintenance are collected; returns the detector now in use."""
    c = config.detect
    for m in store.maintenance(pending=True):
        source = m["source"]
        labels = store.labels()
        folders = [f for f in store.recalibration_folders(source, m["at_utc"]) if labels.get(f) != "anomaly"]
        if len(folders) < c.calibration_segments:
            continue
        # Per segment the machine's own tensors, and every stream's typical level per
        # band for attribution (the other machines' tensors are not kept); masked where
        # the room was loud, as in scoring.
        stored = _levels(store, c, False)
        own: list[SegmentTensors] = []
        typical: list[Profiles] = []
        for folder in folders:
            try:
                segment = open_segment(output_dir / folder)
            except (ManifestError, FileNotFoundError) as e:
                log.warning("%s: left out of the recalibration of %s: %s", folder, source, e)
                continue
            # Scoring reported their damaged tensors when it collected them.
            tensors = segment.load_tensors(reported=True)[0]
            rooms = segment.load_room(reported=True) if _uses_room(c) else {}
            tensors = masked(tensors, rooms, stored, c.room_mask_db)
            if any(key[1] == source for key in tensors):
                own.append({k: t for k, t in tensors.items() if k[1] == source})
                typical.append({**profiles(tensors), **room_profiles(rooms)} if c.attribution else {})
        fresh = levels_of([{k: db for k, db in by_stream.items() if k[1] == source} for by_stream in typical])
        levels = {**{k: v for k, v in stored.items() if k[1] != source}, **fresh}
        alike = SpatialAlikeness(config)(detector.features)
        loaded = [shifted(tensors, band_shifts(db, levels, alike)) for tensors, db in zip(own, typical)]
        if len(loaded) < max(2, c.calibration_segments // 2):
            log.warning("%s: only %d of %d segments after its maintenance are readable; collecting more",
                        source, len(loaded), len(folders))
            continue
        log.info("recalibrating %s on %d segments after its maintenance of %s", source, len(loaded), m["at_utc"])
        features = detector.features

        def fit(tensors: dict, features: dict = features):
            return fit_detector(tensors, features, c)

        out_of_fold = cross_fit(loaded, fit, SCORERS[c.scorer.kind].cross_fit_folds)
        detector = with_source(detector, source, fit(pooled(loaded)))

        def commit(at: str, source: str = source, fresh: Levels = fresh) -> None:
            store.set_band_levels(levels_to_data(fresh), at, source=source)
            store.clear_scorer_states(source)
            store.mark_recalibrated(source, at)

        _install(config, store, detector, out_of_fold, commit, pooled(loaded))
        result.recalibrated.append(source)
    return detector
