"""Per-channel spectral gating against each channel's own room-noise clip (a
``dsp.Stage``).

Uses noisereduce's torch implementation (``TorchGate``) on the CPU, directly rather than
through ``noisereduce.reduce_noise``: that wrapper (3.0.x) does not pass the stationary
threshold on to the torch gate, and in stationary mode it averages a multichannel noise
clip across channels. Here each channel is gated with its own clip.

The decision, stationary mode: a time-frequency bin passes when the room's power there,
averaged over ``denoise.decision_ms`` around it, exceeds the noise clip's mean of the
same average by ``denoise.n_std_thresh`` of its standard deviations. noisereduce decides
on each STFT frame alone; averaging first does not change where the noise's threshold
sits relative to its own spread, but the spread of a 400 ms average is under a third of
one frame's (1.6 against 5.5 dB in noise), so the threshold sits much nearer the noise's
level: a machine's steady lines and broadband sound at or a little above the room's
level pass, where a per-frame decision drops 40-50% of the machines' energy in a
reverberant room in which they are about as loud as the room (scripts/bench_denoise.py).
Short sounds (knocks, clicks) pass about as they pass a per-frame decision. ``decision_ms: null`` is noisereduce's
per-frame decision. The noise clip's thresholds are computed once, not per segment.

Segment edges: the STFT, the averaging and the mask smoothing need audio on both sides
of every frame. At the start of a segment the gate uses the end of the previous segment
(kept as context) when the segment follows on from it; at the end, where the next
segment is not captured yet, the audio is mirrored. A segment after a ``reset()`` is
mirrored at its start too. Never zeros: a zero-padded edge reads as a sudden silence and
the gate opens or closes on it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from noisereduce.torchgate import TorchGate
from noisereduce.torchgate.utils import amp_to_db

from ..config import DenoiseConfig
from ..errors import ConfigError, NoiseClipError


CONTEXT_FFTS = 2  # windows of the previous segment kept as context for the next, besides the averaging's


class _Gate(TorchGate):
    """noisereduce's gate with the stationary decision on averaged power (module
    docstring), thresholds fixed from one noise clip, and a mask that can be held
    (``held``) to pass other signals through the same gain, as a measurement does."""

    def __init__(self, frames: int, **options):
        super().__init__(**options)
        self.frames = frames  # odd, centred; 1: noisereduce's per-frame decision
        self.threshold: Optional[torch.Tensor] = None  # dB per frequency, (freq, 1)
        self.held: Optional[torch.Tensor] = None  # the raw mask to apply instead of deciding
        self.last: Optional[torch.Tensor] = None  # the raw mask of the last call

    def _spectrum_db(self, x: torch.Tensor) -> torch.Tensor:
        X = torch.stft(x, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                       return_complex=True, pad_mode="constant", center=True,
                       window=torch.hann_window(self.win_length))
        return amp_to_db(X)

    def _averaged(self, X_db: torch.Tensor) -> torch.Tensor:
        """dB of the power averaged over ``frames`` frames centred on each: (batch, freq, frames)."""
        if self.frames <= 1:
            return X_db
        power = torch.pow(10.0, X_db / 10)
        half = self.frames // 2
        padded = torch.nn.functional.pad(power, (half, half), mode="replicate")
        return 10 * torch.log10(torch.nn.functional.avg_pool1d(padded, self.frames, stride=1).clamp_min(1e-30))

    def learn(self, clip: torch.Tensor) -> None:
        """Thresholds per frequency from a noise clip, shape = (1, samples)."""
        std, mean = torch.std_mean(self._averaged(self._spectrum_db(clip))[0], dim=-1)
        self.threshold = (mean + std * self.n_std_thresh_stationary)[:, None]

    def _stationary_mask(self, X_db: torch.Tensor, xn: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.held is not None:
            return self.held
        self.last = torch.gt(self._averaged(X_db), self.threshold)
        return self.last

    def _nonstationary_mask(self, X_abs: torch.Tensor) -> torch.Tensor:
        if self.held is not None:
            return self.held
        self.last = super()._nonstationary_mask(X_abs)
        return self.last


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
        count = len(clips) if config.stationary else 1  # the non-stationary gate has no per-channel state
        try:
            self._gates = [self._make_gate(config, sample_rate) for _ in range(count)]
        except ValueError as e:  # smoothing shorter than one STFT hop or bin
            raise ConfigError(f"denoise.time_mask_smooth_ms / freq_mask_smooth_hz: {e}; raise it or set it "
                              "to null.") from None
        hop = self._gates[0].hop_length
        # Context: the STFT's window and the averaging's half-width, each side.
        self._edge = CONTEXT_FFTS * config.n_fft + (self._gates[0].frames // 2) * hop
        min_len = 2 * config.n_fft  # TorchGate needs at least two windows
        if config.stationary:
            for k, (gate, clip) in enumerate(zip(self._gates, clips)):
                if clip.shape[-1] < min_len:
                    raise NoiseClipError(
                        f"the noise clip of microphone {k} has {clip.shape[-1]} samples; spectral gating with "
                        f"denoise.n_fft {config.n_fft} needs at least {min_len}. Record a longer clip."
                    )
                gate.learn(torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))[None])
        self._context: list[Optional[np.ndarray]] = [None]  # per signal (audio, then shadows): the end of the last segment

    @staticmethod
    def _make_gate(config: DenoiseConfig, sample_rate: int) -> _Gate:
        n_fft = config.n_fft
        hop_ms = 1000 * (n_fft // 4) / sample_rate  # TorchGate's hop: a quarter window
        frames = 1 if config.decision_ms is None else 1 + 2 * round(config.decision_ms / hop_ms / 2)
        return _Gate(
            frames,
            sr=sample_rate,
            nonstationary=not config.stationary,
            n_std_thresh_stationary=config.n_std_thresh,
            prop_decrease=config.prop_decrease,
            n_fft=n_fft,
            freq_mask_smooth_hz=config.freq_mask_smooth_hz,
            time_mask_smooth_ms=config.time_mask_smooth_ms,
        ).to("cpu")

    def reset(self) -> None:
        """The next segment does not follow on from the last one: no context."""
        self._context = [None] * len(self._context)

    def __call__(self, audio: np.ndarray, reference: Optional[np.ndarray] = None) -> np.ndarray:
        """Gate each channel. audio: float32, shape = (channels, samples); returns a new
        array of the same shape and dtype. ``reference`` is not used."""
        return self.with_shadows(audio)[0]

    def with_shadows(self, audio: np.ndarray, shadows: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
        """``__call__``, and the same gain (the mask decided on ``audio``) applied to each
        of ``shadows`` (parts of the audio, the same shape): a measurement can split the
        output exactly into what became of each part (the noise, the machines). Returns
        the output and each shadow's. Pass the same number of shadows on every call
        until reset()."""
        if self.config.stationary and audio.shape[0] != len(self._gates):
            raise ValueError(f"audio has {audio.shape[0]} channels, denoiser has {len(self._gates)} clips")
        for s in shadows:
            if s.shape != audio.shape:
                raise ValueError(f"shadow of shape {s.shape}; the audio's is {audio.shape}")
        signals = [audio, *shadows]
        if len(self._context) != len(signals) or any(c is not None and c.shape[0] != audio.shape[0]
                                                     for c in self._context):
            self._context = [None] * len(signals)  # not the stream the context came from
        n = audio.shape[-1]
        edge = min(self._edge, n - 1)
        outputs = []
        for k in range(audio.shape[0]):
            gate = self._gates[k if self.config.stationary else 0]
            gate.held = None
            rows = []
            for j, signal in enumerate(signals):
                rows.append(self._gate_row(gate, signal[k], self._context[j], k, edge))
                gate.held = gate.last  # the shadows pass through the audio's mask
            gate.held = None
            outputs.append(rows)
        self._context = [np.ascontiguousarray(s[:, n - edge:], dtype=np.float32) for s in signals]
        # The non-stationary gate divides by the signal's own statistics: on digital
        # silence (a dead channel, a muted input) they are 0/0. Gated silence is silence.
        return [np.nan_to_num(np.stack([rows[j] for rows in outputs]), nan=0.0, posinf=0.0, neginf=0.0)
                for j in range(len(signals))]

    @staticmethod
    def _gate_row(gate: _Gate, row: np.ndarray, context: Optional[np.ndarray], channel: int, edge: int) -> np.ndarray:
        """One channel of one signal with ``edge`` samples of context each side: (samples,)
        -> (samples,) float32."""
        n = row.shape[-1]
        row = np.ascontiguousarray(row, dtype=np.float32)
        before = row[1:edge + 1][::-1] if context is None or context.shape[-1] != edge else context[channel]
        ahead = row[-edge - 1:-1][::-1]  # mirrored end
        x = np.concatenate([before, row, ahead])
        # TorchGate's inverse STFT returns whole hops only: pad to a whole number of hops
        # and cut back.
        x = torch.nn.functional.pad(torch.from_numpy(x)[None], (0, -x.shape[-1] % gate.hop_length))
        with torch.no_grad():
            y = gate(x)[0]
        start = before.shape[-1]
        assert y.shape[-1] >= start + n, (y.shape, start, n)
        return y[start:start + n].numpy().astype(np.float32, copy=True)
