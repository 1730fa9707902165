import json
import math

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from signalcraft import simulate as sim
from signalcraft.cli import cli
from signalcraft.errors import ConfigError, ExitCode

SR = sim.DEFAULT_SAMPLE_RATE
SECONDS = 6.0  # short clips keep the file fast
FAULT_WINDOW = (2.0, 4.5)  # s


def scene(machines=("pump", "fan"), faults=(), **options):
    return sim.default_scene(machines, faults=faults, **{"seconds": SECONDS, **options})


def band_db(x: np.ndarray, lo: float, hi: float) -> float:
    """Energy of x between lo and hi Hz, dB."""
    power = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    f = np.fft.rfftfreq(x.size, 1 / SR)
    return 10 * np.log10(power[(f >= lo) & (f < hi)].sum() + 1e-30)


def bandpassed(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    spectrum = np.fft.rfft(x.astype(np.float64))
    f = np.fft.rfftfreq(x.size, 1 / SR)
    spectrum[(f < lo) | (f >= hi)] = 0
    return np.fft.irfft(spectrum, x.size)


def kurtosis(x: np.ndarray) -> float:
    x = x - x.mean()
    return float(np.mean(x**4) / np.mean(x**2) ** 2 - 3)


def speed(rendering: sim.Rendering, name: str) -> float:
    return next(m for m in rendering.labels["machines"] if m["name"] == name)["parameters"]["speed_hz"]


def twins(machines, name, kind, seed=3):
    """A scene with one fault in FAULT_WINDOW and its healthy twin (same seed)."""
    faulty = sim.render(scene(machines, [(name, sim.Fault(kind, *FAULT_WINDOW))], seed=seed))
    healthy = sim.render(scene(machines, seed=seed))
    return faulty, healthy


INSIDE = slice(round((FAULT_WINDOW[0] + 0.1) * SR), round((FAULT_WINDOW[1] - 0.1) * SR))
BEFORE = slice(round(0.1 * SR), round((FAULT_WINDOW[0] - 0.1) * SR))
AFTER = slice(round((FAULT_WINDOW[1] + 0.1) * SR), round((SECONDS - 0.1) * SR))


# --- Determinism ----------------------------------------------------------------------
def test_the_same_seed_gives_identical_audio_and_labels_and_another_seed_does_not():
    spec = dict(faults=[("pump", sim.Fault("bearing", 1.0, 3.0))], reverb_rt60_s=0.5)
    a, b = sim.render(scene(seed=7, **spec)), sim.render(scene(seed=7, **spec))
    assert a.mixture.tobytes() == b.mixture.tobytes()
    assert a.background.tobytes() == b.background.tobytes()
    assert {k: v.tobytes() for k, v in a.stems.items()} == {k: v.tobytes() for k, v in b.stems.items()}
    assert json.dumps(a.labels) == json.dumps(b.labels)

    c = sim.render(scene(seed=8, **spec))
    assert not np.allclose(a.mixture, c.mixture, atol=1e-3)
    assert a.labels["machines"][0]["parameters"] != c.labels["machines"][0]["parameters"]


def test_unit_none_is_the_seeds_own_unit():
    spec = dict(faults=[("pump", sim.Fault("bearing", 1.0, 3.0))], reverb_rt60_s=0.5, seed=7)
    a, b = sim.render(scene(**spec)), sim.render(scene(unit=7, **spec))
    assert a.mixture.tobytes() == b.mixture.tobytes()
    assert json.dumps(a.labels) == json.dumps(b.labels) and a.labels["unit"] == 7


def test_recordings_of_one_unit_share_the_machine_but_not_the_realisation():
    first, second = (sim.render(scene(("pump",), n_mics=1, seed=s, unit=11)) for s in (1, 2))
    other_unit = sim.render(scene(("pump",), n_mics=1, seed=1, unit=12))
    design = [r.labels["machines"][0]["parameters"] for r in (first, second, other_unit)]
    assert design[0] == design[1] != design[2]
    distant = [r.labels["background"]["distant_machine"] for r in (first, second, other_unit)]
    assert distant[0] == distant[1] != distant[2]
    # Another recording: other noise, drifts and background events.
    assert not np.allclose(first.stems["pump"], second.stems["pump"], atol=1e-3)
    assert first.labels["background"]["events"] != second.labels["background"]["events"]

    def tone_hz(r):
        """The strongest tone of the pump above 60 Hz (its vane pass), Hz."""
        power = np.abs(np.fft.rfft(r.stems["pump"][0].astype(np.float64))) ** 2
        f = np.fft.rfftfreq(r.stems["pump"].shape[1], 1 / SR)
        above = f >= 60
        return f[above][np.argmax(power[above])]

    # Same unit: the same vane-pass tone within the speed drift; another unit's differs.
    assert tone_hz(first) == pytest.approx(tone_hz(second), rel=0.05)
    assert design[2]["speed_hz"] * design[2]["n_vanes"] != pytest.approx(
        design[0]["speed_hz"] * design[0]["n_vanes"], rel=0.05)


def test_unit_must_be_a_non_negative_integer():
    with pytest.raises(ConfigError, match="unit"):
        scene(unit=-1)


def test_adding_a_machine_or_a_mic_leaves_the_others_unchanged():
    pump = sim.Machine("pump", "pump", (0.0, 2.0, 0.5))
    fan = sim.Machine("fan", "fan", (3.0, -2.0, 0.5))
    mics = ((0.0, 0.0, 1.5), (1.0, 0.0, 1.5))
    alone = sim.render(sim.Scene((pump,), mics, SECONDS, snr_db=None, seed=1))
    more = sim.render(sim.Scene((pump, fan), mics + ((2.0, 0.0, 1.5),), SECONDS, snr_db=None, seed=1))
    np.testing.assert_array_equal(alone.stems["pump"], more.stems["pump"][:2])
    np.testing.assert_array_equal(alone.background[0], more.background[0])  # diffuse noise is per mic


def test_machine_signal_is_seeded_and_at_the_documented_level():
    for kind in sim.MACHINE_TYPES:
        x = sim.machine_signal(kind, SECONDS, SR, np.random.default_rng(0))
        again = sim.machine_signal(kind, SECONDS, SR, np.random.default_rng(0))
        assert x.dtype == np.float32 and x.shape == (round(SECONDS * SR),)
        assert x.tobytes() == again.tobytes()
        level_db = 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) / sim.MACHINE_RMS)
        assert abs(level_db) < (1.0 if kind in sim.ROTATING else 3.0), kind


# --- The mixture and its parts --------------------------------------------------------
def test_mixture_is_the_sum_of_the_stems_and_the_background():
    r = sim.render(scene(("pump", "fan", "motor", "valve"), reverb_rt60_s=0.8, n_mics=3, seed=2))
    assert r.mixture.shape == r.background.shape == (3, round(SECONDS * SR))
    assert r.mixture.dtype == np.float32 and set(r.stems) == {"pump", "fan", "motor", "valve"}
    np.testing.assert_allclose(r.mixture, sum(r.stems.values()) + r.background, atol=1e-6)
    assert 0.01 < np.max(np.abs(r.mixture)) <= sim.PEAK_LIMIT


@pytest.mark.parametrize("snr_db", [-6.0, 0.0, 6.0, 2.5])
def test_snr_at_the_reference_mic_is_what_was_asked(snr_db):
    r = sim.render(scene(snr_db=snr_db, seed=4))
    machines = (r.mixture - r.background)[0].astype(np.float64)
    measured = 10 * np.log10(np.mean(machines**2) / np.mean(r.background[0].astype(np.float64) ** 2))
    assert measured == pytest.approx(snr_db, abs=0.1)
    assert r.labels["snr_db"] == snr_db


def test_a_fault_makes_the_machine_louder_but_leaves_the_room_as_it_was():
    faulty, healthy = twins(("pump", "fan"), "pump", "imbalance")
    np.testing.assert_array_equal(faulty.background, healthy.background)
    inside = [np.mean(r.mixture[0, INSIDE].astype(np.float64) ** 2) for r in (faulty, healthy)]
    louder = 10 * np.log10(inside[0] / inside[1])
    assert louder > 1.0  # fixed levels: no per-clip normalisation hides the fault
    assert faulty.labels["measured_snr_db"] > faulty.labels["snr_db"]


def test_the_room_alone_matches_the_background_of_the_scene_with_machines():
    """With snr_db None the background has a fixed level: a take with the machines off
    (for calibrate-noise) sounds like the room under the machines-on take."""
    on = sim.render(scene(snr_db=None, seed=9))
    off = sim.render(scene((), snr_db=None, seed=9))
    assert off.stems == {} and off.labels["measured_snr_db"] is None
    np.testing.assert_array_equal(on.background, off.background)
    np.testing.assert_array_equal(off.mixture, off.background)


def test_the_background_event_rate_is_a_scene_setting():
    """A busy shift: more knocks, clanks and beeps; none at rate 0; a bad rate is refused."""
    def count(rate):
        return len(sim.render(scene(seconds=30.0, seed=4, event_rate_hz=rate)).labels["background"]["events"])

    assert count(0.0) == 0
    assert count(1.0) > 2 * count(sim.EVENT_RATE_HZ) > 0
    with pytest.raises(ConfigError, match="event_rate_hz"):
        scene(event_rate_hz=-1.0)


@pytest.mark.parametrize("line_hz", [50.0, 60.0])
def test_a_motor_hums_at_twice_the_mains_frequency(line_hz):
    r = sim.render(scene(("motor",), snr_db=None, line_hz=line_hz, seed=1))
    x = r.stems["motor"][0].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x))
    f = np.fft.rfftfreq(x.size, 1 / SR)
    assert f[np.argmax(spectrum)] == pytest.approx(2 * line_hz, abs=0.5)


# --- Faults: the labels match the audio -----------------------------------------------
def test_imbalance_raises_the_1x_shaft_tone_in_the_mixture_only_inside_its_window():
    faulty, healthy = twins(("pump", "fan"), "pump", "imbalance")
    f1 = speed(faulty, "pump")

    def rise(part):
        return (band_db(faulty.mixture[0, part], 0.9 * f1, 1.1 * f1)
                - band_db(healthy.mixture[0, part], 0.9 * f1, 1.1 * f1))

    assert rise(INSIDE) > 6.0
    assert abs(rise(BEFORE)) < 0.5 and abs(rise(AFTER)) < 0.5
    assert faulty.labels["faults"] == [{"machine": "pump", "fault": "imbalance",
                                        "start_s": FAULT_WINDOW[0], "end_s": FAULT_WINDOW[1]}]


@pytest.mark.parametrize("machine", ["pump", "fan", "motor"])
def test_bearing_fault_adds_high_frequency_impacts(machine):
    faulty, healthy = twins((machine,), machine, "bearing")
    fault = faulty.labels["machines"][0]["faults"][0]["parameters"]
    assert 2000 <= fault["resonance_hz"] <= 4000
    lo, hi = 0.8 * fault["resonance_hz"], 1.2 * fault["resonance_hz"]
    a, b = faulty.stems[machine][0], healthy.stems[machine][0]
    assert band_db(a[INSIDE], lo, hi) - band_db(b[INSIDE], lo, hi) > 3.0
    assert kurtosis(bandpassed(a[INSIDE], lo, hi)) > kurtosis(bandpassed(b[INSIDE], lo, hi)) + 0.5
    assert abs(band_db(a[AFTER], lo, hi) - band_db(b[AFTER], lo, hi)) < 0.1
    # Impacts come at the defect frequency in the labels: the envelope of the resonance
    # band peaks there (envelope analysis, as a vibration analyst would check).
    envelope = np.abs(bandpassed(a[INSIDE], lo, hi))
    spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
    f = np.fft.rfftfreq(envelope.size, 1 / SR)
    assert f[np.argmax(np.where(f > 20, spectrum, 0))] == pytest.approx(fault["defect_hz"], rel=0.1)


def test_cavitation_adds_broadband_high_frequency_crackle():
    faulty, healthy = twins(("pump",), "pump", "cavitation")
    a, b = faulty.stems["pump"][0], healthy.stems["pump"][0]
    assert band_db(a[INSIDE], 3000, 7000) - band_db(b[INSIDE], 3000, 7000) > 4.0
    assert kurtosis(bandpassed(a[INSIDE], 3000, 7000)) > 1.0
    # Visible in what the microphones record, too.
    assert band_db(faulty.mixture[0, INSIDE], 3000, 7000) - band_db(healthy.mixture[0, INSIDE], 3000, 7000) > 2.0


def test_leak_adds_a_steady_high_frequency_hiss_to_a_valve():
    faulty, healthy = twins(("valve",), "valve", "leak")
    a, b = faulty.mixture[0], healthy.mixture[0]
    assert band_db(a[INSIDE], 4000, 7000) - band_db(b[INSIDE], 4000, 7000) > 4.0
    assert abs(band_db(a[BEFORE], 4000, 7000) - band_db(b[BEFORE], 4000, 7000)) < 0.5


@pytest.mark.parametrize("machine", ["pump", "motor"])
def test_looseness_adds_half_orders_and_high_harmonics(machine):
    faulty, healthy = twins((machine,), machine, "looseness")
    f1 = speed(faulty, machine)
    a, b = faulty.stems[machine][0, INSIDE], healthy.stems[machine][0, INSIDE]

    def orders_db(x, orders):
        return 10 * np.log10(sum(10 ** (band_db(x, (k - 0.1) * f1, (k + 0.1) * f1) / 10) for k in orders))

    half = (0.5, 1.5, 2.5, 3.5, 4.5)
    assert orders_db(a, half) - orders_db(b, half) > 10.0
    # Harmonics up to high orders: most of 2x..20x rise (the speed drifts, so +-0.2 order).
    risen = [band_db(a, (k - 0.2) * f1, (k + 0.2) * f1) - band_db(b, (k - 0.2) * f1, (k + 0.2) * f1) > 3.0
             for k in range(2, 21)]
    assert sum(risen) >= 12


def test_faults_are_checked_against_the_machine_type():
    with pytest.raises(ConfigError, match="a fan cannot have cavitation; cavitation happens to: pump"):
        sim.Machine("fan", "fan", (0, 0, 0), (sim.Fault("cavitation"),))
    with pytest.raises(ConfigError, match="a pump cannot have leak"):
        scene(faults=[("pump", sim.Fault("leak"))])
    with pytest.raises(ConfigError, match="cannot have bearing"):
        sim.machine_signal("valve", 1.0, SR, np.random.default_rng(0), faults=[sim.Fault("bearing")])
    with pytest.raises(ConfigError, match="unknown kind"):
        sim.Fault("wobble")
    with pytest.raises(ConfigError, match="outside the 6 s clip"):
        scene(faults=[("pump", sim.Fault("bearing", 4.0, 8.0))])
    with pytest.raises(ConfigError, match="no machine of that name"):
        scene(faults=[("pmp", sim.Fault("bearing"))])


# --- Microphone array -----------------------------------------------------------------
def test_a_nearer_mic_hears_the_machine_earlier_and_louder():
    mics = ((0.0, 0.0, 1.0), (6.0, 0.0, 1.0))
    fan = sim.Machine("fan", "fan", (1.0, 1.0, 1.0))
    r = sim.render(sim.Scene((fan,), mics, 2.0, snr_db=None, seed=5))
    near, far = r.stems["fan"].astype(np.float64)
    d_near, d_far = math.dist(fan.position, mics[0]), math.dist(fan.position, mics[1])

    n = near.size
    xcorr = np.fft.irfft(np.fft.rfft(far, 2 * n) * np.conj(np.fft.rfft(near, 2 * n)), 2 * n)
    lag = int(np.argmax(xcorr))
    lag = lag - 2 * n if lag > n else lag
    assert lag == pytest.approx((d_far - d_near) / sim.SPEED_OF_SOUND * SR, abs=2)
    level_ratio_db = 10 * np.log10(np.mean(near**2) / np.mean(far**2))
    assert level_ratio_db == pytest.approx(20 * np.log10(d_far / d_near), abs=0.5)  # 1/r
    assert r.labels["machines"][0]["delay_s"] == pytest.approx([d_near / 343, d_far / 343])


def test_reverberation_adds_more_to_the_far_mic_than_to_the_near_one():
    mics = ((0.0, 0.0, 1.0), (8.0, 0.0, 1.0))
    pump = sim.Machine("pump", "pump", (0.5, 0.5, 1.0))
    dry = sim.render(sim.Scene((pump,), mics, 2.0, snr_db=None, seed=6)).stems["pump"]
    wet = sim.render(sim.Scene((pump,), mics, 2.0, snr_db=None, seed=6, reverb_rt60_s=1.0)).stems["pump"]
    power = [np.mean(x.astype(np.float64) ** 2, axis=1) for x in (wet, dry)]
    gain_db = 10 * np.log10(power[0] / power[1])
    assert gain_db[1] > gain_db[0] + 3  # far mic: reverberant field >> direct sound
    assert gain_db[0] < 1.5  # near mic: mostly direct sound


# --- Files ----------------------------------------------------------------------------
def test_write_rendering_writes_mixture_stems_and_labels(tmp_path):
    r = sim.render(scene(faults=[("pump", sim.Fault("bearing", 2.0, 4.0))], seed=1))
    out = sim.write_rendering(r, tmp_path / "scene")
    mixture, sr = sf.read(out / "mixture.wav", dtype="float32", always_2d=True)
    assert sr == SR and mixture.shape == (round(SECONDS * SR), 4)
    np.testing.assert_array_equal(mixture.T, r.mixture)  # 32-bit float WAV: lossless
    stems = {p.stem: sf.read(p, dtype="float32", always_2d=True)[0].T for p in (out / "stems").glob("*.wav")}
    assert set(stems) == {"pump", "fan", "_background"}
    np.testing.assert_allclose(mixture.T, sum(stems.values()), atol=1e-6)
    labels = json.loads((out / "labels.json").read_text())
    assert labels["faults"] == [{"machine": "pump", "fault": "bearing", "start_s": 2.0, "end_s": 4.0}]
    assert labels["sample_rate"] == SR and len(labels["mics"]) == 4 and labels["seed"] == 1
    assert labels["files"]["stems"]["pump"] == "stems/pump.wav"
    assert not list(out.rglob("*.tmp"))


def test_write_training_set_writes_mono_clips_per_machine_type_and_noise(tmp_path):
    data = sim.write_training_set(tmp_path / "data", sources=("pump", "valve"), clips_per_source=3,
                                  seconds=1.0, noise_clips=2, fault_fraction=0.5, seed=2)
    for source, count in (("pump", 3), ("valve", 3), ("_noise", 2)):
        files = sorted((data / source).glob("*.wav"))
        assert len(files) == count
        for path in files:
            info = sf.info(path)
            assert info.channels == 1 and info.samplerate == SR and info.frames == SR
    manifest = json.loads((data / "simulated-seed2.json").read_text())
    assert len(manifest["clips"]) == 8
    faulty = [c for c in manifest["clips"] if c.get("faults")]
    assert all(c["file"].endswith(f"-{c['faults'][0]['fault']}.wav") for c in faulty)
    # Different clips of one type differ (seed, speed, distance).
    a, b = (sf.read(p)[0] for p in sorted((data / "pump").glob("*.wav"))[:2])
    assert not np.allclose(a, b)


def test_a_training_set_of_one_unit_records_that_installations_machines(tmp_path):
    """With ``unit`` every clip of a type is the same machine as in that unit's scenes
    (a user recording their own machines), each clip another recording; without it,
    every clip another machine."""
    def designs(data, seed):
        manifest = json.loads((data / f"simulated-seed{seed}.json").read_text())
        return [json.dumps(c["parameters"], sort_keys=True) for c in manifest["clips"] if c["source"] == "pump"]

    own = sim.write_training_set(tmp_path / "own", sources=("pump", "fan"), clips_per_source=3, seconds=0.5,
                                 noise_clips=1, seed=1, unit=5)
    assert json.loads((own / "simulated-seed1.json").read_text())["unit"] == 5
    scene = sim.render(sim.default_scene(machines=("pump", "fan"), n_mics=1, seconds=0.5, seed=9, unit=5))
    installed = json.dumps(scene.labels["machines"][0]["parameters"], sort_keys=True)
    assert designs(own, 1) == [installed] * 3
    a, b = (sf.read(p)[0] for p in sorted((own / "pump").glob("*.wav"))[:2])
    assert not np.allclose(a, b)  # other recordings of it
    anyone = sim.write_training_set(tmp_path / "any", sources=("pump", "fan"), clips_per_source=3, seconds=0.5,
                                    noise_clips=1, seed=1)
    assert len(set(designs(anyone, 1))) == 3 and installed not in designs(anyone, 1)
    with pytest.raises(ConfigError, match="unit"):
        sim.write_training_set(tmp_path / "bad", unit=-1)


def test_an_array_training_set_is_recorded_where_the_machines_stand_in_the_scenes_room(tmp_path):
    """Each clip at every microphone, in the default scene's (free-field) room, within
    ARRAY_JITTER_M of where that scene puts the machine: what an array separator learns
    the machines' places from."""
    data = sim.write_training_set(tmp_path / "data", sources=("pump", "fan"), clips_per_source=4, seconds=0.5,
                                  noise_clips=2, seed=1, n_mics=3)
    layout = sim.default_scene(machines=("pump", "fan"), n_mics=3)
    manifest = json.loads((data / "simulated-seed1.json").read_text())
    assert all(c["reverb_rt60_s"] is None for c in manifest["clips"])
    for machine in layout.machines:
        stands = float(np.linalg.norm(np.subtract(machine.position, layout.mics[0])))
        clips = [c for c in manifest["clips"] if c["source"] == machine.kind]
        assert len(clips) == 4
        for clip in clips:  # mic 0's distance moves by at most the jitter's diagonal
            assert abs(clip["distance_m"] - stands) <= np.sqrt(3) * sim.ARRAY_JITTER_M + 1e-9
        assert len({round(c["distance_m"], 6) for c in clips}) == 4  # each clip placed again
    assert all(sf.info(p).channels == 3 for p in data.rglob("*.wav"))


# --- Command line ---------------------------------------------------------------------
def test_cli_writes_a_scene_and_prints_where(tmp_path):
    out = tmp_path / "scene"
    result = CliRunner().invoke(cli, ["simulate", "--out", str(out), "--seed", "1", "--seconds", "4",
                                      "--fault", "pump:bearing@2-4", "--mics", "2"])
    assert result.exit_code == 0, result.output
    assert str(out / "mixture.wav") in result.stdout
    assert sf.info(out / "mixture.wav").channels == 2
    labels = json.loads((out / "labels.json").read_text())
    assert labels["faults"] == [{"machine": "pump", "fault": "bearing", "start_s": 2.0, "end_s": 4.0}]


def test_cli_training_set(tmp_path):
    result = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path), "--training-set", "--clips", "1",
                                      "--seconds", "0.5", "--machines", "fan,motor"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "fan") in result.stdout and str(tmp_path / "_noise") in result.stdout
    assert len(list((tmp_path / "motor").glob("*.wav"))) == 1


def test_cli_unit_records_one_installation_in_training_sets_and_scenes(tmp_path):
    run = lambda *args: CliRunner().invoke(cli, ["simulate", "--seconds", "0.5", "--machines", "fan", *args])  # noqa: E731
    assert run("--out", str(tmp_path / "data"), "--training-set", "--clips", "1", "--unit", "3").exit_code == 0
    assert run("--out", str(tmp_path / "room"), "--mics", "1", "--unit", "3", "--seed", "8").exit_code == 0
    trained = json.loads((tmp_path / "data" / "simulated-seed0.json").read_text())["clips"][0]["parameters"]
    labels = json.loads((tmp_path / "room" / "labels.json").read_text())
    assert labels["unit"] == 3 and labels["seed"] == 8
    assert labels["machines"][0]["parameters"] == trained
    refused = run("--out", str(tmp_path / "x"), "--unit", "-2")
    assert refused.exit_code == 2 and "--unit" in refused.output


@pytest.mark.parametrize("args, named", [
    (["--fault", "pump:wobble@2-4"], "wobble"),
    (["--fault", "pmp:bearing@2-4"], "pmp"),
    (["--fault", "pump-bearing"], "pump-bearing"),
    (["--fault", "fan:cavitation"], "cavitation"),
    (["--machines", "pump,robot"], "robot"),
    (["--snr", "loud"], "loud"),
    (["--training-set", "--fault", "pump:bearing"], "--fault"),
    (["--seconds", "100000"], "at most 600"),
    (["--reverb", "50"], "must be in (0, 3]"),
])
def test_cli_bad_options_exit_2_and_say_what_was_wrong(tmp_path, args, named):
    result = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path / "x"), "--seconds", "1", *args])
    assert result.exit_code == ExitCode.USAGE
    assert named in result.output
    assert not (tmp_path / "x" / "mixture.wav").exists()


# --- Intermittent noise and reference microphones -------------------------------------
SHORT = 4.0  # s, clips of the intermittent-noise tests
FLICKER = dict(mean_on_s=1.0, mean_off_s=1.0)  # spells short enough for a few in a short clip


def power(x: np.ndarray) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64) ** 2))


def noisy(intermittent=True, references=1, seconds=SHORT, **options):
    """The default layout with the intermittent source (True: its defaults; a dict:
    IntermittentNoise settings at the default place) and reference microphones."""
    if isinstance(intermittent, dict):
        place = sim.default_scene(intermittent=True).intermittent.position
        intermittent = sim.IntermittentNoise(place, **intermittent)
    return sim.default_scene(intermittent=intermittent, references=references,
                             **{"seconds": seconds, **options})


def test_a_scene_without_intermittent_noise_or_references_renders_as_before():
    """The values are those of the simulator before intermittent noise and references
    existed (same scene, same seed): their streams left everything else as it was."""
    spec = dict(seconds=3.0, seed=7, faults=[("pump", sim.Fault("bearing", 1.0, 2.0))], reverb_rt60_s=0.5)
    r = sim.render(sim.default_scene(**spec))
    explicit = sim.render(sim.default_scene(intermittent=None, references=0, **spec))
    assert r.mixture.tobytes() == explicit.mixture.tobytes()
    assert r.mixture.shape == (4, 48000)
    np.testing.assert_allclose(np.sqrt(np.mean(r.mixture.astype(np.float64) ** 2, axis=1)),
                               [0.028795436933229904, 0.031584854852613885, 0.029633824683747444,
                                0.035004341565701515], rtol=1e-5)
    np.testing.assert_allclose(r.mixture[:, 30000], [-0.05835776776075363, -0.004177199210971594,
                                                     -0.042851511389017105, -0.005373822525143623], rtol=1e-4)
    assert r.intermittent.shape == r.mixture.shape and not np.any(r.intermittent)
    assert r.reference.shape == r.reference_intermittent.shape == (0, 48000)
    assert r.labels["intermittent"] is None and r.labels["references"] == []
    assert r.labels["channels"] == {"mics": [1, 2, 3, 4], "references": []}

    one = sim.render(sim.default_scene(("pump",), n_mics=1, seconds=2.0, seed=1, unit=11, snr_db=-6))
    np.testing.assert_allclose(one.mixture[0, [100, 1000, 20000, 31999]],
                               [-0.03523462265729904, 0.01810816489160061, -0.06401568651199341,
                                -0.043469104915857315], rtol=1e-4)


def test_mixture_is_stems_background_and_intermittent_and_the_snr_ignores_the_intermittent_source():
    r = sim.render(noisy(references=2, reverb_rt60_s=0.5, seed=2, snr_db=3.0))
    n = round(SHORT * SR)
    assert r.mixture.shape == r.background.shape == r.intermittent.shape == (4, n)
    assert r.reference.shape == r.reference_intermittent.shape == (2, n)
    assert all(a.dtype == np.float32 for a in (r.mixture, r.intermittent, r.reference, r.reference_intermittent))
    np.testing.assert_allclose(r.mixture, sum(r.stems.values()) + r.background + r.intermittent, atol=1e-6)
    assert power(r.intermittent) > 0 and r.labels["level_gain_db"] == 0
    machines = sum(r.stems.values())[0]
    assert 10 * np.log10(power(machines) / power(r.background[0])) == pytest.approx(3.0, abs=0.1)
    labels = r.labels
    assert labels["format"] == 2 and labels["channels"] == {"mics": [1, 2, 3, 4], "references": [5, 6]}
    assert len(labels["references"]) == 2
    info = labels["intermittent"]
    assert info["position"] == [6.0, 0.0, 1.0] and info["level_db"] == sim.INTERMITTENT_LEVEL_DB
    assert info["reference_distance_m"] == pytest.approx([sim.REFERENCE_MIC_OFFSET_M] * 2)
    assert 4.0 <= min(info["distance_m"]) <= 6.0
    assert {"on_s", "off_s", "level_drift_db", "tone_drift", "tilt_drift_db", "tone_hz"} <= set(info)
    json.dumps(labels)


def test_the_intermittent_source_is_silent_when_off_and_heard_when_on():
    r = sim.render(noisy(FLICKER, seconds=6.0, seed=0))
    info = r.labels["intermittent"]
    spells = [(True, s) for s in info["on_s"]] + [(False, s) for s in info["off_s"]]
    # They tile the clip.
    edges = sorted(x for _, s in spells for x in s)
    assert edges[0] == 0.0 and edges[-1] == 6.0
    assert sum(b - a for _, (a, b) in spells) == pytest.approx(6.0)
    for heard, delay, distance in ((r.intermittent[0], info["delay_s"][0], info["distance_m"][0]),
                                   (r.reference_intermittent[0], info["reference_delay_s"][0],
                                    info["reference_distance_m"][0])):
        # Free field: at full level the source is rms_at_1m / distance there, +-3 dB drift.
        expected_db = 20 * np.log10(info["rms_at_1m"] / distance)
        on, off = [], []
        for state, (a, b) in spells:
            i0, i1 = round((a + delay + 0.06) * SR), round((b + delay - 0.06) * SR)
            if i1 - i0 >= 0.2 * SR:
                (on if state else off).append(10 * np.log10(power(heard[i0:i1]) + 1e-30))
        assert len(on) >= 2 and len(off) >= 2
        assert all(abs(level - expected_db) < 4.0 for level in on), (on, expected_db)
        assert max(off) < min(on) - 40.0


def test_spells_are_exponential_or_uniform_and_do_not_move_with_reverb_or_clip_length():
    def on_s(**options):
        return sim.render(noisy({"durations": "uniform", **FLICKER}, references=0, machines=(), n_mics=1,
                                snr_db=None, seed=5, **options)).labels["intermittent"]["on_s"]

    long = on_s(seconds=6.0)
    inner = [b - a for a, b in long[1:-1]]
    assert inner and all(0.5 <= d <= 1.5 for d in inner)
    assert on_s(seconds=6.0, reverb_rt60_s=0.5) == long
    short = on_s(seconds=3.0)
    assert short == [[a, min(b, 3.0)] for a, b in long if a < 3.0]


def test_the_reference_mic_hears_the_intermittent_source_far_louder_than_the_machine_mics_do():
    r = sim.render(noisy(FLICKER, snr_db=None, seed=1))
    room = sim.render(sim.default_scene((), seconds=SHORT, references=1, snr_db=None, seed=1))
    machines_at_reference = r.reference[0] - r.reference_intermittent[0] - room.reference[0]
    at_reference = 10 * np.log10(power(r.reference_intermittent[0]) / power(machines_at_reference))
    machines = sum(r.stems.values())
    at_mics = [10 * np.log10(power(r.intermittent[m]) / power(machines[m])) for m in range(4)]
    assert at_reference > max(at_mics) + 15.0, (at_reference, at_mics)


def test_twins_with_and_without_the_intermittent_source_differ_by_exactly_its_image():
    spec = dict(seed=4, reverb_rt60_s=0.6, faults=[("pump", sim.Fault("imbalance", 1.0, 3.0))])
    on, off = sim.render(noisy(**spec)), sim.render(noisy(False, **spec))
    assert on.labels["level_gain_db"] == off.labels["level_gain_db"] == 0
    assert {k: v.tobytes() for k, v in on.stems.items()} == {k: v.tobytes() for k, v in off.stems.items()}
    assert on.background.tobytes() == off.background.tobytes()
    np.testing.assert_allclose(on.mixture - off.mixture, on.intermittent, atol=1e-6)
    np.testing.assert_allclose(on.reference - off.reference, on.reference_intermittent, atol=1e-6)
    assert not np.any(off.intermittent) and off.labels["intermittent"] is None
    assert power(off.reference) > 0  # the machines and the room at the reference mic
    # The reference microphones change nothing at the machine microphones.
    bare = sim.render(noisy(False, references=0, **spec))
    assert bare.mixture.tobytes() == off.mixture.tobytes()


def test_the_intermittent_source_and_references_are_checked():
    place = (6.0, 0.0, 1.0)
    for field, value in [("level_db", 60.0), ("mean_on_s", 0.0), ("mean_off_s", math.inf),
                         ("durations", "poisson"), ("level_drift_db", -1.0), ("tone_hz", 5.0),
                         ("tone_drift", 0.5), ("tilt_drift_db", math.nan)]:
        with pytest.raises(ConfigError, match=f"intermittent noise: {field}"):
            sim.IntermittentNoise(place, **{field: value})
    with pytest.raises(ConfigError, match="intermittent noise: position"):
        sim.IntermittentNoise((1.0, 2.0))
    with pytest.raises(ConfigError, match="reference mic 0: position"):
        sim.Scene((), ((0.0, 0.0, 1.0),), 1.0, snr_db=None, references=((1.0, "x", 2.0),))
    with pytest.raises(ConfigError, match="references"):
        sim.default_scene(references=-1)
    with pytest.raises(ConfigError, match="intermittent noise source is 200 m from mic 0"):
        sim.Scene((), ((0.0, 0.0, 0.0),), 1.0, snr_db=None, intermittent=sim.IntermittentNoise((200.0, 0.0, 0.0)))


def test_write_rendering_puts_the_references_last_in_the_mixture_and_says_which_columns(tmp_path):
    r = sim.render(noisy(references=2, seconds=2.0, seed=3, n_mics=3))
    out = sim.write_rendering(r, tmp_path / "scene")
    mixture, sr = sf.read(out / "mixture.wav", dtype="float32", always_2d=True)
    assert mixture.shape == (2 * SR, 5)
    np.testing.assert_array_equal(mixture.T[:3], r.mixture)
    np.testing.assert_array_equal(mixture.T[3:], r.reference)
    stems = {p.stem: sf.read(p, dtype="float32", always_2d=True)[0].T for p in (out / "stems").glob("*.wav")}
    assert set(stems) == {"pump", "fan", "_background", "_intermittent"}
    np.testing.assert_array_equal(stems["_intermittent"], r.intermittent)
    np.testing.assert_allclose(mixture.T[:3], sum(stems.values()), atol=1e-6)
    labels = json.loads((out / "labels.json").read_text())
    assert labels["channels"] == {"mics": [1, 2, 3], "references": [4, 5]}
    assert labels["files"]["stems"]["_intermittent"] == "stems/_intermittent.wav"
    assert [p.name for p in sim.rendering_files(out, r)][-2:] == ["_intermittent.wav", "labels.json"]


def test_cli_writes_the_intermittent_source_and_a_reference_mic(tmp_path):
    out = tmp_path / "scene"
    result = CliRunner().invoke(cli, ["simulate", "--out", str(out), "--seconds", "2", "--mics", "2",
                                      "--intermittent", "--references", "1"])
    assert result.exit_code == 0, result.output
    assert str(out / "stems" / "_intermittent.wav") in result.stdout
    assert sf.info(out / "mixture.wav").channels == 3
    labels = json.loads((out / "labels.json").read_text())
    assert labels["channels"] == {"mics": [1, 2], "references": [3]}
    assert labels["intermittent"]["reference_distance_m"] == pytest.approx([sim.REFERENCE_MIC_OFFSET_M])
    assert "--intermittent" in CliRunner().invoke(cli, ["simulate", "--help"]).output
    refused = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path / "x"), "--training-set",
                                       "--intermittent"])
    assert refused.exit_code == ExitCode.USAGE and "--intermittent" in refused.output


def test_the_intermittent_sources_tone_wanders_and_its_tilt_drifts_unless_told_not_to():
    def windows(**settings):
        """Per 1 s: its tone's frequency / tone_hz, and its rumble over its hiss, dB."""
        noise = sim.IntermittentNoise((3.0, 0.0, 1.5), mean_on_s=3600.0, level_drift_db=0.0, **settings)
        r = sim.render(sim.Scene((), ((0.0, 0.0, 1.5),), SECONDS, snr_db=None, seed=2, intermittent=noise))
        info = r.labels["intermittent"]
        assert info["on_s"] == [[0.0, SECONDS]]
        f0, x, f = info["tone_hz"], r.intermittent[0].astype(np.float64), np.fft.rfftfreq(SR, 1 / SR)
        tones, tilts = [], []
        for k in range(int(SECONDS)):
            p = np.abs(np.fft.rfft(x[k * SR:(k + 1) * SR] * np.hanning(SR))) ** 2
            near = (f > 0.8 * f0) & (f < 1.2 * f0)
            tones.append(f[near][np.argmax(p[near])] / f0)
            rumble = (f >= 40) & (f < 300) & ~near & ~((f > 1.6 * f0) & (f < 2.4 * f0))
            tilts.append(10 * np.log10(p[rumble].sum() / p[(f >= 1500) & (f < 4000)].sum()))
        return np.array(tones), np.array(tilts)

    tones, tilts = windows()
    assert np.all(np.abs(tones - 1) < 0.15) and np.ptp(tones) > 0.02
    assert np.ptp(tilts) > 3.0
    tones, tilts = windows(tone_drift=0.0, tilt_drift_db=0.0)
    assert np.ptp(tones) < 0.01 and np.ptp(tilts) < 1.5
