import threading
import time

import numpy as np
import pytest
import soundfile as sf
import sounddevice

from signalcraft import vdevice
from signalcraft.capture import DeviceCapture, file_segments, resolve_channels, resolve_device, to_float32
from signalcraft.config import CaptureConfig
from signalcraft.errors import ConfigError, DeviceError

from conftest import CHANNELS, SAMPLE_RATE, invoke


def vmic_config(**changes) -> CaptureConfig:
    return CaptureConfig(**{"device": vdevice.DEVICE_NAME, "channels": (1, 2, 3, 4), "segment_seconds": 0.5, **changes})


def test_device_by_name_substring_and_index(vmic):
    by_name = resolve_device("SIGNALCRAFT_VMIC")  # exact name wins over the _file device
    assert by_name.name == vdevice.DEVICE_NAME
    assert resolve_device(by_name.index) == by_name
    assert resolve_device("vmic_fi").name == vdevice.DEVICE_NAME + "_file"


def test_unknown_device_lists_the_available_ones(vmic):
    with pytest.raises(DeviceError) as e:
        resolve_device("Scarlett 18i20")
    message = str(e.value)
    assert "'Scarlett 18i20'" in message and vdevice.DEVICE_NAME in message
    assert "signalcraft devices" in message


def test_ambiguous_device_name_is_refused(vmic):
    with pytest.raises(DeviceError, match="matches several input devices"):
        resolve_device("signalcraft")


def test_channel_map():
    assert resolve_channels(None, 3, "dev") == (1, 2, 3)
    assert resolve_channels((2, 4), 4, "dev") == (2, 4)
    with pytest.raises(ConfigError, match="channel 5 does not exist on 'dev', which has 4 input channels"):
        resolve_channels((1, 5), 4, "dev")


def test_int16_to_float32_is_exact():
    block = np.array([[-32768, 0, 1, 32767]], dtype=np.int16)
    out = to_float32(block)
    assert out.dtype == np.float32 and out.shape == block.shape
    assert np.array_equal(np.round(out * 32768).astype(np.int16), block)


def test_segments_are_gapless_when_blocks_straddle_boundaries(vmic):
    # 7000-frame segments from 1024-frame blocks: most blocks are split between two.
    # Channels out of order; all four are opened (the virtual device's ALSA plug skips a
    # block when it has to drop channels, a quirk of that plugin, not of capture).
    config = vmic_config(segment_seconds=7000 / SAMPLE_RATE, channels=(4, 2))
    with DeviceCapture(config) as capture:
        segments = list(capture.segments(4))
    assert [s.start_frame for s in segments] == [0, 7000, 14000, 21000]
    audio = np.concatenate([s.audio for s in segments], axis=1)
    assert audio.dtype == np.float32 and audio.shape == (2, 28000)
    expected = vmic.float32()[[3, 1], :28000]
    assert np.array_equal(audio, expected)
    assert all(s.channels == (4, 2) and s.overflows == 0 and s.dropped_frames == 0 for s in segments)
    assert (segments[1].start_time - segments[0].start_time).total_seconds() == pytest.approx(7000 / SAMPLE_RATE)


def test_stop_discards_the_partial_segment(vmic):
    stop = threading.Event()
    with DeviceCapture(vmic_config(), stop=stop) as capture:
        it = capture.segments()
        first = next(it)
        stop.set()
        assert list(it) == []
    assert first.audio.shape == (CHANNELS, 8000)


def test_refused_sample_rate_is_a_clear_error(vmic):
    with pytest.raises(DeviceError, match="refuses 4 channels at 1000 Hz"):
        with DeviceCapture(vmic_config(sample_rate=1000)):
            pass


class StallingStream:
    """Stands in for sounddevice.InputStream: delivers `blocks` blocks, then nothing, as a
    USB interface does when it hangs (`active` stays True) or is unplugged (`active` False)."""

    blocks = 3
    goes_inactive = False

    def __init__(self, channels, blocksize, dtype, callback, **kwargs):
        self.channels, self.blocksize, self.dtype, self.callback = channels, blocksize, dtype, callback
        self.active = False

    def start(self):
        self.active = True
        status = sounddevice.CallbackFlags()
        for _ in range(self.blocks):
            self.callback(np.zeros((self.blocksize, self.channels), self.dtype), self.blocksize, None, status)
        self.active = not self.goes_inactive

    def abort(self, ignore_errors=True):
        self.active = False

    def close(self, ignore_errors=True):
        pass


@pytest.mark.parametrize("goes_inactive, message", [(False, "delivered no audio for"), (True, "stopped delivering audio")])
def test_a_stalled_device_ends_with_an_error_not_a_hang(vmic, monkeypatch, goes_inactive, message):
    monkeypatch.setattr(StallingStream, "goes_inactive", goes_inactive)
    monkeypatch.setattr(sounddevice, "InputStream", StallingStream)
    config = vmic_config(segment_seconds=1.0)
    began = time.monotonic()
    with pytest.raises(DeviceError, match=message):
        with DeviceCapture(config) as capture:
            list(capture.segments(1))
    # Within two segment lengths.
    assert time.monotonic() - began < 2 * config.segment_seconds


def test_file_source_yields_the_same_segments(tmp_path):
    rng = np.random.default_rng(3)
    samples = rng.integers(-9000, 9000, size=(SAMPLE_RATE * 2 + 100, 3), dtype=np.int16)
    path = tmp_path / "plant.flac"
    sf.write(path, samples, SAMPLE_RATE, subtype="PCM_16")
    segments = list(file_segments(path, 0.5, channels=(3, 2)))
    assert len(segments) == 4  # the 100-frame tail is not a whole segment
    assert [s.start_frame for s in segments] == [0, 8000, 16000, 24000]
    audio = np.concatenate([s.audio for s in segments], axis=1)
    assert audio.dtype == np.float32 and audio.shape == (2, 32000)
    assert np.array_equal(np.round(audio * 32768).astype(np.int16), samples[:32000, [2, 1]].T)
    assert segments[0].device == "file:plant.flac" and segments[0].channels == (3, 2)


def test_file_source_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    from signalcraft.errors import StorageError

    with pytest.raises(StorageError, match="notes.wav: cannot read as audio"):
        list(file_segments(bad, 1.0))


def test_devices_command_lists_and_marks_the_virtual_device(vmic, project):
    result = invoke("--config", str(project), "devices")
    assert result.returncode == 0, result.stderr
    marked = [line for line in result.stdout.splitlines() if line.startswith(" *")]
    assert len(marked) == 1 and vdevice.DEVICE_NAME in marked[0]
    assert "ALSA" in marked[0] and "16000 Hz" in marked[0]


def test_missing_device_message_lists_the_available_devices(vmic, project):
    text = project.read_text().replace(vdevice.DEVICE_NAME, "Focusrite")
    project.write_text(text)
    result = invoke("--config", str(project), "record")
    assert result.returncode == 1
    assert "'Focusrite'" in result.stderr and vdevice.DEVICE_NAME in result.stderr
