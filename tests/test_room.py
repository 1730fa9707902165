"""Room masking (detect/room.py): where the room tensor says a loud event hid the
machines, their streams count as their typical level in the rest of the segment."""

import dataclasses
import datetime as dt

import numpy as np
import pytest
import torch

from signalcraft.config import config_from_dict
from signalcraft.detect.attribution import levels_from_data
from signalcraft.detect.room import KEEP, fit_room_levels, masked
from signalcraft.detect.run import detect
from signalcraft.detect.store import Store
from signalcraft.segments import SegmentWriter, list_segments
from signalcraft.segments.layout import ROOM

from conftest import segment_manifest

N_MELS, N_FRAMES = 240, 240
LEVEL = {"pump": -20.0, "fan": -45.0}
ROOM_DB = -60.0


def noisy(level_db: float, seed: int) -> torch.Tensor:
    """A (1, N_MELS, N_FRAMES) dB tensor: ``level_db``, a level per band that varies
    from one segment to the next by 1 dB, and 1 dB from frame to frame."""
    rng = np.random.default_rng(seed)
    per_band = rng.normal(0, 1.0, (1, N_MELS, 1))
    return torch.from_numpy(level_db + per_band + rng.normal(0, 1.0, (1, N_MELS, N_FRAMES))).float()


def test_loud_room_cells_take_the_streams_median_over_the_bands_other_frames():
    pump, fan = noisy(-20, 1), noisy(-45, 2)
    room = noisy(ROOM_DB, 3)
    room[0, 10, :100] += 30  # an event in band 10, 100 of 240 frames
    room[0, 20, :200] += 30  # one that fills most of band 20: too few frames left
    levels = fit_room_levels([{0: noisy(ROOM_DB, 4)}])
    assert set(levels) == {(0, ROOM)}
    out = masked({(0, "pump"): pump, (0, "fan"): fan, (1, "fan"): fan}, {0: room}, levels, 10.0)
    for key, t in ((0, "pump"), pump), ((0, "fan"), fan):
        np.testing.assert_allclose(out[key][0, 10, :100].numpy(), t[0, 10, 100:].median().item())
        assert torch.equal(out[key][0, 10, 100:], t[0, 10, 100:])  # the rest of the band as it was
        assert torch.equal(out[key][0, 20], t[0, 20])  # fewer than KEEP of the frames left: not masked
        assert torch.equal(out[key][0, :10], t[0, :10]) and torch.equal(out[key][0, 21:], t[0, 21:])
    assert out[(1, "fan")] is fan  # another microphone: its own room decides
    assert 40 / 240 < KEEP < 140 / 240
    assert masked({(0, "fan"): fan}, {0: room}, levels, None)[(0, "fan")] is fan
    assert masked({(0, "fan"): fan}, {0: room}, {}, 10.0)[(0, "fan")] is fan  # no level for the room


def write_segment(out, start: dt.datetime, k: int, event_frames: int = 0) -> None:
    """Two machines at one microphone and the room; with ``event_frames``, a loud event
    over the first of them that the separator also took out of the fan's stream."""
    pump, fan, room = noisy(LEVEL["pump"], 3 * k), noisy(LEVEL["fan"], 3 * k + 1), noisy(ROOM_DB, 3 * k + 2)
    room[0, :, :event_frames] += 40.0
    fan[0, :, :event_frames] -= 15.0
    manifest = dataclasses.replace(segment_manifest(start, sources=("pump", "fan")), room=(0,))
    with SegmentWriter(out, start) as w:
        w.save_tensor(0, "pump", pump)
        w.save_tensor(0, "fan", fan)
        w.save_room(0, room)
        w.commit(manifest)


@pytest.mark.parametrize("mask_db, attribution, flagged", [
    (10.0, False, False),  # masked
    (None, True, False),  # unmasked, but the room rose where the fan dropped: attribution takes the drop out
    (None, False, True),
])
def test_detect_masks_where_the_room_was_loud_with_levels_fitted_in_calibration(tmp_path, mask_db, attribution,
                                                                                 flagged):
    settings = {"capture": {"channels": [1]}, "output": {"dir": str(tmp_path / "out"), "keep_days": None},
                "detect": {"calibration_segments": 10, "model": str(tmp_path / "detector.pt"),
                           "scorer": {"kind": "profile"}, "room_mask_db": mask_db, "attribution": attribution}}
    config = config_from_dict(settings, tmp_path / "config.yaml")
    t0 = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone.utc)
    for k in range(10):
        write_segment(tmp_path / "out", t0 + dt.timedelta(seconds=10 * k), k)
    assert detect(config, tmp_path / "out").trained
    with Store(tmp_path / "out" / "signalcraft.sqlite") as store:
        saved = levels_from_data(store.band_levels())
    if mask_db is None and not attribution:
        assert (0, ROOM) not in saved
    else:
        expected = fit_room_levels([s.load_room() for s in list_segments(tmp_path / "out")])
        np.testing.assert_allclose(saved[(0, ROOM)], expected[(0, ROOM)], rtol=1e-6)
    # The event covers 150 of 240 frames: the fan's band medians fall by 15 dB with it.
    busy, quiet = t0 + dt.timedelta(seconds=200), t0 + dt.timedelta(seconds=210)
    write_segment(tmp_path / "out", busy, 50, event_frames=150)
    write_segment(tmp_path / "out", quiet, 51)
    # Above the warning level or not (one segment above it alone raises no alert).
    above = {(r.start_time, r.source): r.score > r.warning for r in detect(config, tmp_path / "out").rows}
    busy, quiet = busy.isoformat(), quiet.isoformat()
    assert above[(busy, "fan")] == flagged
    assert not (above[(busy, "pump")] or above[(quiet, "pump")] or above[(quiet, "fan")])


def test_a_changed_room_mask_takes_effect_when_the_detector_trains_again(tmp_path, caplog):
    from signalcraft.detect.run import train_on_segments

    def config(mask_db):
        return config_from_dict({
            "capture": {"channels": [1]}, "output": {"dir": str(tmp_path / "out"), "keep_days": None},
            "detect": {"calibration_segments": 10, "model": str(tmp_path / "detector.pt"),
                       "scorer": {"kind": "profile"}, "room_mask_db": mask_db, "attribution": False}},
            tmp_path / "config.yaml")

    t0 = dt.datetime(2026, 3, 2, 8, 0, tzinfo=dt.timezone.utc)
    for k in range(10):
        write_segment(tmp_path / "out", t0 + dt.timedelta(seconds=10 * k), k)
    assert detect(config(10.0), tmp_path / "out").trained
    calibration = list_segments(tmp_path / "out")
    write_segment(tmp_path / "out", t0 + dt.timedelta(seconds=200), 50, event_frames=150)
    with caplog.at_level("WARNING"):
        rows = detect(config(None), tmp_path / "out").rows
    fan = {r.source: r for r in rows}["fan"]
    assert fan.score <= fan.warning  # still masked, as the thresholds were fitted
    assert "detect.room_mask_db is null, but the detector was trained with 10: scoring with 10 until" in caplog.text
    with Store(tmp_path / "out" / "signalcraft.sqlite") as store:
        train_on_segments(config(None), tmp_path / "out", store, calibration)
    write_segment(tmp_path / "out", t0 + dt.timedelta(seconds=210), 51, event_frames=150)
    caplog.clear()
    rows = detect(config(None), tmp_path / "out").rows
    fan = {r.source: r for r in rows}["fan"]
    assert fan.score > fan.warning and "trained with" not in caplog.text


def test_a_damaged_record_of_the_trained_room_mask_is_said_and_the_configured_one_used(tmp_path, caplog):
    from signalcraft.detect.run import MASK_META, _as_trained

    config = config_from_dict({"detect": {"room_mask_db": 8}}, tmp_path / "config.yaml")
    with Store(tmp_path / "state.sqlite") as store:
        assert _as_trained(config.detect, store).room_mask_db == 8  # nothing trained yet
        for text in ("{", "-3", "true", '"10"'):
            store.set_meta(MASK_META, text)
            caplog.clear()
            assert _as_trained(config.detect, store).room_mask_db == 8
            assert "which is damaged: using detect.room_mask_db (8)" in caplog.text
        store.set_meta(MASK_META, "null")
        assert _as_trained(config.detect, store).room_mask_db is None
