from pathlib import Path

import numpy as np
import pytest
import torch

from signalcraft.config import SeparationConfig
from signalcraft.separate import MIX, ModelError, load_separator, model_file, save_model

from conftest import SAMPLE_RATE, tiny_demucs


def config(repo: Path, **changes) -> SeparationConfig:
    return SeparationConfig(repo=repo, model="tiny", **changes)


def test_no_model_gives_one_mix_source():
    separator = load_separator(SeparationConfig(model=None), SAMPLE_RATE)
    audio = np.random.default_rng(0).standard_normal((3, 8000)).astype(np.float32)
    out = separator(audio)
    assert separator.sources == (MIX,) and out.shape == (3, 1, 8000)
    assert np.array_equal(out[:, 0], audio)
    assert separator.info.to_dict()["name"] is None


def test_a_packaged_model_loads_with_its_sources(model_repo):
    separator = load_separator(config(model_repo), SAMPLE_RATE)
    assert separator.sources == ("pump", "fan")
    path = model_file(model_repo, "tiny")
    assert separator.info.file == path.name and len(separator.info.sha256) == 64
    assert path.name.startswith("tiny-") and path.suffix == ".th"
    audio = np.random.default_rng(1).standard_normal((4, 8000)).astype(np.float32) * 0.1
    before = audio.copy()
    out = separator(audio)
    assert out.shape == (4, 2, 8000) and out.dtype == np.float32 and np.all(np.isfinite(out))
    assert np.array_equal(audio, before)


def test_demucs_own_loader_reads_the_same_file(model_repo):
    from demucs.pretrained import get_model

    model = get_model("tiny", repo=model_repo)
    assert list(model.sources) == ["pump", "fan"] and model.samplerate == SAMPLE_RATE
    reference = tiny_demucs()
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value)


def test_saving_again_replaces_the_old_file(model_repo):
    save_model(tiny_demucs(sources=("a", "b", "c")), model_repo, "tiny")
    assert len(list(model_repo.glob("tiny-*.th"))) == 1
    assert load_separator(config(model_repo), SAMPLE_RATE).sources == ("a", "b", "c")


def test_a_missing_model_lists_what_is_there(model_repo, tmp_path):
    with pytest.raises(ModelError, match=r"no model 'pumps' in .*found: tiny"):
        load_separator(SeparationConfig(repo=model_repo, model="pumps"), SAMPLE_RATE)
    with pytest.raises(ModelError, match="does not exist"):
        load_separator(config(tmp_path / "nowhere"), SAMPLE_RATE)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_model_names_the_file(model_repo, damage):
    path = model_file(model_repo, "tiny")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 3]
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError) as e:
        load_separator(config(model_repo), SAMPLE_RATE)
    assert str(path) in str(e.value) and "Retrain it or restore the file" in str(e.value)
    assert "checksum" in str(e.value).lower()


def test_another_sample_rate_is_resampled_or_refused(tmp_path):
    save_model(tiny_demucs(samplerate=8000), tmp_path, "tiny")
    separator = load_separator(config(tmp_path), SAMPLE_RATE)
    out = separator(np.zeros((2, 8000), np.float32) + 0.01)
    assert out.shape == (2, 2, 8000)
    with pytest.raises(ModelError, match="runs at 8000 Hz, the capture at 16000 Hz"):
        load_separator(config(tmp_path, resample=False), SAMPLE_RATE)


def test_an_array_model_takes_all_microphones_at_once(tmp_path):
    save_model(tiny_demucs(audio_channels=3), tmp_path, "tiny")
    separator = load_separator(config(tmp_path), SAMPLE_RATE)
    assert separator.info.audio_channels == 3 and separator.info.to_dict()["audio_channels"] == 3
    audio = (0.05 * np.random.default_rng(0).standard_normal((3, 8000))).astype(np.float32)
    out = separator(audio)
    assert out.shape == (3, 2, 8000) and np.isfinite(out).all()
    # One example of three channels, not three examples: each output depends on every microphone.
    changed = audio.copy()
    changed[2] *= 0.1
    assert not np.allclose(separator(changed)[0], out[0])
    with pytest.raises(ValueError, match="takes 3 channels, got 2"):
        separator(audio[:2])


def test_device_settings_resolve_in_one_place():
    from signalcraft.compute import torch_device
    from signalcraft.errors import ConfigError

    assert torch_device("cpu", "separation.device").type == "cpu"
    assert torch_device("auto", "separation.device").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="separation.device: unknown device 'gpu'"):
        torch_device("gpu", "separation.device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train_separator.device: cuda requested but torch sees no CUDA"):
            torch_device("cuda", "train_separator.device")


def test_a_model_saved_in_half_precision_is_half_the_file_and_separates_alike(tmp_path):
    model = tiny_demucs()
    full, half = save_model(model, tmp_path / "full", "m"), save_model(model, tmp_path / "half", "m", half=True)
    weights = {path: torch.load(path, weights_only=False)["state"] for path in (full, half)}
    assert {v.dtype for v in weights[half].values() if v.is_floating_point()} == {torch.float16}
    nbytes = {path: sum(v.nbytes for v in state.values()) for path, state in weights.items()}
    assert nbytes[half] == nbytes[full] / 2  # the weights; a tiny model's file is mostly pickle framing
    assert half.stat().st_size < full.stat().st_size
    audio = np.random.default_rng(0).standard_normal((2, SAMPLE_RATE)).astype(np.float32) * 0.1
    a = load_separator(SeparationConfig(repo=tmp_path / "full", model="m"), SAMPLE_RATE)(audio)
    b = load_separator(SeparationConfig(repo=tmp_path / "half", model="m"), SAMPLE_RATE)(audio)
    assert b.dtype == np.float32
    np.testing.assert_allclose(b, a, atol=1e-3 * np.abs(a).max())


@pytest.mark.parametrize("segment,per_pass,passes", [
    ("whole", 16.0, [(3, 20000)]), ("whole", 2.0, [(1, 20000)] * 3),
    ("whole", 1.0, [(1, 16000), (1, 8000)] * 3),  # longer than a pass: chunks of a pass
    (None, 16.0, [(3, 16000), (3, 8000)])])
def test_whole_segments_go_through_the_network_in_one_pass_each(tmp_path, monkeypatch, segment, per_pass, passes):
    """``separation.segment: whole``: each microphone's segment is one example of its
    whole length (nothing chunked or cross-faded), at most SECONDS_PER_PASS of audio per
    pass (a longer segment in chunks of that length); null: chunks of the model's
    training length (1 s, overlapping by a quarter), every microphone's chunk in one batch."""
    monkeypatch.setattr("signalcraft.separate.SECONDS_PER_PASS", per_pass)
    save_model(tiny_demucs(), tmp_path, "tiny")
    separator = load_separator(config(tmp_path, segment=segment), SAMPLE_RATE)
    seen = []
    separator._model.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    audio = (0.05 * np.random.default_rng(0).standard_normal((3, 20000))).astype(np.float32)
    out = separator(audio)
    assert out.shape == (3, 2, 20000) and np.isfinite(out).all()
    # (examples, samples) per pass
    assert seen == [(examples, 1, separator._model.valid_length(n)) for examples, n in passes]
