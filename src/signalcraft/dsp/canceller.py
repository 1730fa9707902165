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

- ``nlms``: normalised LMS: each block's update is the sum of the per-sample LMS
  updates over its samples (the error from the weights at the block's start), normalised
  by the references' power in their strongest frequency bin (recursively estimated with
  ``forgetting``). For white noise that is per-sample NLMS's normalisation (the energy
  over the last ``taps`` samples) and it behaves as per-sample NLMS with the same step
  size; for coloured noise it keeps the block update stable, and converges as slowly
  there as NLMS does.
- ``rls``: the frequency-domain RLS approximation (the generalised multichannel
  frequency-domain adaptive filter of Buchner, Benesty and Kellermann): the step
  normalised per frequency bin by the inverse of the references' recursively estimated
  (cross-)power spectrum, forgetting factor ``forgetting`` per block. It whitens a
  coloured reference and decorrelates several references, so it converges faster than
  NLMS on noise of an uneven spectrum (a rumble, a hum with its harmonics). It runs the
  filter as one partition (``block`` = ``taps``).

The weights, the last block of the references and a partial block at the end of a
segment are carried to the next segment, so two gapless segments give exactly what
their concatenation gives. Divergence guard: when over a segment a microphone's output
is louder than its input by ``divergence_db``, the filter is reset (logged) and that
segment passes through unchanged.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from ..config import ReferenceConfig

log = logging.getLogger(__name__)

# rls: a bin's power is floored at this fraction of the strongest bin's, so that the
# bins a tonal reference leaves empty (nothing to learn there) do not drift: the whitening
# spans at most 1 / RLS_FLOOR.
RLS_FLOOR = 1e-2


class Canceller:
    """The reference canceller for ``mics`` microphones and ``references`` reference
    microphones (a ``dsp.Stage``).

    Parameters
    ----------
    config : ReferenceConfig
    mics, references : int
        Rows of the audio and of the reference passed to each call.
    """

    def __init__(self, config: ReferenceConfig, mics: int, references: int):
        if mics < 1 or references < 1:
            raise ValueError(f"a canceller needs microphones and references, got {mics} and {references}")
        self.config = config
        self.mics, self.references = mics, references
        self.taps = config.taps
        # rls runs the filter as one partition: with several, a tonal reference leaves
        # directions that the per-bin normalisation cannot see, and they drift.
        self.block = config.taps if config.method == "rls" else min(config.block, config.taps)
        if config.taps % self.block:
            raise ValueError(f"reference.taps {config.taps} is not a multiple of reference.block {self.block}")
        self.partitions = config.taps // self.block
        self.resets = 0  # divergences reset so far
        self.reset()

    def reset(self) -> None:
        m, r, b, p = self.mics, self.references, self.block, self.partitions
        self.filters = np.zeros((m, p, r, b + 1), dtype=complex)  # per partition, frequency domain
        self._previous = np.zeros((r, b))  # the references' previous block
        self._spectra = np.zeros((p, r, b + 1), dtype=complex)  # the references' last blocks, newest first
        self._pending = (np.zeros((m, 0)), np.zeros((r, 0)))  # a block begun in the previous segment
        self._power = np.zeros((b + 1, r, r), dtype=complex)  # the references' (cross-)power per bin
        self._blocks = 0  # blocks in the power estimate (its start-up correction)

    @property
    def weights(self) -> np.ndarray:
        """The filters in the time domain, shape = (mics, references, taps)."""
        taps = np.fft.irfft(self.filters, n=2 * self.block, axis=-1)[..., :self.block]  # (m, p, r, block)
        return np.moveaxis(taps, 1, 2).reshape(self.mics, self.references, self.taps)

    def __call__(self, audio: np.ndarray, reference: Optional[np.ndarray] = None) -> np.ndarray:
        """audio: float32, shape = (mics, samples); reference: shape = (references,
        samples). Returns the microphones with the reference's share removed, float32,
        shape = (mics, samples)."""
        if reference is None or reference.shape != (self.references, audio.shape[-1]):
            raise ValueError(f"reference of shape {None if reference is None else reference.shape}; expected "
                             f"{(self.references, audio.shape[-1])}")
        if audio.shape[0] != self.mics:
            raise ValueError(f"audio has {audio.shape[0]} rows, the canceller {self.mics}")
        begun_d, begun_x = self._pending
        done = begun_d.shape[1]  # samples of the first block already returned with the previous segment
        d = np.concatenate([begun_d, audio.astype(np.float64)], axis=1)
        x = np.concatenate([begun_x, reference.astype(np.float64)], axis=1)
        n = self.block
        blocks = d.shape[1] // n
        out = np.empty_like(d)
        for k in range(blocks):
            s = slice(k * n, (k + 1) * n)
            out[:, s] = self._block(d[:, s], x[:, s], adapt=True)
        tail = d.shape[1] - blocks * n
        if tail:  # filtered with the present weights; finished (and adapted on) with the next segment
            pad = n - tail
            d_tail = np.pad(d[:, blocks * n:], ((0, 0), (0, pad)))
            x_tail = np.pad(x[:, blocks * n:], ((0, 0), (0, pad)))
            out[:, blocks * n:] = self._block(d_tail, x_tail, adapt=False)[:, :tail]
        self._pending = (d[:, blocks * n:], x[:, blocks * n:])
        result = out[:, done:]
        gain_db = 10 * np.log10((np.sum(result ** 2, axis=1) + 1e-30) / (np.sum(audio.astype(np.float64) ** 2, axis=1)
                                                                         + 1e-30))
        if not np.all(np.isfinite(result)) or np.any(gain_db > self.config.divergence_db):
            worst = int(np.nanargmax(np.where(np.isfinite(gain_db), gain_db, np.inf)))
            log.warning("reference canceller diverged (mic_%d: output %.1f dB louder than its input, more than "
                        "reference.divergence_db %g): reset, this segment passes through uncancelled",
                        worst, gain_db[worst], self.config.divergence_db)
            self.resets += 1
            self.reset()
            return audio.astype(np.float32, copy=True)
        return result.astype(np.float32)

    def _block(self, d: np.ndarray, x: np.ndarray, adapt: bool) -> np.ndarray:
        """One block: d (mics, block), x (references, block) -> the error d - w * x;
        with ``adapt`` the weights learn from it and the block joins the history."""
        b = self.block
        spectrum = np.fft.rfft(np.concatenate([self._previous, x], axis=1), axis=1)  # (references, block + 1)
        spectra = np.concatenate([spectrum[None], self._spectra[:-1]])  # (partitions, references, block + 1)
        estimate = np.fft.irfft(np.einsum("mprf,prf->mf", self.filters, spectra), n=2 * b, axis=1)[:, b:]
        error = d - estimate
        if not adapt:
            return error
        c = self.config
        errors = np.fft.rfft(np.concatenate([np.zeros_like(error), error], axis=1), axis=1)  # (mics, block + 1)
        lam = c.forgetting
        self._power = lam * self._power + (1 - lam) * np.einsum("rf,sf->frs", spectrum, np.conj(spectrum))
        self._blocks += 1
        power = self._power / (1 - lam ** self._blocks)  # unbiased while it starts
        if c.method == "nlms":
            # Per partition, the sum over the block of e[t] x[t - j]: the per-sample NLMS updates
            # summed. Normalised by the references' power in their strongest bin (x partitions / 2):
            # for white noise that is the energy over the last `taps` samples, as per-sample NLMS
            # has it; for coloured noise it keeps the block update stable where the energy would not.
            peak = np.trace(power, axis1=1, axis2=2).real.max()
            step = c.step_size / (peak * self.partitions / 2 + self.taps * c.regularisation)
            normalised = np.conj(spectra) * step
        else:
            floor = np.trace(power, axis1=1, axis2=2).real.max() / self.references * RLS_FLOOR \
                + 2 * b * c.regularisation
            inverse = np.linalg.inv(power + floor * np.eye(self.references))  # (bins, references, references)
            # Phi^-1 X^* per bin, shared by the partitions: their steps add up to step_size
            normalised = np.einsum("frs,psf->prf", inverse, np.conj(spectra)) * (c.step_size / self.partitions)
        gradient = np.fft.irfft(normalised[None] * errors[:, None, None], n=2 * b, axis=-1)[..., :b]
        self.filters += np.fft.rfft(gradient, n=2 * b, axis=-1)  # constrained to `block` taps per partition
        self._previous, self._spectra = x, spectra
        return error
