"""Attribution across the streams of one microphone (detect/attribution.py): a leak of
one machine's new sound into another's stream is taken out before scoring."""

import logging

import numpy as np
import pytest
import torch

from signalcraft import clock
from signalcraft.detect.attribution import (OWN_BANDS, SpatialAlikeness, attribute, band_shifts, fit_levels,
                                           levels_from_data, levels_to_data, profiles, shifted)
from signalcraft.detect.model import median_over_frames
from signalcraft.detect.room import fit_room_levels
from signalcraft.detect.store import Store

N_MELS, N_FRAMES = 40, 30


def stream(level_db: np.ndarray, seed: int) -> torch.Tensor:
    """A (1, N_MELS, N_FRAMES) dB tensor around ``level_db`` per band."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(level_db[:, None] + rng.normal(0, 0.5, (N_MELS, N_FRAMES))).float()[None]


def typical(t: torch.Tensor) -> np.ndarray:
    return median_over_frames(t[None])[0].numpy()


PUMP = np.full(N_MELS, -20.0)
FAN = np.full(N_MELS, -40.0)  # a quiet stream: a little leak is a large rise in it


def calibration(n: int = 8) -> list[dict]:
    return [{(0, "pump"): stream(PUMP, 2 * k), (0, "fan"): stream(FAN, 2 * k + 1),
             (1, "pump"): stream(PUMP - 3, 100 + k)} for k in range(n)]


def test_a_leak_is_taken_out_of_the_stream_it_leaked_into_and_the_rest_stays():
    levels = fit_levels(calibration())
    assert set(levels) == {(0, "pump"), (0, "fan"), (1, "pump")}
    np.testing.assert_allclose(levels[(0, "fan")], FAN, atol=0.5)
    pump, fan = PUMP.copy(), FAN.copy()
    pump[10:20] += 20  # the pump's fault: +20 dB, from -20 dB
    fan[10:20] = -25  # its leak into the fan: +15 dB, but 25 dB less power than the pump gained
    fan[30:35] += 12  # the fan's own new sound, which the pump did not gain
    fan[5:8] -= 10  # and a band it lost, where the pump got quieter too
    pump[5:8] -= 3
    segment = {(0, "pump"): stream(pump, 50), (0, "fan"): stream(fan, 51), (1, "pump"): stream(PUMP + 6, 52)}
    out = attribute(segment, levels)
    # Nothing outdid the pump's fault; where the fan's own sound outdid the pump's small
    # chance rises, those go (less than the noise of a band's median).
    moved = typical(segment[(0, "pump")]) - typical(out[(0, "pump")])
    assert np.all(moved[10:20] == 0) and np.all(moved >= 0) and moved.max() < 0.3
    assert out[(1, "pump")] is segment[(1, "pump")]  # alone at its microphone
    after = typical(out[(0, "fan")])
    np.testing.assert_allclose(after[10:20], levels[(0, "fan")][10:20], atol=1e-4)  # back to normal
    np.testing.assert_allclose(after[30:35], typical(segment[(0, "fan")])[30:35])  # its own rise stays
    np.testing.assert_allclose(after[5:8], typical(segment[(0, "fan")])[5:8])  # a drop stays
    # The band is moved down in every frame: its rhythm is kept.
    d = (segment[(0, "fan")] - out[(0, "fan")])[0, 12]
    assert float(d.std()) < 1e-5 and float(d.mean()) > 10


def test_a_drop_under_another_streams_new_sound_is_taken_out_and_other_drops_stay():
    levels = fit_levels(calibration())
    pump, fan = PUMP.copy(), FAN.copy()
    pump[10:20] += 20  # the pump's fault: far more new power than the fan has there
    fan[10:20] -= 6  # the separator gives the covered bins to the pump
    fan[5:8] -= 10  # where the pump gained nothing (it got quieter): the fan's own drop
    pump[5:8] -= 3
    segment = {(0, "pump"): stream(pump, 60), (0, "fan"): stream(fan, 61)}
    out = attribute(segment, levels)
    after, before = typical(out[(0, "fan")]), typical(segment[(0, "fan")])
    np.testing.assert_allclose(after[10:20], levels[(0, "fan")][10:20], atol=1e-4)  # back to normal
    np.testing.assert_allclose(after[5:8], before[5:8])
    np.testing.assert_allclose(typical(out[(0, "pump")])[10:20], typical(segment[(0, "pump")])[10:20])


def test_a_drop_where_the_room_gained_is_taken_out_and_the_room_never_takes_a_rise():
    """Under a loud event the separator gives the machines' bins to the room."""
    room_level = np.full(N_MELS, -50.0)
    levels = {**fit_levels(calibration()), **fit_room_levels([{0: stream(room_level, 500 + k)} for k in range(8)])}
    fan, room = FAN.copy(), room_level.copy()
    fan[10:20] -= 8  # lost under the event
    room[10:20] += 15  # the event: far more new power than the fan has there
    fan[30:35] += 10  # the fan's own rise, where the room gained even more: stays
    room[30:35] += 30
    fan[5:8] -= 8  # a drop where the room did not change: stays
    pump = PUMP - 1  # the pump gains nothing anywhere: it covers no drop
    room[40:45] += 2  # a rise within the room's own variation covers nothing
    fan[40:45] -= 8
    segment = {(0, "pump"): stream(pump, 80), (0, "fan"): stream(fan, 81)}
    out = attribute(segment, levels, rooms={0: stream(room, 82)})
    after, before = typical(out[(0, "fan")]), typical(segment[(0, "fan")])
    np.testing.assert_allclose(after[10:20], levels[(0, "fan")][10:20], atol=1e-4)
    np.testing.assert_allclose(after[30:35], before[30:35])
    np.testing.assert_allclose(after[5:8], before[5:8])
    np.testing.assert_allclose(after[40:45], before[40:45])
    assert set(out) == set(segment)  # the room is not scored
    # Without the room's tensor, or its level, the drop stays.
    for rooms, known in (None, levels), ({0: stream(room, 82)}, fit_levels(calibration())):
        np.testing.assert_allclose(typical(attribute(segment, known, rooms=rooms)[(0, "fan")])[10:20], before[10:20])


def test_one_streams_attribution_needs_only_the_other_streams_typical_levels():
    """What recalibration after one machine's maintenance does: it keeps that machine's
    tensors and only the others' band medians, and gets what attribute gives."""
    levels = fit_levels(calibration())
    pump, fan = PUMP.copy(), FAN.copy()
    pump[10:20] += 20
    fan[10:20] = -25  # a leak: taken out
    fan[30:35] += 12  # its own rise: stays
    segment = {(0, "pump"): stream(pump, 70), (0, "fan"): stream(fan, 71), (1, "pump"): stream(PUMP, 72)}
    whole = attribute(segment, levels)
    own = {(0, "fan"): segment[(0, "fan")]}
    alone = shifted(own, band_shifts(profiles(segment), levels))
    assert set(alone) == {(0, "fan")}
    torch.testing.assert_close(alone[(0, "fan")], whole[(0, "fan")], rtol=0, atol=0)
    assert not torch.equal(alone[(0, "fan")], segment[(0, "fan")])
    # Without the other streams' levels nothing outdoes the fan's rise: it stays.
    torch.testing.assert_close(shifted(own, band_shifts(profiles(own), levels))[(0, "fan")], segment[(0, "fan")])


def test_a_rise_where_the_array_cannot_tell_two_machines_apart_goes_with_the_one_that_clearly_changed():
    levels = fit_levels([{k: v for k, v in c.items() if k[0] == 0} for c in calibration()])
    alike = {("pump", "fan"): np.arange(N_MELS) < 3, ("fan", "pump"): np.arange(N_MELS) < 3}
    fan = FAN.copy()
    fan[0:3] += 25  # the pump's new low tone, all in the fan's stream, where the two are alike

    def segment(changed_bands: int) -> dict:
        pump = PUMP.copy()
        pump[10:10 + changed_bands] += 10  # the pump's fault where the array tells the two apart
        return {(0, "pump"): stream(pump, 70), (0, "fan"): stream(fan, 71)}

    clear = segment(OWN_BANDS + 2)
    after = typical(attribute(clear, levels, alike)[(0, "fan")])
    np.testing.assert_allclose(after[0:3], levels[(0, "fan")][0:3], atol=1e-4)  # back to normal
    assert np.abs(typical(clear[(0, "fan")])[3:] - after[3:]).max() < 0.3  # at most chance rises outdone
    # The old rules alone keep it: the fan gained more new power there than the pump.
    np.testing.assert_allclose(typical(attribute(clear, levels)[(0, "fan")])[0:3], typical(clear[(0, "fan")])[0:3])
    # Where no machine alike with the fan changed clearly, the rise is the fan's own (an imbalance).
    slight = segment(OWN_BANDS - 2)
    np.testing.assert_allclose(typical(attribute(slight, levels, alike)[(0, "fan")])[0:3],
                               typical(slight[(0, "fan")])[0:3])
    # Alike nowhere: the pump explains nothing.
    apart = {key: np.zeros(N_MELS, dtype=bool) for key in alike}
    np.testing.assert_allclose(typical(attribute(clear, levels, apart)[(0, "fan")])[0:3],
                               typical(clear[(0, "fan")])[0:3])
    # The pump's own change stays in every case.
    np.testing.assert_allclose(typical(attribute(clear, levels, alike)[(0, "pump")])[10:22],
                               typical(clear[(0, "pump")])[10:22])


def test_a_rise_where_a_clearly_changed_machine_rose_too_is_that_machines_even_where_this_stream_gained_more():
    fan_normal = FAN.copy()
    fan_normal[22:26] = -10.0  # bands where the fan is normally 10 dB louder than the pump
    levels = fit_levels([{(0, "pump"): stream(PUMP, 2 * k), (0, "fan"): stream(fan_normal, 2 * k + 1)}
                         for k in range(8)])

    def segment(changed_bands: int) -> dict:
        pump, fan = PUMP.copy(), fan_normal.copy()
        pump[5:5 + changed_bands] += 10  # the pump's fault, told apart everywhere
        pump[22:26] += 6  # the edge of its new sound, in the fan's loud bands
        fan[22:26] += 3  # the separator gives the louder fan stream a few dB of it: more power than the pump got
        fan[30:33] += 8  # the fan's own new sound, where the pump did not rise
        return {(0, "pump"): stream(pump, 80), (0, "fan"): stream(fan, 81)}

    clear = segment(OWN_BANDS + 2)
    after = typical(attribute(clear, levels)[(0, "fan")])
    np.testing.assert_allclose(after[22:26], levels[(0, "fan")][22:26], atol=1e-4)  # back to normal
    np.testing.assert_allclose(after[30:33], typical(clear[(0, "fan")])[30:33])  # its own rise stays
    # Without a clear change of the pump the fan's rise there is its own: it gained more.
    slight = segment(OWN_BANDS - 8)
    np.testing.assert_allclose(typical(attribute(slight, levels)[(0, "fan")])[22:26],
                               typical(slight[(0, "fan")])[22:26])
    # The pump's fault stays whole where nothing outdid it.
    np.testing.assert_allclose(typical(attribute(clear, levels)[(0, "pump")])[5:5 + OWN_BANDS + 2],
                               typical(clear[(0, "pump")])[5:5 + OWN_BANDS + 2])


def _spatial_repo(repo, sources=("pump", "fan")) -> None:
    """An array model whose pump and fan reach the 4 microphones alike below 39 Hz (the
    same covariance, all microphones in phase) and apart above (the fan at microphones
    2 and 3 only)."""
    from signalcraft.dsp.spatial import N_FFT
    from signalcraft.separate import save_model

    from conftest import tiny_demucs

    freqs = N_FFT // 2 + 1
    inphase = torch.full((4, 4), 0.25, dtype=torch.complex64)
    R = inphase.expand(2, freqs, 4, 4).clone()
    R[1, 5:] = torch.diag(torch.tensor([0.0, 0.0, 0.5, 0.5])).to(torch.complex64)
    save_model(tiny_demucs(sources=sources, audio_channels=4), repo, "tiny", spatial=R)


def _config(repo, model="tiny", attribution=True, assets=None):
    import dataclasses

    from signalcraft.config import Config, DetectConfig, SeparationConfig

    return dataclasses.replace(Config(), separation=SeparationConfig(repo=repo, model=model, assets=assets),
                               detect=DetectConfig(attribution=attribution))


def _features() -> dict:
    from signalcraft.config import FeaturesConfig
    from signalcraft.features import LogMel

    return LogMel(FeaturesConfig(), 16000, 160000).settings()


def test_alike_bands_come_from_the_array_models_covariances_under_the_asset_names(tmp_path):
    _spatial_repo(tmp_path)
    alike = SpatialAlikeness(_config(tmp_path, assets={"P-101": "pump", "F-201": "fan"}))(_features())
    assert set(alike) == {("P-101", "F-201"), ("F-201", "P-101")}
    bands = alike[("P-101", "F-201")]
    assert bands.shape == (240,) and bands.dtype == bool
    assert bands[:2].all() and not bands[4:].any()  # bands centred at 13 and 25 Hz; from 63 Hz apart
    np.testing.assert_array_equal(bands, alike[("F-201", "P-101")])
    assert SpatialAlikeness(_config(tmp_path, attribution=False))(_features()) == {}
    assert SpatialAlikeness(_config(tmp_path, model=None))(_features()) == {}


def test_without_readable_covariances_attribution_goes_on_without_alike_bands(tmp_path, model_repo, caplog):
    assert SpatialAlikeness(_config(model_repo))(_features()) == {}  # a one-channel model carries none
    (tmp_path / "broken.th").write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger="signalcraft.detect.attribution"):
        assert SpatialAlikeness(_config(tmp_path, model="broken"))(_features()) == {}
    assert "broken.th" in caplog.text and "spatial covariances are not readable" in caplog.text
    _spatial_repo(tmp_path)
    with caplog.at_level(logging.WARNING, logger="signalcraft.detect.attribution"):
        assert SpatialAlikeness(_config(tmp_path))({"kind": "log-mel"}) == {}
    assert "do not describe a mel filterbank" in caplog.text


def test_streams_without_levels_pass_unchanged_and_do_not_count():
    levels = fit_levels(calibration())
    fan = FAN.copy()
    fan[10:20] += 15
    valve = np.full(N_MELS, 0.0)
    segment = {(0, "fan"): stream(fan, 1), (0, "valve"): stream(valve + 30, 2)}  # valve: not calibrated
    out = attribute(segment, levels)
    assert out[(0, "fan")] is segment[(0, "fan")] and out[(0, "valve")] is segment[(0, "valve")]
    assert attribute(segment, {}) == segment


def test_levels_round_trip_through_the_state_file_and_damaged_ones_are_left_out(tmp_path, caplog):
    levels = fit_levels(calibration(3))
    with Store(tmp_path / "state.sqlite") as store:
        store.set_band_levels(levels_to_data(levels), clock.now_iso())
        back = levels_from_data(store.band_levels())
        assert set(back) == set(levels)
        for key in levels:
            np.testing.assert_allclose(back[key], levels[key])
        # A source's refit replaces its own rows only.
        store.set_band_levels([{"mic": 0, "source": "fan", "db": [1.0] * N_MELS}], clock.now_iso(),
                              source="fan")
        back = levels_from_data(store.band_levels())
        assert back[(0, "fan")].tolist() == [1.0] * N_MELS
        np.testing.assert_allclose(back[(0, "pump")], levels[(0, "pump")])
        store._execute("UPDATE band_levels SET levels_json = 'not json' WHERE source = 'fan'")
        store._execute("UPDATE band_levels SET levels_json = '[1.0, null]' WHERE mic = 1")
    with caplog.at_level(logging.ERROR, logger="signalcraft.detect.attribution"):
        with Store(tmp_path / "state.sqlite") as store:
            back = levels_from_data(store.band_levels())
    assert set(back) == {(0, "pump")}
    assert caplog.text.count("a damaged entry") == 2 and "train-detector" in caplog.text


@pytest.mark.parametrize("bad", [[], {"mic": 0}, {"mic": "x", "source": "a", "db": [1.0]},
                                 {"mic": 0, "source": "a", "db": [float("nan")]},
                                 {"mic": 0, "source": "a", "db": [[1.0]]}])
def test_each_kind_of_damaged_entry_is_rejected(bad, caplog):
    with caplog.at_level(logging.ERROR, logger="signalcraft.detect.attribution"):
        assert levels_from_data([bad]) == {}
    assert "a damaged entry" in caplog.text


def test_calibration_stores_each_streams_band_levels_for_attribution(calibrated):
    from signalcraft.segments import list_segments

    root, config, first, second = calibrated
    assert config.detect.attribution and second.trained
    with Store(root / "out" / "signalcraft.sqlite") as store:
        saved = levels_from_data(store.band_levels())
        phases = {s.name: store.phase(s.name) for s in list_segments(root / "out")}
    segments = [s.load_tensors()[0] for s in list_segments(root / "out") if phases[s.name] == "calibration"]
    expected = fit_levels(segments)
    assert set(saved) == set(expected) and len(saved) >= 1
    for key in expected:
        assert saved[key].shape == (config.features.n_mels,)
        np.testing.assert_allclose(saved[key], expected[key], rtol=1e-6)


def test_with_attribution_off_training_stores_no_levels(copy):
    import dataclasses

    from signalcraft.detect.run import state_path, train_on_segments
    from signalcraft.segments import list_segments

    project, config = copy
    config = dataclasses.replace(config, detect=dataclasses.replace(config.detect, attribution=False))
    with Store(state_path(config, project / "out")) as store:
        assert store.band_levels()  # from the calibration, with it on
        train_on_segments(config, project / "out", store, list_segments(project / "out"))
        assert store.band_levels() == []
