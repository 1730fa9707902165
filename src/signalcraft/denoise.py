"""Per-channel spectral gating against each channel's own room-noise clip.

Uses noisereduce's torch implementation (``TorchGate``) on the CPU, directly rather than
through ``noisereduce.reduce_noise``: that wrapper (3.0.x) does not pass the stationary
threshold on to the torch gate, and in stationary mode it averages a multichannel noise
clip across channels. Here each channel is gated with its own clip.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from noisereduce.torchgate import TorchGate

from .config import DenoiseConfig
from .errors import ConfigError, NoiseClipError


class Denoiser:
    """Spectral gating for a fixed set of channels.

    Parameters
    ----------
    config : DenoiseConfig
    sample_rate : int
        Hz, of the audio and of the clips.
    clips : sequence of np.ndarray, or None
        One float32 noise clip per channel, shape = (samples,), in channel order. Needed
        in stationary mode; ignored in non-stationary mode.
    """

    def __init__(self, config: DenoiseConfig, sample_rate: int, clips: Optional[Sequence[np.ndarray]]):
        self.config = config
        if config.stationary and clips is None:
            raise ValueError("stationary spectral gating needs one noise clip per channel")
        try:
            self._gate = self._make_gate(config, sample_rate)
        except ValueError as e:  # smoothing shorter than one STFT hop or bin
            raise ConfigError(f"denoise.time_mask_smooth_ms / freq_mask_smooth_hz: {e}; raise it or set it "
                              "to null.") from None
        min_len = 2 * config.n_fft  # TorchGate needs at least two windows
        self._clips = None
        if config.stationary:
            for k, clip in enumerate(clips):
                if clip.shape[-1] < min_len:
                    raise NoiseClipError(
                        f"the noise clip of microphone {k} has {clip.shape[-1]} samples; spectral gating with "
                        f"denoise.n_fft {config.n_fft} needs at least {min_len}. Record a longer clip."
                    )
            self._clips = [torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))[None] for c in clips]

    @staticmethod
    def _make_gate(config: DenoiseConfig, sample_rate: int) -> TorchGate:
        return TorchGate(
            sr=sample_rate,
            nonstationary=not config.stationary,
            n_std_thresh_stationary=config.n_std_thresh,
            prop_decrease=config.prop_decrease,
            n_fft=config.n_fft,
            freq_mask_smooth_hz=config.freq_mask_smooth_hz,
            time_mask_smooth_ms=config.time_mask_smooth_ms,
        ).to("cpu")

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Gate each channel. audio: float32, shape = (channels, samples); returns a new
        array of the same shape and dtype."""
        if self._clips is not None and audio.shape[0] != len(self._clips):
            raise ValueError(f"audio has {audio.shape[0]} channels, denoiser has {len(self._clips)} clips")
        n = audio.shape[-1]
        # TorchGate's inverse STFT returns whole hops only: pad to a whole number of
        # hops (with zeros, at the end) and cut back to the input length.
        hop = self._gate.hop_length
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        x = torch.nn.functional.pad(x, (0, -n % hop))
        with torch.no_grad():
            if self._clips is None:
                y = self._gate(x)
            else:
                y = torch.cat([self._gate(x[k:k + 1], clip) for k, clip in enumerate(self._clips)])
        assert y.shape[-1] >= n, (y.shape, n)
        return y[..., :n].numpy().astype(np.float32, copy=False)
