"""Per-channel spectral gating against each channel's own room-noise clip (a
``dsp.Stage``).

Uses noisereduce's torch implementation (``TorchGate``) on the CPU, directly rather than
through ``noisereduce.reduce_noise``: that wrapper (3.0.x) does not pass the stationary
threshold on to the torch gate, and in stationary mode it averages a multichannel noise
clip across channels. Here each channel is gated with its own clip.

Segment edges: the STFT and the mask smoothing need audio on both sides of every frame.
At the start of a segment the gate uses the end of the previous segment (kept as
context, ``CONTEXT_FFTS`` windows of it) when the segment follows on from it; at the end,
where the next segment is not captured yet, the audio is mirrored. A segment after a
``reset()`` is mirrored at its start too. Never zeros: a zero-padded edge reads as a
sudden silence and the gate opens or closes on it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from noisereduce.torchgate import TorchGate

from ..config import DenoiseConfig
from ..errors import ConfigError, NoiseClipError


CONTEXT_FFTS = 2  # windows of the previous segment kept as context for the next


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
        self._context: Optional[np.ndarray] = None  # the end of the previous segment, (channels, samples)

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

    def reset(self) -> None:
        """The next segment does not follow on from the last one: no context."""
        self._context = None

    def __call__(self, audio: np.ndarray, reference: Optional[np.ndarray] = None) -> np.ndarray:
        """Gate each channel. audio: float32, shape = (channels, samples); returns a new
        array of the same shape and dtype. ``reference`` is not used."""
        if self._clips is not None and audio.shape[0] != len(self._clips):
            raise ValueError(f"audio has {audio.shape[0]} channels, denoiser has {len(self._clips)} clips")
        n = audio.shape[-1]
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        edge = min(CONTEXT_FFTS * self.config.n_fft, n - 1)
        context = self._context
        if context is None or context.shape[0] != audio.shape[0]:
            context = audio[:, 1:edge + 1][:, ::-1]  # mirrored start
        ahead = audio[:, -edge - 1:-1][:, ::-1]  # mirrored end
        x = np.concatenate([context, audio, ahead], axis=1)
        # TorchGate's inverse STFT returns whole hops only: pad to a whole number of hops
        # and cut back.
        hop = self._gate.hop_length
        x = torch.nn.functional.pad(torch.from_numpy(x), (0, -x.shape[-1] % hop))
        with torch.no_grad():
            if self._clips is None:
                y = self._gate(x)
            else:
                y = torch.cat([self._gate(x[k:k + 1], clip) for k, clip in enumerate(self._clips)])
        start = context.shape[1]
        assert y.shape[-1] >= start + n, (y.shape, start, n)
        self._context = audio[:, n - edge:].copy()
        out = y[..., start:start + n].numpy().astype(np.float32, copy=True)
        # The non-stationary gate divides by the signal's own statistics: on digital
        # silence (a dead channel, a muted input) they are 0/0. Gated silence is silence.
        return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
