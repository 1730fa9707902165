"""Reference-microphone noise cancellation: adaptive filters that remove from every
machine microphone what is predictable from the reference microphones.

A reference microphone sits near a noise source that comes and goes (a ventilation fan,
a compressor next door) and away from the machines. What of that noise reaches a
machine microphone is, to a good approximation, the reference filtered by the room's
path between them: a linear filter of ``taps`` samples per (microphone, reference),
learnt as the audio streams and subtracted. Spectral gating cannot remove such noise:
its noise clip was recorded without it.

Both methods run the filter in the frequency domain, in blocks of ``block`` samples with
the filter split into ``taps / block`` partitions (the multidelay block frequency-domain
filter, overlap-save with each partition's gradient constrained to ``block``
coefficients; Soo and Pang 1990), vectorised over microphones, references and
partitions, never a loop over samples:

- ``nlms``: frequency-domain normalised LMS: each block's update is the sum of the
  per-sample LMS updates over its samples (the error from the weights at the block's
  start), each frequency bin's step normalised by the references' power in it
  (recursively estimated with ``forgetting``, never below the present block's, so a
  source that switches on is met at once). For white noise that is per-sample NLMS's
  normalisation and it behaves as per-sample NLMS with the same step size; for coloured
  noise (a rumble, a hum with its harmonics) every bin converges alike.
- ``rls``: the frequency-domain RLS approximation (the generalised multichannel
  frequency-domain adaptive filter of Buchner, Benesty and Kellermann): each bin's step
  normalised by the inverse of the references' (cross-)power matrix in it, so several
  references that hear much the same are decorrelated. It runs the filter as one
  partition (``block`` = ``taps``): cheaper, and slower to follow a change. With one
  reference it is NLMS in one partition.

The filters learn, and subtract, only while the references are ``adapt_above_db`` above
their quiet level (the least they have been, rising at most ``FLOOR_RISE_DB_PER_S``):
while the noise source is off, what the references hear is the room and the machines
themselves; a filter that learnt from that would subtract machine sound, and the
filtered reference would only add the reference's room noise, so the audio passes
unchanged. A source already
running when the canceller starts is learnt once it has been heard off and on again;
one that never stops is the noise gate's (record its noise clip with it running).

The weights, the last block of the references and a partial block at the end of a
segment are carried to the next segment, so two gapless segments give exactly what
their concatenation gives. Divergence guard: when over a segment a microphone's output
is louder than its input by ``divergence_db``, the filter is reset (logged) and that
segment passes through unchanged.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from ..config import ReferenceConfig

log = logging.getLogger(__name__)

FLOOR_RISE_DB_PER_S = 0.2  # how fast the references' quiet level may rise, dB/s
LEVEL_S = 0.1  # the references' level that is compared with their quiet level is smoothed over this, s

# A bin's power is floored at this fraction of the strongest bin's, so that the bins a
# tonal reference leaves empty (nothing to learn there), and the directions in which
# several references hardly differ, do not take huge steps: the whitening spans at most
# 1 / FLOOR (10 dB).
FLOOR = 0.1


class Canceller:
    """The reference canceller for ``mics`` microphones and ``references`` reference
    microphones (a ``dsp.Stage``).

    Parameters
    ----------
    config : ReferenceConfig
    mics, references : int
        Rows of the audio and of the reference passed to each call.
    sample_rate : int
        Hz: sets how fast the references' quiet level may rise (FLOOR_RISE_DB_PER_S).
    """

    def __init__(self, config: ReferenceConfig, mics: int, references: int, sample_rate: int = 16000):
        if mics < 1 or references < 1:
            raise ValueError(f"a canceller needs microphones and references, got {mics} and {references}")
        self.config = config
        self.mics, self.references = mics, references
        self.taps = config.taps
        # rls runs the filter as one partition: with several, a tonal reference leaves
        # directions that the per-bin normalisation cannot see, and they drift.
        self.block = config.taps if config.method == "rls" else config.block  # ReferenceConfig: block divides taps
        self.partitions = config.taps // self.block
        # The quiet level may rise this much per block (minimum statistics: it follows a
        # quieter room at once, a louder one slowly).
        self._floor_rise = 10 ** (FLOOR_RISE_DB_PER_S * self.block / sample_rate / 10)
        self._smoothing = min(1.0, self.block / (LEVEL_S * sample_rate))
        self.resets = 0  # divergences reset so far
        self.reset()

    def reset(self) -> None:
        m, r, b, p = self.mics, self.references, self.block, self.partitions
        self.filters = np.zeros((m, p, r, b + 1), dtype=complex)  # per partition, frequency domain
        self._power = np.zeros((b + 1, r, r), dtype=complex)  # the references' (cross-)power per bin
        self._blocks = 0  # blocks in the power estimate (its start-up correction)
        self._level: Optional[float] = None  # the references' power, smoothed over LEVEL_S
        self._quiet = np.inf  # their quiet level: the least of that, minimum statistics
        self._off = False  # the references are at their quiet level: the audio passes unchanged
        self._history: Optional[tuple] = None  # per signal: previous block, spectra, a begun block; see _state

    def _state(self, signals: int) -> tuple:
        """The history of ``signals`` signals (the audio, then any shadows): the
        references' previous block (signals, references, block), their last blocks'
        spectra (signals, partitions, references, block + 1), and the samples of a block
        begun in the previous segment (signals, mics, n) and (signals, references, n)."""
        if self._history is None:
            r, b, p = self.references, self.block, self.partitions
            self._history = (np.zeros((signals, r, b)), np.zeros((signals, p, r, b + 1), dtype=complex),
                             np.zeros((signals, self.mics, 0)), np.zeros((signals, r, 0)))
        if self._history[0].shape[0] != signals:
            raise ValueError(f"{signals} signals after {self._history[0].shape[0]}; reset() first")
        return self._history

    @property
    def weights(self) -> np.ndarray:
        """The filters in the time domain, shape = (mics, references, taps)."""
        taps = np.fft.irfft(self.filters, n=2 * self.block, axis=-1)[..., :self.block]  # (m, p, r, block)
        return np.moveaxis(taps, 1, 2).reshape(self.mics, self.references, self.taps)

    def __call__(self, audio: np.ndarray, reference: Optional[np.ndarray] = None) -> np.ndarray:
        """audio: float32, shape = (mics, samples); reference: shape = (references,
        samples). Returns the microphones with the reference's share removed, float32,
        shape = (mics, samples)."""
        return self.with_shadows(audio, reference)[0]

    def with_shadows(self, audio: np.ndarray, reference: Optional[np.ndarray],
                     shadows: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> list[np.ndarray]:
        """``__call__``, and the same filters applied to each (audio, reference) of
        ``shadows`` as they stand at each block, without learning from them: a
        measurement can split the output into what became of each part of the input
        (the noise, the machines) by passing the parts as shadows. Returns the output
        and each shadow's. Pass the same number of shadows on every call until reset()."""
        signals = [(audio, reference), *shadows]
        for a, ref in signals:
            if a.ndim != 2 or a.shape[0] != self.mics:
                raise ValueError(f"audio of shape {a.shape}; the canceller has {self.mics} microphones")
            if ref is None or ref.shape != (self.references, a.shape[-1]) or a.shape != audio.shape:
                raise ValueError(f"reference of shape {None if ref is None else ref.shape}; expected "
                                 f"{(self.references, audio.shape[-1])}")
        previous, spectra, begun_d, begun_x = self._state(len(signals))
        done = begun_d.shape[2]  # samples of the first block already returned with the previous segment
        d = np.concatenate([begun_d, np.stack([a for a, _ in signals]).astype(np.float64)], axis=2)
        x = np.concatenate([begun_x, np.stack([r for _, r in signals]).astype(np.float64)], axis=2)
        n = self.block
        blocks = d.shape[2] // n
        out = np.empty_like(d)
        for k in range(blocks):
            s = slice(k * n, (k + 1) * n)
            out[..., s] = self._block(d[..., s], x[..., s], adapt=True)
        tail = d.shape[2] - blocks * n
        if tail:  # filtered with the present weights; finished (and adapted on) with the next segment
            pad = ((0, 0), (0, 0), (0, n - tail))
            out[..., blocks * n:] = self._block(np.pad(d[..., blocks * n:], pad), np.pad(x[..., blocks * n:], pad),
                                                adapt=False)[..., :tail]
        previous, spectra, _, _ = self._history
        self._history = (previous, spectra, d[..., blocks * n:], x[..., blocks * n:])
        result = out[:, :, done:]
        level = np.sum(audio.astype(np.float64) ** 2, axis=1) + 1e-30
        gain_db = 10 * np.log10((np.sum(result[0] ** 2, axis=1) + 1e-30) / level)
        if not np.all(np.isfinite(result[0])) or np.any(gain_db > self.config.divergence_db):
            worst = int(np.nanargmax(np.where(np.isfinite(gain_db), gain_db, np.inf)))
            log.warning("reference canceller diverged (mic_%d: output %.1f dB louder than its input, more than "
                        "reference.divergence_db %g): reset, this segment passes through uncancelled",
                        worst, gain_db[worst], self.config.divergence_db)
            self.resets += 1
            self.reset()
            return [a.astype(np.float32, copy=True) for a, _ in signals]
        return [r.astype(np.float32) for r in result]

    def _block(self, d: np.ndarray, x: np.ndarray, adapt: bool) -> np.ndarray:
        """One block of each signal: d (signals, mics, block), x (signals, references,
        block) -> the errors d - w * x; with ``adapt`` the weights learn from the first
        signal's and the block joins the history."""
        b = self.block
        previous, history, begun_d, begun_x = self._history
        spectrum = np.fft.rfft(np.concatenate([previous, x], axis=2), axis=2)  # (signals, references, block + 1)
        spectra = np.concatenate([spectrum[:, None], history[:, :-1]], axis=1)  # (signals, partitions, refs, bins)
        estimate = np.fft.irfft(np.einsum("mprf,kprf->kmf", self.filters, spectra), n=2 * b, axis=2)[..., b:]
        error = d - estimate
        if not adapt:
            return d if self._off else error
        self._history = (x, spectra, begun_d, begun_x)
        c = self.config
        energy = float(np.sum(x[0] ** 2)) / b
        self._level = energy if self._level is None else self._level + self._smoothing * (energy - self._level)
        self._quiet = min(self._quiet * self._floor_rise, self._level)
        self._off = c.adapt_above_db is not None and self._level <= self._quiet * 10 ** (c.adapt_above_db / 10)
        if self._off:
            # The noise source is off: nothing to learn (the machines must not be learnt), and
            # nothing to subtract (the filtered reference would be the room and the machines).
            return d
        errors = np.fft.rfft(np.concatenate([np.zeros_like(error[0]), error[0]], axis=1), axis=1)  # (mics, bins)
        spectrum, spectra = spectrum[0], spectra[0]  # the weights learn from the audio, not the shadows
        lam = c.forgetting
        outer = np.einsum("rf,sf->frs", spectrum, np.conj(spectrum))  # X X^H per bin
        self._power = lam * self._power + (1 - lam) * outer
        self._blocks += 1
        power = self._power / (1 - lam ** self._blocks)  # unbiased while it starts
        # Fast attack: a source that switches on is louder than the memory of the quiet
        # before it; normalising by that memory would take a step far too large.
        louder = np.trace(outer, axis1=1, axis2=2).real > np.trace(power, axis1=1, axis2=2).real
        power[louder] = outer[louder]
        if c.method == "nlms":
            # Per partition, the sum over the block of e[t] x[t - j] (the per-sample LMS updates
            # summed), each bin's step normalised by the references' power in it (summed over the
            # references), floored at FLOOR of the strongest bin's.
            traces = np.trace(power, axis1=1, axis2=2).real  # (bins,)
            floor = traces.max() * FLOOR + 2 * b * c.regularisation
            normalised = np.conj(spectra) * (c.step_size / self.partitions / np.maximum(traces, floor))
        else:
            floor = np.trace(power, axis1=1, axis2=2).real.max() * FLOOR / self.references \
                + 2 * b * c.regularisation
            inverse = np.linalg.inv(power + floor * np.eye(self.references))  # (bins, references, references)
            # Phi^-1 X^* per bin, shared by the partitions: their steps add up to step_size
            normalised = np.einsum("frs,psf->prf", inverse, np.conj(spectra)) * (c.step_size / self.partitions)
        gradient = np.fft.irfft(normalised[None] * errors[:, None, None], n=2 * b, axis=-1)[..., :b]
        self.filters += np.fft.rfft(gradient, n=2 * b, axis=-1)  # constrained to `block` taps per partition
        return error
