"""The multichannel Wiener filter on an array separator's output (dsp.spatial), and the
spatial covariances an array model carries in its file."""

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import torch

from signalcraft import simulate
from signalcraft.config import SeparationConfig
from signalcraft.dsp.spatial import N_FFT, covariance, wiener
from signalcraft.noise import NoiseClip, together
from signalcraft.separate import ModelError, load_separator, read_package, save_model
from signalcraft.training.separator import si_sdr

from conftest import SAMPLE_RATE, tiny_demucs

MICS = 4


def room(seed: int, seconds: float = 4.0) -> dict[str, np.ndarray]:
    """A pump and a fan where the simulator's default room puts them, each alone at 4
    microphones (an installation: the same paths at every seed): name -> (mics, samples)."""
    scene = simulate.default_scene(machines=("pump", "fan"), n_mics=MICS, seconds=seconds, seed=seed)
    return {name: stem.astype(np.float32) for name, stem in simulate.render(scene).stems.items()}


def gain_db(estimates: np.ndarray, images: np.ndarray, mix: np.ndarray) -> float:
    """Mean SI-SDR improvement over sources and microphones, dB."""
    est, ref = torch.from_numpy(estimates).double(), torch.from_numpy(images).double()
    base = si_sdr(torch.from_numpy(mix).double().expand_as(ref), ref)
    return float((si_sdr(est, ref) - base).mean())


def test_the_filter_places_each_sound_at_the_machine_it_came_from():
    """Learnt on other recordings of the same room, the filter separates two machines at
    equal level from estimates that do not separate them at all."""
    learnt = [room(seed) for seed in (1, 2)]
    R = torch.stack([covariance([r[name] for r in learnt], MICS) for name in ("pump", "fan")])
    test = room(7)
    images = np.stack([test["pump"], test["fan"]])
    images /= np.sqrt((images ** 2).mean(axis=(1, 2), keepdims=True))  # equal level
    mix = images.sum(0)
    unseparated = np.stack([mix / 2, mix / 2])
    assert abs(gain_db(unseparated, images, mix)) < 1e-6
    out = wiener(torch.from_numpy(mix), torch.from_numpy(unseparated), R).numpy()
    assert out.shape == images.shape and out.dtype == np.float32
    assert gain_db(out, images, mix) > 20

    # With the room at the machines' level, its covariance from a clip of it helps.
    rng = np.random.default_rng(3)
    noisy = (mix + rng.standard_normal(mix.shape)).astype(np.float32)
    clip = covariance([rng.standard_normal(mix.shape).astype(np.float32)], MICS)
    network = torch.from_numpy(np.ascontiguousarray(images + 0.5 * images[::-1]))  # some of each in the other
    base = gain_db(network.numpy(), images, noisy)
    with_clip = gain_db(wiener(torch.from_numpy(noisy), network, R, clip, 2).numpy(), images, noisy)
    without = gain_db(wiener(torch.from_numpy(noisy), network, R, None, 2).numpy(), images, noisy)
    assert with_clip > without > base


def test_where_the_network_hears_nothing_of_a_machine_its_direction_decides(monkeypatch):
    """A sound the network gives wholly to one machine (as a fault it never heard) goes
    back to the machine it came from: the power floor lets the direction decide."""
    import signalcraft.dsp.spatial as spatial

    learnt = [room(seed) for seed in (1, 2)]
    R = torch.stack([covariance([r[name] for r in learnt], MICS) for name in ("pump", "fan")])
    test = room(7)
    images = np.stack([test["pump"], test["fan"]])
    images /= np.sqrt((images ** 2).mean(axis=(1, 2), keepdims=True))
    mix = images.sum(0)
    deaf = torch.from_numpy(np.stack([mix, np.zeros_like(mix)]))  # all of it the pump's, none the fan's
    out = wiener(torch.from_numpy(mix), deaf, R, iterations=2).numpy()
    assert gain_db(out[1:], images[1:], mix) > 20 and gain_db(out[:1], images[:1], mix) > 20
    monkeypatch.setattr(spatial, "POWER_FLOOR", 0.0)
    out = wiener(torch.from_numpy(mix), deaf, R, iterations=2).numpy()
    assert gain_db(out[1:], images[1:], mix) < 1  # without it the fan stays silent


def learnt_room():
    """The pump's and the fan's covariances learnt on two recordings, their images in a
    third at unit power each, a random generator and a clip of the room with the
    machines off: (R, images, rng, clip)."""
    learnt = [room(seed) for seed in (1, 2)]
    R = torch.stack([covariance([r[name] for r in learnt], MICS) for name in ("pump", "fan")])
    test = room(7)
    images = np.stack([test["pump"], test["fan"]])
    images /= np.sqrt((images ** 2).mean(axis=(1, 2), keepdims=True))
    rng = np.random.default_rng(4)
    clip = (0.03 * rng.standard_normal(images.shape[1:])).astype(np.float32)
    return R, images, rng, clip


def test_what_the_network_leaves_out_goes_to_its_machine_when_the_room_is_capped():
    """A sound the network does not reproduce at all (a fault's new tone it never heard)
    is in the rest of the mixture. With the room's power capped at its level on a clip
    of the room, the filter gives it to the machine it comes from; with the room's power
    taken from that rest, the room keeps it."""
    from signalcraft.dsp.spatial import power

    R, images, rng, clip = learnt_room()
    mix = (images.sum(0) + 0.03 * rng.standard_normal(clip.shape)).astype(np.float32)
    missed = torch.from_numpy(np.stack([np.zeros_like(mix), images[1]]))  # the pump left out, the fan right
    room_R = covariance([clip], MICS)
    measured = wiener(torch.from_numpy(mix), missed, R, room_R, 2, power(clip)).numpy()
    rest = wiener(torch.from_numpy(mix), missed, R, room_R, 2).numpy()
    # (Bins where the pump's own rhythm lifts the rest far above its median count as
    # transients and stay the room's: 13 dB here, against 3 uncapped.)
    assert gain_db(measured[:1], images[:1], mix) > 12 > gain_db(rest[:1], images[:1], mix) + 5
    assert gain_db(measured[1:], images[1:], mix) > 15
    assert power(clip).shape == (N_FFT // 2 + 1,) and power(clip).dtype == torch.float32


def test_with_the_room_capped_a_transient_of_the_room_stays_the_rooms(monkeypatch):
    """A knock in the room is far above the room's level in the noise clip, but short:
    the cap leaves most of it to the room, and a steady sound the network left out still
    goes to its machine. Capped in every bin, the knock would go to the machines."""
    from signalcraft.dsp import spatial
    from signalcraft.dsp.spatial import power

    R, images, rng, clip = learnt_room()
    knock = np.zeros_like(clip)
    at = slice(SAMPLE_RATE, SAMPLE_RATE + SAMPLE_RATE // 10)  # 100 ms, 30 dB over the room
    knock[:, at] = rng.standard_normal((MICS, SAMPLE_RATE // 10))
    quiet = (images.sum(0) + 0.03 * rng.standard_normal(clip.shape)).astype(np.float32)
    mix = quiet + knock
    missed = torch.from_numpy(np.stack([np.zeros_like(mix), images[1]]))
    rest = (missed, R, covariance([clip], MICS), 2, power(clip))

    def taken() -> tuple[np.ndarray, float]:  # the output, and the share of the knock's power the machines took
        out, without = wiener(torch.from_numpy(mix), *rest).numpy(), wiener(torch.from_numpy(quiet), *rest).numpy()
        return out, float(((out - without).sum(0)[:, at] ** 2).mean() / (knock[:, at] ** 2).mean())

    capped, share = taken()
    monkeypatch.setattr(spatial, "TRANSIENT", float("inf"))
    _, everywhere = taken()
    # 0.32 against 0.80: what is left is mostly where the missed pump, whole in the rest,
    # is louder than the knock (uncapped, the machines take 0.04).
    assert everywhere > 0.6 and share < everywhere / 2
    steady = np.r_[0:at.start - N_FFT, at.stop + N_FFT:mix.shape[-1]]  # away from the knock
    assert gain_db(capped[:1][..., steady], images[:1][..., steady], mix[..., steady]) > 12


def test_covariances_are_hermitian_with_unit_trace_and_need_usable_recordings():
    R = covariance([room(1, 1.0)["pump"]], MICS)
    assert R.shape == (N_FFT // 2 + 1, MICS, MICS) and R.dtype == torch.complex64
    assert torch.allclose(R, R.conj().transpose(-1, -2))
    assert torch.allclose(torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1), torch.ones(R.shape[0]), atol=1e-5)
    with pytest.raises(ValueError, match="no recording of 4 channels"):
        covariance([np.zeros((3, 16000), np.float32), np.zeros((4, N_FFT - 1), np.float32)], MICS)


def spatial_model(repo: Path) -> torch.Tensor:
    """An array model for 4 microphones saved with the covariances of the pump and the fan."""
    learnt = room(1)
    R = torch.stack([covariance([learnt[name]], MICS) for name in ("pump", "fan")])
    save_model(tiny_demucs(audio_channels=MICS), repo, "tiny", spatial=R)
    return R


def test_an_array_model_carries_its_covariances_and_filters_its_output(tmp_path):
    from demucs.pretrained import get_model

    R = spatial_model(tmp_path)
    assert get_model("tiny", repo=tmp_path).audio_channels == MICS  # demucs' own loader still reads it
    filtered = load_separator(SeparationConfig(repo=tmp_path, model="tiny"), SAMPLE_RATE)
    alone = load_separator(SeparationConfig(repo=tmp_path, model="tiny", spatial_iterations=0), SAMPLE_RATE)
    assert filtered.spatial and filtered.info.spatial_iterations == 2
    assert not alone.spatial and alone.info.spatial_iterations == 0
    assert torch.equal(read_package(next(tmp_path.glob("tiny-*.th")))[1], R)
    test = room(5, 2.0)
    mix = test["pump"] + test["fan"]
    out, plain = filtered(mix), alone(mix)
    assert out.shape == plain.shape == (MICS, 2, mix.shape[-1]) and np.isfinite(out).all()
    assert not np.allclose(out, plain)
    filtered.set_room(0.01 * np.random.default_rng(0).standard_normal((MICS, SAMPLE_RATE)).astype(np.float32))
    assert not np.allclose(filtered(mix), out)  # the room's covariance from its clip, not the segment's rest


def test_a_mono_model_has_no_spatial_filter(model_repo):
    separator = load_separator(SeparationConfig(repo=model_repo, model="tiny"), SAMPLE_RATE)
    assert not separator.spatial and separator.info.spatial_iterations == 0


@pytest.mark.parametrize("damage, message", [
    ("shape", "have shape (2, 1025, 3, 3, 2)"),
    ("nan", "hold values that are not finite"),
    ("asymmetric", "are not positive semi-definite Hermitian"),
    ("indefinite", "are not positive semi-definite Hermitian"),
    ("format", "are not of format 1"),
])
def test_damaged_covariances_are_refused_naming_the_file(tmp_path, damage, message):
    from demucs.states import get_state

    model = tiny_demucs(audio_channels=MICS)
    R = torch.view_as_real(torch.eye(MICS, dtype=torch.complex64).expand(2, N_FFT // 2 + 1, MICS, MICS) / MICS)
    entry = {"format": 1, "n_fft": N_FFT, "covariance": R.contiguous().clone()}
    if damage == "shape":
        entry["covariance"] = entry["covariance"][:, :, :3, :3].contiguous()
    elif damage == "nan":
        entry["covariance"][0, 5, 0, 0, 0] = float("nan")
    elif damage == "asymmetric":
        entry["covariance"][0, 5, 0, 1, 0] = 0.5
    elif damage == "indefinite":  # Hermitian, trace 1, a negative eigenvalue
        entry["covariance"][0, 5, :, :, 0] = torch.diag(torch.tensor([1.0, 1.0, -0.5, -0.5]))
    else:
        entry["format"] = 99
    args, kwargs = model._init_args_kwargs
    path = tmp_path / "tiny.th"
    torch.save({"klass": type(model), "args": args, "kwargs": kwargs, "state": get_state(model, None),
                "spatial": entry}, path)
    with pytest.raises(ModelError) as e:
        load_separator(SeparationConfig(repo=tmp_path, model="tiny"), SAMPLE_RATE)
    assert str(path) in str(e.value) and message in str(e.value) and "Retrain it" in str(e.value)


def test_noise_clips_recorded_together_give_the_room_on_all_microphones():
    at = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
    audio = np.random.default_rng(0).standard_normal((2, 1000)).astype(np.float32)
    clips = [NoiseClip(audio[k], SAMPLE_RATE, k + 1, "dev", at) for k in range(2)]
    np.testing.assert_array_equal(together(clips), audio)
    later = NoiseClip(audio[1], SAMPLE_RATE, 2, "dev", at + dt.timedelta(minutes=5))
    assert together([clips[0], later]) is None  # recorded apart: the paths between them are not one recording
    assert together([clips[0], NoiseClip(audio[1, :900], SAMPLE_RATE, 2, "dev", at)]) is None
    assert together([]) is None


@pytest.mark.parametrize("apart", [False, True])
def test_the_chain_gives_the_filter_the_room_from_noise_clips_recorded_together(tmp_path, caplog, apart):
    from signalcraft.chain import Chain
    from signalcraft.config import config_from_dict
    from signalcraft.noise import save_clips

    spatial_model(tmp_path / "models")
    at = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.timezone.utc)
    noise = (0.01 * np.random.default_rng(0).standard_normal((MICS, 2 * SAMPLE_RATE))).astype(np.float32)
    save_clips([NoiseClip(noise[k], SAMPLE_RATE, k + 1, "dev", at + dt.timedelta(minutes=k * apart))
                for k in range(MICS)], tmp_path / "noise")
    config = config_from_dict({"capture": {"channels": list(range(1, MICS + 1)), "segment_seconds": 2.0},
                               "noise": {"dir": str(tmp_path / "noise")},
                               "separation": {"repo": str(tmp_path / "models"), "model": "tiny"}})
    with caplog.at_level("INFO", logger="signalcraft.chain"):
        chain = Chain(config, tuple(range(1, MICS + 1)), SAMPLE_RATE)
    assert chain.separator.spatial
    assert ("the noise clips were not recorded together" in caplog.text) == apart
    test = room(5, 2.0)
    out = chain.separator(test["pump"] + test["fan"])
    chain.separator.set_room(noise)
    assert np.array_equal(chain.separator(test["pump"] + test["fan"]), out) != apart


def test_room_headroom_caps_the_room_only_when_set(tmp_path):
    spatial_model(tmp_path)
    noise = (0.003 * np.random.default_rng(0).standard_normal((MICS, SAMPLE_RATE))).astype(np.float32)
    test = room(5, 2.0)
    mix = test["pump"] + test["fan"]
    out = {}
    for headroom in (None, 1.0):
        separator = load_separator(SeparationConfig(repo=tmp_path, model="tiny", room_headroom=headroom),
                                   SAMPLE_RATE)
        before = separator(mix)
        separator.set_room(noise)
        out[headroom] = separator(mix)
        assert not np.array_equal(out[headroom], before)  # the room's covariance from the clip, either way
    # The untrained network leaves most of the machines to the rest: capped, the room
    # cannot take it, and the machines' outputs hold more of the mixture.
    held = {h: float((o.sum(1) ** 2).mean()) for h, o in out.items()}
    assert held[1.0] > 5 * held[None]


def test_audio_shorter_than_a_frame_passes_the_network_output_unfiltered(tmp_path):
    spatial_model(tmp_path)
    filtered = load_separator(SeparationConfig(repo=tmp_path, model="tiny"), SAMPLE_RATE)
    alone = load_separator(SeparationConfig(repo=tmp_path, model="tiny", spatial_iterations=0), SAMPLE_RATE)
    short = room(5, 0.1)
    mix = short["pump"] + short["fan"]
    assert mix.shape[-1] < N_FFT
    np.testing.assert_array_equal(filtered(mix), alone(mix))


def test_on_onnx_runtime_the_array_model_is_filtered_as_on_torch(tmp_path):
    """The spatial filter follows the network on either runtime."""
    from signalcraft.edge.export import export_separator
    from signalcraft.separate import model_file

    learnt = room(1)
    R = torch.stack([covariance([learnt[name]], MICS) for name in ("pump", "fan")])
    save_model(tiny_demucs(audio_channels=MICS, resample=False), tmp_path, "tiny", spatial=R)
    test = room(5, 2.0)
    mix = test["pump"] + test["fan"]
    export_separator(model_file(tmp_path, "tiny"), mix[None], int8=False)
    config = SeparationConfig(repo=tmp_path, model="tiny", device="cpu")
    on_torch = load_separator(config, SAMPLE_RATE)
    on_onnx = load_separator(config, SAMPLE_RATE, runtime="onnxruntime")
    alone = load_separator(SeparationConfig(repo=tmp_path, model="tiny", device="cpu", spatial_iterations=0),
                           SAMPLE_RATE, runtime="onnxruntime")
    assert on_onnx.runtime == "onnxruntime" and on_onnx.spatial and not alone.spatial
    expected = on_torch(mix)
    np.testing.assert_allclose(on_onnx(mix), expected, atol=1e-3 * float(np.abs(expected).max()))
    assert not np.allclose(alone(mix), expected)
