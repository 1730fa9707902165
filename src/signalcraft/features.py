"""Log-mel tensors: shape = (1, n_mels, n_frames) float32 per microphone and source.

The mel filterbank follows librosa's defaults (Slaney mel scale and area
normalisation) so that values match ``librosa.feature.melspectrogram`` with the same
settings. Power is converted to dB against a fixed full-scale reference and floored, never
normalised per tensor: a machine that gets louder must look louder.
"""

from __future__ import annotations

import numpy as np
import torch

from .audio_backend import torchaudio
from .config import FeaturesConfig
from .errors import ConfigError


def hop_length(segment_samples: int, n_frames: int) -> int:
    """Hop (samples) that gives at least ``n_frames`` centred frames over a segment.

    The first ``n_frames`` are kept. With 10 s at 16 kHz and 240 frames this is exact
    (hop 669, frame 240 centred 109 samples before the end); other lengths drop at most a
    few frames' worth of the segment's end.
    """
    hop = segment_samples // (n_frames - 1)
    if hop < 1:
        raise ConfigError(
            f"features.n_frames: a segment of {segment_samples} samples cannot give {n_frames} frames; "
            "lengthen capture.segment_seconds or lower features.n_frames."
        )
    assert 1 + segment_samples // hop >= n_frames
    return hop


class LogMel:
    """Log-mel spectrogram for segments of a fixed length.

    ``LogMel(config, sample_rate, segment_samples)(audio)`` maps float32 audio of
    shape = (..., segment_samples) to a float32 tensor of shape = (..., n_mels, n_frames),
    in dB re full scale, floored at ``config.floor_db``.
    """

    def __init__(self, config: FeaturesConfig, sample_rate: int, segment_samples: int):
        self.config = config
        self.sample_rate = sample_rate
        self.segment_samples = segment_samples
        self.hop = hop_length(segment_samples, config.n_frames)
        if config.f_max is not None and config.f_max > sample_rate / 2:
            raise ConfigError(f"features.f_max: {config.f_max:g} Hz is above half the sample rate "
                              f"({sample_rate / 2:g} Hz); lower it or set it to null.")
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=config.n_fft,
            hop_length=self.hop,
            f_min=config.f_min,
            f_max=config.f_max,
            n_mels=config.n_mels,
            power=2.0,
            center=True,
            pad_mode="constant",  # librosa's default; "reflect" differs a lot at the edges
            norm="slaney",
            mel_scale="slaney",
        )
        # Power -> dB against a fixed reference of 1.0 (full scale); its own floor is -100 dB.
        self._db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)

    def settings(self) -> dict:
        """Everything that determines the tensor's values, for manifests and models."""
        c = self.config
        return {
            "kind": "log-mel",
            "sample_rate": self.sample_rate,
            "segment_samples": self.segment_samples,
            "n_mels": c.n_mels,
            "n_frames": c.n_frames,
            "n_fft": c.n_fft,
            "hop_length": self.hop,
            "f_min": c.f_min,
            "f_max": c.f_max if c.f_max is not None else self.sample_rate / 2,
            "power": 2.0,
            "mel_scale": "slaney",
            "norm": "slaney",
            "db_reference": 1.0,
            "floor_db": c.floor_db,
        }

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        if audio.shape[-1] != self.segment_samples:
            raise ValueError(f"expected {self.segment_samples} samples, got {audio.shape[-1]}")
        with torch.no_grad():
            power = self._mel(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)))
            db = self._db(power).clamp_min(self.config.floor_db)
        return db[..., : self.config.n_frames].contiguous()
