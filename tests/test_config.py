import dataclasses
from pathlib import Path

import pytest
import yaml

from signalcraft.config import ENV_VAR, Config, config_from_dict, load_config
from signalcraft.errors import ConfigError, ExitCode

from conftest import invoke, run_cli


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    config = load_config()
    assert config.capture.sample_rate == 16000
    assert config.capture.segment_frames == 160000
    assert config.output.dir == tmp_path / "output"
    assert config.source is None


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    path = write(folder, {"noise": {"dir": "clips"}, "output": {"dir": "/var/sc"}})
    monkeypatch.chdir(tmp_path)  # cron runs elsewhere
    config = load_config(Path("site/config.yaml"))
    assert config.noise.dir == folder.resolve() / "clips"
    assert config.output.dir == Path("/var/sc")
    assert config.source == Path("site/config.yaml")
    assert path.exists()


def test_environment_variable_names_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, {"capture": {"sample_rate": 48000}})
    monkeypatch.setenv(ENV_VAR, str(path))
    monkeypatch.chdir("/")
    assert load_config().capture.sample_rate == 48000


@pytest.mark.parametrize(
    "data, message",
    [
        ({"capture": {"sampel_rate": 8000}}, "capture.sampel_rate: unknown key"),
        ({"captur": {}}, "captur: unknown key"),
        ({"capture": {"sample_rate": "16k"}}, "capture.sample_rate: expected an integer, got a string '16k'"),
        ({"capture": {"sample_rate": True}}, "capture.sample_rate: expected an integer"),
        ({"capture": {"segment_seconds": -1}}, "capture.segment_seconds: must be positive"),
        ({"capture": {"channels": [0, 1]}}, "capture.channels: are 1-based"),
        ({"capture": {"channels": [1, 1]}}, "capture.channels: lists a channel twice"),
        ({"capture": {"channels": [1, "two"]}}, "capture.channels[1]: expected an integer, got a string 'two'"),
        ({"capture": {"device": 1.5}}, "capture.device: expected an integer or a string or null"),
        ({"capture": {"sample_format": "int8"}}, "capture.sample_format: must be one of 'int16', 'int32', 'float32'"),
        ({"capture": 3}, "capture: expected a mapping of keys, got an integer"),
        ({"noise": {"clip_level": 2}}, "noise.clip_level: must be in (0, 1]"),
        ({"denoise": {"decision_ms": 0}}, "denoise.decision_ms: must be positive, or null"),
        ({"separation": {"spatial_iterations": -1}}, "separation.spatial_iterations: must be 0 (off) to 10"),
        ({"separation": {"room_headroom": 0.5}}, "separation.room_headroom: must be null or a number from 1 to 1e6"),
        ({"detect": {"attribution": "yes"}}, "detect.attribution"),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_every_problem_is_listed_at_once_one_line_each(tmp_path):
    """Wrong keys, types and values in several sections: one line per problem, each
    starting with the file and naming the key; a value that is wrong is not also blamed
    for the checks that depend on it."""
    path = write(tmp_path, yaml.safe_dump({  # in this order in the file, and in the message
        "capture": {"sampel_rate": 8000, "segment_seconds": -1, "channels": [0, 1]},
        "noise": {"clip_level": 2},
        "detect": {"alert_k": 3, "calibration_segments": 2, "room_mask_db": 0,
                   "alerts": {"k": 9, "n": "five", "warning_k": 4, "warning_n": 3}, "levels": {"method": "magic"}},
        "features": {"f_max": 20000},
        "output": 3,
    }, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).splitlines() == [f"{path}: {problem}" for problem in (
        "capture.sampel_rate: unknown key. Known keys here: device, channels, reference_channels, sample_rate, segment_seconds, "
        "sample_format, block_frames, queue_seconds, reconnect_attempts, reconnect_delay_s.",
        "capture.segment_seconds: must be positive",
        "capture.channels: are 1-based: the first channel is 1",
        "noise.clip_level: must be in (0, 1]",
        "detect.alert_k: this key is now detect.alerts.k; move it there (see config.yaml in the signalcraft source).",
        "detect.alerts.n: expected an integer, got a string 'five'",
        "detect.alerts.k: must be between 1 and n",
        "detect.alerts.warning_k: must be between 1 and warning_n",
        "detect.levels.method: must be one of 'gamma', 'sigma', 'percentile', got 'magic'",
        "detect.calibration_segments: must be at least 5",
        "detect.room_mask_db: must be above 0 dB (or null)",
        "output: expected a mapping of keys, got an integer",
        "features.f_max: 20000 Hz is above half of capture.sample_rate (8000 Hz); lower it or set it to null.",
    )]
    # The command line prints them all and exits 2, as for one problem.
    result = invoke("--config", str(path), "devices")
    assert result.returncode == ExitCode.USAGE
    assert all(f"{path}: {key}:" in result.stderr for key in ("capture.sampel_rate", "output", "features.f_max"))
    # A bad sample rate is its problem, not the segment length's or the frequencies'.
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, {"capture": {"sample_rate": 0}, "features": {"f_min": 100}}))
    assert str(e.value).splitlines() == [f"{path}: capture.sample_rate: must be a positive number of Hz"]


def test_integers_are_accepted_as_numbers():
    config = config_from_dict({"capture": {"segment_seconds": 2}})
    assert config.capture.segment_seconds == 2.0 and isinstance(config.capture.segment_seconds, float)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "capture: [unclosed"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_shipped_config_documents_every_key():
    """config.yaml at the top of the project loads and lists every key."""
    shipped = Path(__file__).resolve().parents[1] / "config.yaml"
    load_config(shipped)
    listed = yaml.safe_load(shipped.read_text())
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        keys = {f.name for f in dataclasses.fields(section.default_factory)}
        assert set(listed[section.name]) == keys, section.name
    assert "#" in shipped.read_text()
    # ... with the defaults' values, so the documentation cannot drift from the code.
    assert load_config(shipped) == config_from_dict({}, shipped)


def test_cli_exit_code_for_an_unknown_key(tmp_path):
    path = write(tmp_path, {"output": {"folder": "x"}})
    result = run_cli("--config", str(path), "devices")
    assert result.returncode == ExitCode.USAGE == 2
    assert "output.folder: unknown key" in result.stderr
