import dataclasses
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from signalcraft.config import config_from_dict
from signalcraft.errors import ConfigError, ExitCode
from signalcraft.dsp.spatial import N_FFT
from signalcraft.separate import load_separator, model_file, read_package
from signalcraft.training.separator import (
    NotBetterError, TrainingDataError, checkpoint_path, load_training_data, si_sdr, snr_loss, train_separator,
)

SR = 16000


def write_data(root, sources=("hum", "whine"), seconds=4.0, rate=SR, files=2):
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * rate)) / rate
    for k, name in enumerate(sources):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(files):
            tone = 0.1 * np.sin(2 * np.pi * (100 + 400 * k + 7 * j) * t) + 0.005 * rng.standard_normal(t.size)
            sf.write(root / name / f"{j}.wav", tone.astype(np.float32), rate)
    (root / "_noise").mkdir(exist_ok=True)
    sf.write(root / "_noise" / "room.wav", (0.02 * rng.standard_normal(t.size)).astype(np.float32), rate)
    return root


def tiny_config(tmp_path, **training):
    settings = {"name": "tiny", "channels": 4, "depth": 2, "segment_seconds": 0.5, "batch_size": 2,
                "epochs": 1, "steps_per_epoch": 2, "validation_mixtures": 2, **training}
    return config_from_dict({"separation": {"repo": str(tmp_path / "models")}, "train_separator": settings})


def test_trains_exports_and_the_chain_loads_it(tmp_path):
    data = write_data(tmp_path / "data")
    config = tiny_config(tmp_path)
    # Two steps do not separate: the model is worse than the mixtures themselves.
    with pytest.raises(NotBetterError, match=r"no better than not separating: validation SI-SDR .* dB, -?[0-9.]+ dB "
                                             r"against the unseparated mixtures.*Not exported.*--force"):
        train_separator(data, config, progress=False)
    assert not list((tmp_path / "models").glob("tiny-*.th"))
    # Exported on request, from the checkpoint that the refused run kept.
    result = train_separator(data, config, resume=True, progress=False, force=True)
    assert result.best_si_sdri <= 0
    assert result.sources == ("hum", "whine") and result.steps == 2 and result.epochs == 1
    assert result.model_path == model_file(tmp_path / "models", "tiny")
    assert np.isfinite(result.best_si_sdr)

    separator = load_separator(dataclasses.replace(config.separation, model="tiny"), SR)
    assert separator.sources == ("hum", "whine")
    assert read_package(result.model_path)[1] is None and not separator.spatial  # a mono model places nothing
    assert separator(np.zeros((2, 8000), np.float32) + 0.01).shape == (2, 2, 8000)

    from demucs.pretrained import get_model

    assert list(get_model("tiny", repo=tmp_path / "models").sources) == ["hum", "whine"]


def test_resuming_continues_from_the_step_it_stopped_at(tmp_path, caplog):
    data = write_data(tmp_path / "data")
    straight = tiny_config(tmp_path / "a", epochs=2)
    train_separator(data, straight, progress=False, force=True)
    reference = torch.load(checkpoint_path(straight), weights_only=True)

    first = tiny_config(tmp_path / "b", epochs=1)
    assert train_separator(data, first, progress=False, force=True).steps == 2
    caplog.set_level(logging.INFO)
    second = tiny_config(tmp_path / "b", epochs=2)
    result = train_separator(data, second, resume=True, progress=False, force=True)
    assert "from epoch 1, step 2" in caplog.text
    assert result.steps == 4 and result.epochs == 2
    resumed = torch.load(checkpoint_path(second), weights_only=True)
    # Same model, optimiser and random state: identical to training without a break.
    for name, value in reference["model"].items():
        assert torch.equal(resumed["model"][name], value), name


def test_a_stop_request_saves_the_step_reached(tmp_path):
    data = write_data(tmp_path / "data")
    config = tiny_config(tmp_path, epochs=1, steps_per_epoch=50)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Exception, match="before the first validation"):
        train_separator(data, config, stop=stop, progress=False)
    saved = torch.load(checkpoint_path(config), weights_only=True)
    assert saved["step"] == 0 and saved["epoch"] == 0


def test_data_errors_name_the_folder(tmp_path):
    config = tiny_config(tmp_path).train_separator
    with pytest.raises(TrainingDataError, match="training data folder not found"):
        load_training_data(tmp_path / "nothing", SR, config)
    one = write_data(tmp_path / "one", sources=("hum",))
    with pytest.raises(TrainingDataError, match=r"found 1 source folder\(s\) \(hum\); separation needs at least two"):
        load_training_data(one, SR, config)
    empty = write_data(tmp_path / "empty")
    (empty / "valve").mkdir()
    with pytest.raises(TrainingDataError, match=r"valve: no \.wav or \.flac recordings"):
        load_training_data(empty, SR, config)
    bad = write_data(tmp_path / "bad")
    (bad / "hum" / "broken.wav").write_bytes(b"RIFFxxxxWAVE")
    with pytest.raises(TrainingDataError, match="broken.wav: cannot read as audio"):
        load_training_data(bad, SR, config)
    short = write_data(tmp_path / "short", seconds=0.25)  # excerpts are 0.5 s
    with pytest.raises(TrainingDataError, match="hum: not enough audio to train and validate"):
        load_training_data(short, SR, config)
    single = write_data(tmp_path / "single", files=1, seconds=4.0)  # one recording: split in time
    loaded = load_training_data(single, SR, config)
    assert [v[0].shape for v in loaded.valid] == [(1, round(0.15 * 4 * SR))] * 2


def test_another_sample_rate_is_resampled_with_a_note(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = write_data(tmp_path / "data", rate=8000)
    loaded = load_training_data(data, SR, tiny_config(tmp_path).train_separator)
    assert "8000 Hz, resampled to 16000 Hz" in caplog.text
    total = sum(t.shape[-1] + v.shape[-1] for t, v in zip(loaded.train[0], loaded.valid[0]))
    assert total == 2 * 4 * SR  # two 4 s recordings, now at 16 kHz


def test_si_sdr_of_known_signals():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.standard_normal(16000))
    noise = torch.from_numpy(rng.standard_normal(16000))
    assert float(si_sdr(3.0 * ref, ref)) > 80  # scale does not matter
    noisy = ref + 0.1 * noise
    assert float(si_sdr(noisy, ref)) == pytest.approx(20.0, abs=0.3)


def test_snr_loss_is_the_negative_snr_floored_at_30_db():
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.standard_normal((1, 2, 1, 16000)))  # (batch, sources, channels, samples)
    mix = ref.sum(1)
    error = torch.from_numpy(rng.standard_normal((1, 2, 1, 16000)))
    # 20 dB SNR on both sources: about -20 dB; the floor (30 dB below the source and the
    # mixture, here 3 times the source's power) takes 1.1 dB off.
    assert float(snr_loss(ref + 0.1 * error, ref, mix)) == pytest.approx(-18.9, abs=0.2)
    better = float(snr_loss(ref + 0.01 * error, ref, mix))
    assert -26 < better < -24
    # A perfect estimate stops at the floor instead of going to -inf.
    assert float(snr_loss(ref, ref, mix)) == pytest.approx(-25.2, abs=0.1)
    # A silent source (the mixture is the other one): estimating silence is rewarded,
    # leaking the other source into it is not.
    silent = torch.cat([ref[:, :1], torch.zeros_like(ref[:, 1:])], 1)
    leaky = torch.cat([ref[:, :1], 0.1 * ref[:, :1]], 1)
    # (10 dB on that source, half of it in the mean over both)
    assert float(snr_loss(silent, silent, ref[:, 0])) < float(snr_loss(leaky, silent, ref[:, 0])) - 5


def test_training_with_the_snr_loss_runs_and_records_it(tmp_path):
    data = write_data(tmp_path / "data")
    result = train_separator(data, tiny_config(tmp_path, loss="snr"), progress=False, force=True)
    assert result.steps == 2 and np.isfinite(result.best_si_sdr)
    saved = torch.load(checkpoint_path(tiny_config(tmp_path)), weights_only=True)
    assert saved["config"]["loss"] == "snr"


def test_the_cosine_schedule_lowers_the_learning_rate_over_the_planned_steps(tmp_path):
    data = write_data(tmp_path / "data")
    constant = tiny_config(tmp_path / "a", epochs=2, steps_per_epoch=3, learning_rate=2e-3)
    train_separator(data, constant, progress=False, force=True)
    assert torch.load(checkpoint_path(constant), weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 2e-3
    cosine = tiny_config(tmp_path / "b", epochs=2, steps_per_epoch=3, learning_rate=2e-3, lr_schedule="cosine")
    assert train_separator(data, cosine, progress=False, force=True).steps == 6
    saved = torch.load(checkpoint_path(cosine), weights_only=True)
    # The last of 6 steps is taken at 5/6 of the way along the half cosine.
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + np.cos(np.pi * 5 / 6)))
    assert saved["config"]["lr_schedule"] == "cosine"
    with pytest.raises(ConfigError, match="lr_schedule"):
        tiny_config(tmp_path, lr_schedule="step")


def test_init_starts_from_another_models_weights_and_refuses_one_that_does_not_fit(tmp_path):
    data = write_data(tmp_path / "data")
    train_separator(data, tiny_config(tmp_path, name="first"), progress=False, force=True)
    first = read_package(model_file(tmp_path / "models", "first"))[0].state_dict()
    # At a vanishing learning rate the new model is the one it started from.
    train_separator(data, tiny_config(tmp_path, name="second", init="first", learning_rate=1e-12), progress=False,
                    force=True)
    second = read_package(model_file(tmp_path / "models", "second"))[0].state_dict()
    assert all(torch.allclose(second[k], v, atol=1e-6) for k, v in first.items())
    saved = torch.load(checkpoint_path(tiny_config(tmp_path, name="second")), weights_only=True)["config"]
    assert saved["init"] == "first"
    # Without init the same run keeps its own random start, which is not "first".
    train_separator(data, tiny_config(tmp_path, name="scratch", learning_rate=1e-12), progress=False, force=True)
    scratch = read_package(model_file(tmp_path / "models", "scratch"))[0].state_dict()
    assert not all(torch.allclose(scratch[k], v, atol=1e-6) for k, v in first.items())

    with pytest.raises(ConfigError, match=r"train_separator.init: model 'first' \(.*first-.*\.th\) is a Demucs of "
                                          r"another size"):
        train_separator(data, tiny_config(tmp_path, name="third", init="first", channels=8), progress=False)
    # Other sources: the output layer's weights go by source name, a new source starts afresh.
    other = write_data(tmp_path / "other", sources=("buzz", "hum", "whine"))
    train_separator(other, tiny_config(tmp_path, name="other", init="first", learning_rate=1e-12), progress=False,
                    force=True)
    moved = read_package(model_file(tmp_path / "models", "other"))[0].state_dict()
    output = "decoder.1.3."  # demucs v2's last layer: one output channel per source (mono)
    assert all(torch.allclose(moved[k], v, atol=1e-6) for k, v in first.items() if not k.startswith(output))
    assert torch.allclose(moved[output + "weight"][:, 1:], first[output + "weight"], atol=1e-6)  # hum, whine
    assert torch.allclose(moved[output + "bias"][1:], first[output + "bias"], atol=1e-6)
    assert not any(torch.allclose(moved[output + "weight"][:, 0], w, atol=1e-6) for w in first[output + "weight"].unbind(1))
    with pytest.raises(ConfigError, match="train_separator.init: .*absent"):
        train_separator(data, tiny_config(tmp_path, name="third", init="absent"), progress=False)
    with pytest.raises(ConfigError, match="init"):
        tiny_config(tmp_path, init="../first")
    assert not list((tmp_path / "models").glob("third-*.th"))


def test_a_hybrid_model_trains_at_the_configured_stft_size_and_resumes_only_at_it(tmp_path):
    data = write_data(tmp_path / "data")
    config = tiny_config(tmp_path, architecture="hdemucs", nfft=4096, depth=5, segment_seconds=1.0)
    result = train_separator(data, config, progress=False, force=True)
    assert result.steps == 2
    from demucs.pretrained import get_model

    model = get_model("tiny", repo=tmp_path / "models")
    assert type(model).__name__ == "HDemucs" and model.nfft == 4096
    separator = load_separator(dataclasses.replace(config.separation, model="tiny"), SR)
    assert separator.sources == ("hum", "whine")
    assert separator(np.zeros((1, SR), np.float32) + 0.01).shape == (1, 2, SR)
    with pytest.raises(ConfigError, match=r"train_separator.nfft = 4096, the config now says 1024"):
        train_separator(data, tiny_config(tmp_path, architecture="hdemucs", nfft=1024, depth=5,
                                          segment_seconds=1.0), resume=True, progress=False, force=True)


def test_a_stft_size_that_does_not_fit_the_depth_is_a_config_error_before_training(tmp_path):
    data = write_data(tmp_path / "data")
    config = tiny_config(tmp_path, architecture="hdemucs", nfft=4096, depth=4, segment_seconds=1.0)
    with pytest.raises(ConfigError, match=r"hdemucs with nfft 4096 and depth 4 does not fit together.*"
                                          r"4096 with depth 5 or 6"):
        train_separator(data, config, progress=False, force=True)
    assert not checkpoint_path(config).exists()
    with pytest.raises(ConfigError, match=r"train_separator.nfft.*power of 2"):
        tiny_config(tmp_path, nfft=3000)


def test_cli_trains_on_a_simulated_set_and_process_uses_the_model(tmp_path):
    """simulate --training-set -> train-separator -> process with the exported model."""
    import json

    import yaml

    from conftest import invoke

    data = tmp_path / "data"
    made = invoke("simulate", "--training-set", "--out", str(data), "--machines", "pump,fan", "--clips", "3",
                   "--seconds", "2", "--seed", "3")
    assert made.returncode == 0, made.stderr
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "capture": {"segment_seconds": 1.0},
        "denoise": {"enabled": False},
        "separation": {"repo": "models", "model": "tiny"},
        "train_separator": {"name": "tiny", "channels": 4, "depth": 2, "segment_seconds": 0.5, "batch_size": 2,
                            "epochs": 2, "steps_per_epoch": 2, "validation_mixtures": 2},
        "output": {"dir": "out"},
    }))
    refused = invoke("--config", str(config), "train-separator", str(data))
    assert refused.returncode == ExitCode.FAILURE and "no better than not separating" in refused.stderr
    assert not list((tmp_path / "models").glob("tiny-*.th"))
    trained = invoke("--config", str(config), "train-separator", str(data), "--resume", "--force")
    assert trained.returncode == 0, trained.stderr
    assert "sources fan,pump" in trained.stdout and "(4 steps" in trained.stdout
    assert len(list((tmp_path / "models").glob("tiny-*.th"))) == 1

    scene = tmp_path / "scene"
    assert invoke("simulate", "--out", str(scene), "--seconds", "2", "--mics", "2").returncode == 0
    done = invoke("--config", str(config), "process", str(scene / "mixture.wav"))
    assert done.returncode == 0, done.stderr
    folders = done.stdout.split()
    assert len(folders) == 2
    manifest = json.loads((Path(folders[0]) / "manifest.json").read_text())
    assert manifest["separator"]["name"] == "tiny" and manifest["tensors"] == {"mic_0": ["fan", "pump"],
                                                                                "mic_1": ["fan", "pump"]}


def test_cli_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    from conftest import invoke

    data = write_data(tmp_path / "data")
    result = invoke("--config", str(tmp_path / "none.yaml"), "train-separator", str(data), "--resume")
    assert result.returncode == 2 and "config file not found" in result.stderr
    (tmp_path / "c.yaml").write_text("separation:\n  repo: models\n")
    result = invoke("--config", str(tmp_path / "c.yaml"), "train-separator", str(data), "--resume")
    assert result.returncode == 1 and "no checkpoint to resume" in result.stderr


def test_an_array_model_trains_on_the_array_and_exports_every_source_at_every_microphone(tmp_path):
    """simulate --training-set --mics 2 -> train-separator (array) -> demucs' loader -> process."""
    import json

    import yaml
    from demucs.pretrained import get_model

    from conftest import invoke

    data = tmp_path / "data"
    made = invoke("simulate", "--training-set", "--out", str(data), "--machines", "pump,fan", "--clips", "3",
                  "--seconds", "2", "--seed", "3", "--mics", "2")
    assert made.returncode == 0, made.stderr
    assert all(sf.info(str(f)).channels == 2 for f in data.rglob("*.wav"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "capture": {"segment_seconds": 1.0, "channels": [1, 2]},
        "denoise": {"enabled": False},
        "separation": {"repo": "models", "model": "tiny"},
        "train_separator": {"name": "tiny", "array": True, "channels": 4, "depth": 2, "segment_seconds": 0.5,
                            "batch_size": 2, "epochs": 1, "steps_per_epoch": 2, "validation_mixtures": 2},
        "output": {"dir": "out"},
    }))
    trained = invoke("--config", str(config), "train-separator", str(data), "--force")
    assert trained.returncode == 0, trained.stderr
    assert "array mode: one model for 2 microphones" in trained.stderr
    assert get_model("tiny", repo=tmp_path / "models").audio_channels == 2  # demucs' own packaging
    # Where each machine stands, learnt from its recordings alone on the array, travels in the file.
    assert "spatial covariances of 2 sources learnt" in trained.stderr
    spatial = read_package(model_file(tmp_path / "models", "tiny"))[1]
    assert spatial.shape == (2, N_FFT // 2 + 1, 2, 2) and torch.isfinite(spatial).all()

    scene = tmp_path / "scene"
    assert invoke("simulate", "--out", str(scene), "--seconds", "2", "--mics", "2").returncode == 0
    done = invoke("--config", str(config), "process", str(scene / "mixture.wav"))
    assert done.returncode == 0, done.stderr
    for folder in map(Path, done.stdout.split()):
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.pt")) == [
            "mic_0/_room.pt", "mic_0/fan.pt", "mic_0/pump.pt", "mic_1/_room.pt", "mic_1/fan.pt", "mic_1/pump.pt"]
        assert json.loads((folder / "manifest.json").read_text())["separator"]["audio_channels"] == 2

    wider = tmp_path / "wider"
    assert invoke("simulate", "--out", str(wider), "--seconds", "1", "--mics", "3").returncode == 0
    settings = yaml.safe_load(config.read_text())
    settings["capture"]["channels"] = [1, 2, 3]
    config.write_text(yaml.safe_dump(settings))
    refused = invoke("--config", str(config), "process", str(wider / "mixture.wav"))
    assert refused.returncode == ExitCode.FAILURE
    assert "trained on an array of 2 microphones, but 3 microphone channels are recorded" in refused.stderr


def test_array_training_data_must_have_one_width(tmp_path):
    data = write_data(tmp_path / "data")
    sf.write(data / "hum" / "stereo.wav", np.zeros((16000, 2), np.float32), SR)
    config = tiny_config(tmp_path, array=True)
    with pytest.raises(TrainingDataError, match="different numbers of channels .*1 in .*2 in hum"):
        load_training_data(data, SR, config.train_separator)
