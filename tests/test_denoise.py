import numpy as np
import pytest
from scipy.signal import lfilter

from signalcraft.config import DenoiseConfig
from signalcraft.dsp.gate import Denoiser
from signalcraft.errors import NoiseClipError

SR = 16000  # Hz
TONE_HZ = 1000.0


def room_noise(seconds: float, rng: np.random.Generator, level: float = 1.0) -> np.ndarray:
    """Pink-ish factory noise with a white floor, float32, shape = (samples,)."""
    white = rng.standard_normal(round(seconds * SR))
    b, a = [0.049922035, -0.095993537, 0.050612699, -0.004408786], [1, -2.494956002, 2.017265875, -0.522189400]
    return (level * (0.5 * lfilter(b, a, white) + 0.02 * white)).astype(np.float32)


def tone_energy(signal: np.ndarray) -> float:
    """Energy of the TONE_HZ component (least-squares fit of sine and cosine)."""
    t = np.arange(signal.size) / SR
    basis = np.stack([np.sin(2 * np.pi * TONE_HZ * t), np.cos(2 * np.pi * TONE_HZ * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, signal, rcond=None)
    return float(np.sum((basis @ coef) ** 2))


def test_a_machine_tone_survives_while_the_room_noise_drops_10_db():
    rng = np.random.default_rng(0)
    t = np.arange(10 * SR) / SR
    tone = (0.05 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)  # absent from the clip
    noise = room_noise(10, rng)  # louder than the tone: -4 dB SNR
    clip = room_noise(10, rng)  # another stretch of the same room
    denoiser = Denoiser(DenoiseConfig(), SR, [clip])

    mixed = (tone + noise)[None]
    before = mixed.copy()
    out = denoiser(mixed)[0]
    assert np.array_equal(mixed, before)  # input untouched
    assert out.shape == tone.shape and out.dtype == np.float32
    kept = tone_energy(out) / tone_energy(tone)
    assert kept >= 0.90, f"tone kept {kept:.1%} of its energy"

    noise_out = denoiser(noise[None])[0]
    drop_db = 10 * np.log10(np.mean(noise ** 2) / np.mean(noise_out ** 2))
    assert drop_db >= 10.0, f"noise dropped only {drop_db:.1f} dB"


def test_a_machine_as_loud_as_the_room_passes_the_averaged_decision():
    """A machine's broadband sound 3 dB over the room in every band: deciding per STFT
    frame (noisereduce's rule, at its 1.5 standard deviations) drops most of it;
    deciding on the power averaged over denoise.decision_ms keeps most of it, and the
    room alone is still gated by 10 dB or more either way. Exact split through the
    gate's own gain (with_shadows)."""
    rng = np.random.default_rng(3)
    room, clip = room_noise(10, rng), room_noise(10, rng)
    machine = room_noise(10, rng, 1.4)  # another draw of the room's spectrum, +3 dB

    def run(config):
        gate = Denoiser(config, SR, [clip])
        out, machine_out, room_out = gate.with_shadows((machine + room)[None], [machine[None], room[None]])
        np.testing.assert_allclose(out, machine_out + room_out, atol=1e-6)  # the parts add up to the output
        gate.reset()
        alone = gate(room[None])
        return (float(np.sum(machine_out ** 2) / np.sum(machine ** 2)),
                10 * np.log10(np.sum(room ** 2) / np.sum(alone ** 2)))

    averaged, per_frame = run(DenoiseConfig()), run(DenoiseConfig(decision_ms=None, n_std_thresh=1.5))
    assert averaged[0] >= 0.8 and per_frame[0] <= 0.5, (averaged, per_frame)
    assert averaged[1] >= 10.0 and per_frame[1] >= 10.0, (averaged, per_frame)


def test_knocks_pass_the_averaged_decision_about_as_they_pass_a_per_frame_one():
    """5 ms knocks every 2 s, 14 dB over the room: averaging over 400 ms keeps nearly as
    much of them as deciding on each frame does (an average over seconds would not)."""
    rng = np.random.default_rng(5)
    room, clip = room_noise(10, rng), room_noise(10, rng)
    knocks = np.zeros(room.size, np.float32)
    for start in range(SR // 4, room.size - 80, 2 * SR):
        knocks[start:start + 80] = 0.3 * rng.standard_normal(80)

    def kept(config):
        _, out, _ = Denoiser(config, SR, [clip]).with_shadows((knocks + room)[None], [knocks[None], room[None]])
        return float(np.sum(out ** 2) / np.sum(knocks ** 2))

    averaged, per_frame = kept(DenoiseConfig()), kept(DenoiseConfig(decision_ms=None, n_std_thresh=1.5))
    assert averaged >= 0.8 * per_frame and per_frame > 0.3, (averaged, per_frame)


def test_shadows_split_the_output_across_segments():
    """Parts of the audio through the gain decided on the whole, two gapless segments
    with the context carried: they add up to the output, the audio as its own shadow is
    the output, and a shadow of another shape is refused."""
    rng = np.random.default_rng(4)
    clips = [room_noise(4, rng), room_noise(4, rng, 2.0)]
    t = np.arange(8 * SR) / SR
    tone = np.stack([0.05 * np.sin(2 * np.pi * TONE_HZ * t)] * 2).astype(np.float32)
    noise = np.stack([room_noise(8, rng), room_noise(8, rng, 2.0)])
    gate, plain = Denoiser(DenoiseConfig(), SR, clips), Denoiser(DenoiseConfig(), SR, clips)
    half = t.size // 2
    for s in (slice(0, half), slice(half, None)):
        audio = tone[:, s] + noise[:, s]
        out, itself, tone_out, noise_out = gate.with_shadows(audio, [audio, tone[:, s], noise[:, s]])
        np.testing.assert_array_equal(out, plain(audio))
        np.testing.assert_allclose(itself, out, atol=1e-6)
        np.testing.assert_allclose(tone_out + noise_out, out, atol=1e-6)
    with pytest.raises(ValueError, match="shadow of shape"):
        gate.with_shadows(audio, [audio[:, :100]])


def test_smoothing_across_frequency_would_erase_the_tone():
    """Why freq_mask_smooth_hz defaults to null: noisereduce's own default of 500 Hz."""
    rng = np.random.default_rng(1)
    t = np.arange(5 * SR) / SR
    tone = (0.05 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    mixed = (tone + room_noise(5, rng))[None]
    smoothed = Denoiser(DenoiseConfig(freq_mask_smooth_hz=500), SR, [room_noise(5, rng)])(mixed)[0]
    assert tone_energy(smoothed) / tone_energy(tone) < 0.5


def test_each_channel_is_gated_with_its_own_clip():
    """A tone between two rooms' noise levels survives with its own (quiet) room's clip
    and is gated away with the loud room's clip: clips are not shared or averaged."""
    rng = np.random.default_rng(2)
    t = np.arange(4 * SR) / SR
    tone = (0.02 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32)
    quiet, loud = room_noise(4, rng, 0.05), room_noise(4, rng, 10.0)  # rooms 46 dB apart
    audio = np.stack([tone + room_noise(4, rng, 0.05), tone + room_noise(4, rng, 0.05)])
    out = Denoiser(DenoiseConfig(), SR, [quiet, loud])(audio)
    assert out.shape == audio.shape and out.dtype == np.float32
    assert tone_energy(out[0]) / tone_energy(tone) > 0.8  # channel 0: its own quiet room
    assert tone_energy(out[1]) / tone_energy(tone) < 0.1  # channel 1: gated as the loud room
    swapped = Denoiser(DenoiseConfig(), SR, [loud, quiet])(audio)
    assert tone_energy(swapped[0]) / tone_energy(tone) < 0.1
    assert tone_energy(swapped[1]) / tone_energy(tone) > 0.8


def test_non_stationary_mode_needs_no_clip():
    rng = np.random.default_rng(3)
    audio = room_noise(2.01, rng)[None]  # not a whole number of hops
    out = Denoiser(DenoiseConfig(stationary=False), SR, None)(audio)
    assert out.shape == audio.shape and np.all(np.isfinite(out))


def test_a_too_short_clip_is_a_clear_error():
    with pytest.raises(NoiseClipError, match="needs at least 4096"):
        Denoiser(DenoiseConfig(), SR, [np.zeros(1000, np.float32)])


def test_non_stationary_gating_of_silence_is_silence():
    """Digital silence (a dead or muted channel) makes the adaptive gate's statistics 0/0:
    the output must be silence, never NaN that would poison every tensor downstream."""
    audio = np.zeros((2, 16000 * 4), dtype=np.float32)
    audio[1, 32000:] = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.01
    out = Denoiser(DenoiseConfig(stationary=False), 16000, None)(audio)
    assert np.all(np.isfinite(out)) and not np.any(out[0]) and not np.any(out[1, :16000])
