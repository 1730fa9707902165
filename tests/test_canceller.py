"""The reference canceller and the stateful stages: the block filter against a plain
per-sample NLMS, state carried across segments, the divergence guard, reference
channels that are recorded but never exported, and the gate's context at segment edges."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf
import yaml

from signalcraft.config import DenoiseConfig, ReferenceConfig, config_from_dict
from signalcraft.dsp.canceller import Canceller
from signalcraft.dsp.gate import Denoiser
from signalcraft.segments import MANIFEST, list_segments

from conftest import invoke

RATE = 8000


def room(seconds: float = 3.0, taps: int = 48, seed: int = 0, mics: int = 2):
    """A reference (white noise) and microphones hearing it through fixed paths of at
    most ``taps`` samples, plus a quiet signal of their own: (reference, mics, own)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE)
    reference = rng.standard_normal(n) * 0.05
    paths = rng.standard_normal((mics, taps)) * np.exp(-np.arange(taps) / 12)
    noise = np.stack([np.convolve(reference, p)[:n] for p in paths])
    own = rng.standard_normal((mics, n)) * 1e-3
    return reference[None].astype(np.float32), (noise + own).astype(np.float32), own, paths


def per_sample_nlms(d: np.ndarray, x: np.ndarray, taps: int, mu: float, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Textbook NLMS, one sample at a time: w += mu e[t] x_t / (x_t . x_t + delta)."""
    w = np.zeros(taps)
    buffer = np.zeros(taps)
    out = np.empty_like(d, dtype=np.float64)
    for t in range(len(d)):
        buffer = np.roll(buffer, 1)
        buffer[0] = x[t]
        e = d[t] - w @ buffer
        w += mu * e * buffer / (buffer @ buffer + delta)
        out[t] = e
    return out, w


def test_the_block_filter_follows_a_plain_per_sample_nlms():
    reference, mics, own, paths = room(seconds=2.0, mics=1)
    config = ReferenceConfig(method="nlms", taps=64, block=16, step_size=0.3, adapt_above_db=None)
    product = Canceller(config, 1, 1)(mics, reference)[0]
    plain, w = per_sample_nlms(mics[0].astype(np.float64), reference[0].astype(np.float64), 64, 0.3,
                               64 * config.regularisation)
    tail = slice(len(plain) // 2, None)  # converged
    residual_db = [10 * np.log10(np.mean((y[tail] - own[0][tail]) ** 2) / np.mean(own[0][tail] ** 2))
                   for y in (product, plain)]
    # The block filter leaves no more than per-sample NLMS (its steps are a little more cautious).
    assert residual_db[0] < residual_db[1] + 1.0, residual_db
    assert max(residual_db) < 0.0  # both down to the microphone's own signal
    before, after = mics[0][tail] - own[0][tail], product[tail] - own[0][tail]
    reduction = 10 * np.log10(np.mean(before ** 2) / np.mean(after ** 2))
    assert reduction > 25, reduction
    c = Canceller(config, 1, 1)
    c(mics, reference)
    learnt = c.weights[0, 0, :48]
    assert np.linalg.norm(learnt - paths[0]) / np.linalg.norm(paths[0]) < 0.05  # the room's path
    assert np.linalg.norm(learnt - w[:48]) / np.linalg.norm(w[:48]) < 0.05  # as per-sample NLMS learns it


@pytest.mark.parametrize("method", ["nlms", "rls"])
def test_state_carried_across_two_segments_equals_the_concatenation(method):
    reference, mics, _, _ = room(seconds=2.0)
    config = ReferenceConfig(method=method, taps=128, block=32)
    whole = Canceller(config, 2, 1)(mics, reference)
    split = Canceller(config, 2, 1)
    cut = 5003  # not a whole number of blocks
    halves = [split(mics[:, :cut], reference[:, :cut]), split(mics[:, cut:], reference[:, cut:])]
    np.testing.assert_allclose(np.concatenate(halves, axis=1), whole, rtol=0, atol=1e-6)
    split.reset()  # forgets: the next segment starts from no filter, like a new one
    np.testing.assert_array_equal(split(mics[:, :cut], reference[:, :cut]), halves[0])


def test_coloured_and_tonal_noise_is_cancelled_and_the_filter_stays_stable():
    from scipy.signal import lfilter

    rng = np.random.default_rng(3)
    n = 4 * RATE
    t = np.arange(n) / RATE
    rumble = lfilter([1.0], [1.0, -0.95], rng.standard_normal(n) * 0.01)
    hum = 0.05 * np.sin(2 * np.pi * 120 * t) + 0.03 * np.sin(2 * np.pi * 610 * t) + 0.0005 * rng.standard_normal(n)
    path = np.zeros(40)
    path[[5, 17, 33]] = [0.8, -0.4, 0.2]
    later = slice(2 * RATE, None)
    for name, source in (("rumble", rumble), ("hum", hum)):
        reference = source[None].astype(np.float32)
        mics = np.convolve(source, path)[:n][None].astype(np.float32)
        for method in ("nlms", "rls"):
            c = Canceller(ReferenceConfig(method=method, taps=64, block=32, adapt_above_db=None), 1, 1)
            out = c(mics, reference)
            left = 10 * np.log10(np.mean(out[0, later] ** 2) / np.mean(mics[0, later] ** 2))
            assert c.resets == 0 and left < -15, (name, method, left)


def test_a_diverging_filter_is_reset_and_logged(caplog):
    reference, mics, _, _ = room(seconds=1.0)
    c = Canceller(ReferenceConfig(taps=64, block=32, adapt_above_db=None), 2, 1)
    c(mics, reference)
    c.filters *= 1e4  # as if it had run away
    with caplog.at_level(logging.WARNING, logger="signalcraft.dsp.canceller"):
        out = c(mics, reference)
    np.testing.assert_array_equal(out, mics)  # that segment passes through uncancelled
    assert c.resets == 1 and not np.any(c.filters)
    assert "reference canceller diverged (mic_" in caplog.text and "dB louder than its input" in caplog.text


def test_the_gate_takes_its_context_from_the_previous_segment():
    rng = np.random.default_rng(1)
    clip = (rng.standard_normal(RATE) * 0.01).astype(np.float32)
    t = np.arange(4 * RATE) / RATE
    audio = (0.01 * rng.standard_normal(t.size) + 0.1 * np.sin(2 * np.pi * 440 * t) * (t % 1 < 0.5))
    audio = audio[None].astype(np.float32)
    config = DenoiseConfig(n_fft=256)
    whole = Denoiser(config, RATE, [clip])(audio)
    gate = Denoiser(config, RATE, [clip])
    half = audio.shape[1] // 2
    gate(audio[:, :half])
    carried = gate(audio[:, half:])
    gate.reset()
    alone = gate(audio[:, half:])
    edge = slice(0, 256)  # the start of the second segment

    def error(y):
        return float(np.sqrt(np.mean((y[0, edge] - whole[0, half:][edge]) ** 2)))

    assert error(carried) < 1e-4 < error(alone), (error(carried), error(alone))


def write_room(path, seconds: float = 20.0) -> np.ndarray:
    """A 3-channel file: two machine microphones, then a reference microphone."""
    reference, mics, _, _ = room(seconds=seconds)
    frames = np.concatenate([mics, reference]).T
    sf.write(path, frames, RATE, subtype="FLOAT")
    return frames


def test_a_reference_channel_is_recorded_but_never_exported(tmp_path):
    settings = {
        "capture": {"channels": [1, 2], "reference_channels": [3], "sample_rate": RATE, "segment_seconds": 10.0},
        "denoise": {"enabled": False},
        "features": {"f_max": RATE / 2},
        "output": {"dir": "out", "keep_raw": True},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(settings))
    recording = tmp_path / "room.wav"
    frames = write_room(recording)
    result = invoke("--config", str(config_path), "process", str(recording))
    assert result.returncode == 0, result.stderr
    segments = list_segments(tmp_path / "out")
    assert len(segments) == 2
    for segment in segments:
        assert sorted(p.name for p in segment.path.glob("mic_*")) == ["mic_0", "mic_1"]
        manifest = json.loads((segment.path / MANIFEST).read_text())
        assert manifest["channels"] == [1, 2] and [lv["channel"] for lv in manifest["levels"]] == [1, 2]
        assert manifest["reference"]["channels"] == [3] and manifest["reference"]["method"] == "nlms"
        assert set(manifest["tensors"]) == {"mic_0", "mic_1"}
        raw, _ = sf.read(segment.path / "audio.flac")
        assert raw.shape[1] == 3  # the reference is kept with the audio
    np.testing.assert_allclose(sf.read(segments[0].path / "audio.flac")[0][:, 2], frames[:10 * RATE, 2], atol=1e-4)

    replayed = invoke("--config", str(config_path), "process", str(segments[0].path / "audio.flac"),
                      "--out", str(tmp_path / "again"))
    assert replayed.returncode == 0, replayed.stderr  # audio.flac reads back with its reference channel
    again = list_segments(tmp_path / "again")
    assert [sorted(p.name for p in s.path.glob("mic_*")) for s in again] == [["mic_0", "mic_1"]]


def test_reference_channels_are_checked_in_the_config(tmp_path):
    from signalcraft.errors import ConfigError

    with pytest.raises(ConfigError, match="capture.reference_channels: channel 2 is also in capture.channels"):
        config_from_dict({"capture": {"channels": [1, 2], "reference_channels": [2]}})
    with pytest.raises(ConfigError, match=r"reference.taps: must be a multiple of reference.block \(128\)"):
        config_from_dict({"reference": {"taps": 1000, "block": 128}})
    path = tmp_path / "room.wav"
    write_room(path, seconds=10.0)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"capture": {"channels": [1, 2, 3], "reference_channels": [4],
                                                  "sample_rate": RATE},
                                      "denoise": {"enabled": False}, "features": {"f_max": RATE / 2}}))
    result = invoke("--config", str(config), "process", str(path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2  # the file does not fit the configuration
    assert "has 3 channels but capture.channels lists 3 ([1, 2, 3]) and capture.reference_channels 1 ([4])" \
        in result.stderr


def test_shadows_go_through_the_same_filters_without_teaching_them():
    reference, mics, own, _ = room(seconds=2.0)
    config = ReferenceConfig(taps=64, block=32)
    alone = Canceller(config, 2, 1)(mics, reference)
    c = Canceller(config, 2, 1)
    noise = mics - own.astype(np.float32)
    quiet = np.zeros_like(reference)
    out, noise_out, own_out = c.with_shadows(mics, reference, [(noise, reference), (own.astype(np.float32), quiet)])
    np.testing.assert_array_equal(out, alone)  # the shadows change nothing of the output
    np.testing.assert_array_equal(own_out, own.astype(np.float32))  # no reference in it: nothing subtracted
    np.testing.assert_allclose(noise_out + own_out, out, atol=1e-6)  # the filter is linear: the parts add up


def test_the_filter_learns_and_subtracts_only_while_the_noise_source_is_on():
    reference, mics, own, paths = room(seconds=4.0)
    quiet = slice(0, 2 * RATE)  # the source is off: the reference hears only the room, quietly
    reference[:, quiet] *= 0.01
    mics = mics.copy()
    mics[:, quiet] = own[:, quiet] + np.roll(own[:, quiet], 3, axis=1)  # the machines, which the reference ...
    reference[:, quiet] += 0.5 * own[:1, quiet]  # ... hears too
    c = Canceller(ReferenceConfig(taps=64, block=32), 2, 1, sample_rate=RATE)
    passed = c(mics[:, quiet], reference[:, quiet])
    assert not np.any(c.filters)  # nothing learnt from the machines while the source was off ...
    np.testing.assert_array_equal(passed, mics[:, quiet])  # ... and nothing subtracted
    c(mics[:, 2 * RATE:], reference[:, 2 * RATE:])  # on: learnt
    assert np.linalg.norm(c.weights[0, 0, :48] - paths[0]) / np.linalg.norm(paths[0]) < 0.2
    always = Canceller(ReferenceConfig(taps=64, block=32, adapt_above_db=None), 2, 1, sample_rate=RATE)
    always(mics[:, quiet], reference[:, quiet])
    assert np.any(always.filters)  # without the rule it would have


def test_two_correlated_references_are_cancelled_without_diverging():
    from scipy.signal import lfilter

    rng = np.random.default_rng(3)
    n = 6 * RATE
    rumble, hiss = lfilter([1.0], [1.0, -0.9], rng.standard_normal(n) * 0.01), rng.standard_normal(n) * 0.01
    # Two references, each hearing both sources: they are strongly correlated.
    reference = np.stack([rumble + 0.3 * hiss, 0.9 * np.roll(rumble, 2) + 0.5 * hiss]).astype(np.float32)
    p1, p2 = np.zeros(40), np.zeros(40)
    p1[[5, 17]], p2[[9, 30]] = [0.8, -0.4], [0.5, 0.3]
    mics = (np.convolve(rumble, p1)[:n] + np.convolve(hiss, p2)[:n])[None].astype(np.float32)
    later = slice(4 * RATE, None)
    left = {}
    for method in ("nlms", "rls"):
        c = Canceller(ReferenceConfig(method=method, taps=64, block=32, adapt_above_db=None), 1, 2)
        out = c(mics, reference)
        assert c.resets == 0
        left[method] = 10 * np.log10(np.mean(out[0, later] ** 2) / np.mean(mics[0, later] ** 2))
    assert left["rls"] < -10 and left["nlms"] < -10, left  # neither is thrown by near-identical references
