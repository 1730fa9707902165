"""Multichannel Wiener filtering of an array separator's output with spatial
covariances learnt where the machines stand.

A machine bolted to the floor reaches the array's microphones by the same paths every
day, so its spatial covariance per frequency (which microphones hear it how loud, with
which delays and reverberation) is a property of the installation. ``train-separator``
in array mode learns it from the recordings of each machine alone on the array and
stores it with the model; the room's own covariance comes from the noise clips
(``calibrate-noise``, recorded on all microphones at once with the machines off), or,
without them, from what the network leaves unexplained in each segment.

Each segment is then filtered as in the local Gaussian model of Duong, Vincent and
Gribonval (2010) with the spatial covariances fixed: the network's estimates give each
source's power per time-frequency bin, and every source's image at every microphone is
the multichannel Wiener filter of the mixture. ``iterations`` > 1 re-estimate the
powers from the filtered images with the covariances held fixed (the simplified EM of
open-unmix's ``norbert``, which re-estimates the covariances too). The filter keeps what the network heard but
places it by where it came from: a fan's blade tone that the network leaves in the
pump's output arrives from the fan's direction and goes back to the fan.

What the network leaves of the mixture is the room's without a cap. It also holds what the
network got wrong, which the room then absorbs (that helps the SI-SDR of sounds the
network knows), and a fault's new tone, which the network never heard in training:
the room takes that too, and the little of it the network gave to a machine decides
which one (in bench_attribution's room, a pump's 25 Hz imbalance tone came out 15 dB
too low in the pump and 15 dB too high in the fan). With ``background_cap``
(``separation.room_headroom`` times the noise clips' power), the room takes no more of
a bin than that and the rest goes to the machines by where it comes from: with
``room_headroom`` 1 the pump's tone came out 1 dB below the truth and the fan's part
of it 8 dB too high instead of 15. Bins in which the rest is a transient of the room
(``TRANSIENT``) are not capped: capped, a loud room's knocks and beeps went to the
machines. docs/benchmarks.md has both ways.

Frames are 2048 samples with a hop of 512 (at 16 kHz, 128 ms and 32 ms).
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch

N_FFT = 2048
HOP = N_FFT // 4
EPS = 1e-6  # diagonal loading of the mixture's covariance, relative to its mean power per bin
# Each machine's power per bin starts at least at this fraction of its share of the
# mixture's (the mixture's power over the number of machines). Where the network hears
# nothing of a machine, as in a sound it never heard in training (a fault), where the
# sound comes from then decides whose it is. In a scratch run in bench_attribution's
# room it cut how much one machine's fault changed the others' log-mel tensors by half
# or more, and bench_separation's SI-SDR did not fall.
POWER_FLOOR = 0.1
# With a cap on the room's power (``background_cap``), bins in which what the network
# leaves is more than this times its median over the segment's frames at that frequency
# are a transient of the room (a knock, a door, a forklift's beep) and stay the room's,
# uncapped: a fault's new sound is steady over a segment, the room's events are not. In
# bench_separation's loud room (the room as loud as the machines), with the room capped
# at its level in the noise clip (room_headroom 1), the array model then separates 2
# machines to 10.85 dB SI-SDRi and 3 to 11.04 (uncapped: 10.75 and 10.96), against 6.95
# and 8.52 when every bin was capped.
TRANSIENT = 4.0


def _window(device=None) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device)


def stft(x: torch.Tensor) -> torch.Tensor:
    """float32 (..., samples) -> complex64 (..., N_FFT // 2 + 1, frames)."""
    shape = x.shape
    X = torch.stft(x.reshape(-1, shape[-1]), N_FFT, HOP, window=_window(x.device), return_complex=True)
    return X.reshape(*shape[:-1], *X.shape[-2:])


def istft(X: torch.Tensor, samples: int) -> torch.Tensor:
    shape = X.shape
    x = torch.istft(X.reshape(-1, *shape[-2:]), N_FFT, HOP, window=_window(X.device), length=samples)
    return x.reshape(*shape[:-2], samples)


def power(audio: np.ndarray) -> torch.Tensor:
    """The mean power per frequency of float32 audio, shape = (mics, samples), at least
    N_FFT samples: float32, shape = (N_FFT // 2 + 1,), averaged over microphones and
    frames, the scale of ``wiener``'s powers."""
    return (stft(torch.as_tensor(np.ascontiguousarray(audio, dtype=np.float32))).abs() ** 2).mean(dim=(0, 2))


def covariance(recordings: Iterable[np.ndarray], channels: int) -> torch.Tensor:
    """The spatial covariance per frequency of one source: complex64, shape = (N_FFT //
    2 + 1, channels, channels), each frequency's trace 1, averaged over the recordings
    (float32, shape = (channels, samples), each at least N_FFT samples) with equal
    weight each. Raises ValueError when none is usable."""
    total, used = None, 0
    for audio in recordings:
        x = torch.as_tensor(np.ascontiguousarray(audio, dtype=np.float32))
        if x.ndim != 2 or x.shape[0] != channels or x.shape[-1] < N_FFT:
            continue
        X = stft(x)
        R = _normalised(torch.einsum("mft,nft->fmn", X, X.conj()))
        total = R if total is None else total + R
        used += 1
    if total is None:
        raise ValueError(f"no recording of {channels} channels and at least {N_FFT} samples")
    return total / used


def similarity(covariances: torch.Tensor) -> np.ndarray:
    """How alike the sources' spatial images are at each frequency: the cosine of each
    two covariances (``covariance``; shape = (sources, N_FFT // 2 + 1, mics, mics)),
    Re tr(R_a R_b) over the product of their Frobenius norms. 1: the same image at every
    microphone, so that where a sound comes from cannot tell the two apart; 0: no
    microphone pair in common. float64, shape = (sources, sources, N_FFT // 2 + 1)."""
    R = covariances.to(torch.complex128)
    inner = torch.einsum("afmn,bfnm->abf", R, R).real  # tr(R_a R_b): >= 0 for Hermitian PSD R
    norm = torch.diagonal(inner, dim1=0, dim2=1).T.clamp_min(1e-30).sqrt()  # (sources, freq)
    return (inner / (norm[:, None] * norm[None, :])).clamp(0.0, 1.0).numpy()


def _normalised(R: torch.Tensor) -> torch.Tensor:
    trace = torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1)
    return R / trace.clamp_min(1e-20)[..., None, None]


def wiener(mix: torch.Tensor, estimates: torch.Tensor, covariances: torch.Tensor,
           background: Optional[torch.Tensor] = None, iterations: int = 1,
           background_cap: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Every source's image at every microphone by the multichannel Wiener filter.

    Parameters
    ----------
    mix : float32 tensor, shape = (mics, samples)
    estimates : float32 tensor, shape = (sources, mics, samples)
        The network's images of the sources: their powers per bin (at least
        ``POWER_FLOOR`` of each one's share of the mixture's) start the filter.
    covariances : complex64 tensor, shape = (sources, N_FFT // 2 + 1, mics, mics)
        The sources' spatial covariances (``covariance``).
    background : complex64 tensor, shape = (N_FFT // 2 + 1, mics, mics), or None
        The room's spatial covariance (``covariance`` of the noise clips). None: that
        of what the estimates leave of the mixture, in this segment.
    iterations : int
        1 or more.
    background_cap : float32 tensor, shape = (N_FFT // 2 + 1,), or None
        The most power per frequency the room may have in a bin, in every iteration
        (``separation.room_headroom`` times ``power`` of the noise clips), except in
        the bins where what the estimates leave of the mixture is a transient
        (``TRANSIENT``). None: the room's power is that of what the estimates leave of
        the mixture, re-estimated in each iteration, however much that is.

    Returns
    -------
    float32 tensor, shape = (sources, mics, samples).
    """
    samples, mics = mix.shape[-1], mix.shape[0]
    X = stft(mix).permute(1, 2, 0)  # (freq, frames, mics)
    Y = stft(estimates).permute(0, 2, 3, 1)  # (sources, freq, frames, mics)
    share = POWER_FLOOR * (X.abs() ** 2).mean(-1) / len(Y)  # (freq, frames)
    Y = torch.cat([Y, (X - Y.sum(0))[None]])  # the room: the rest of the mixture
    room = background if background is not None else _normalised(torch.einsum("ftm,ftn->fmn", Y[-1], Y[-1].conj()))
    R = torch.cat([covariances, room[None]])  # (sources + 1, freq, mics, mics)
    load = EPS * (X.abs() ** 2).mean(dim=(1, 2)).clamp_min(1e-20)  # (freq,)
    eye = torch.eye(mics, dtype=X.dtype, device=X.device)
    if background_cap is not None:  # the bins in which the room's power may be capped
        left = (Y[-1].abs() ** 2).mean(-1)  # (freq, frames): the network's leftover
        cappable = left <= TRANSIENT * left.median(dim=-1, keepdim=True).values
    for k in range(iterations):
        v = (Y.abs() ** 2).mean(-1)  # (sources + 1, freq, frames): power per bin
        if k == 0:
            v[:-1] = torch.maximum(v[:-1], share)
        if background_cap is not None:
            v[-1] = torch.where(cappable, torch.minimum(v[-1], background_cap.to(v.device)[:, None]), v[-1])
        C = torch.einsum("jft,jfmn->ftmn", v.to(X.dtype), R) + load[:, None, None, None] * eye
        Z = torch.linalg.solve(C, X[..., None])[..., 0]  # C^-1 x, (freq, frames, mics)
        Y = v[..., None] * torch.einsum("jfmn,ftn->jftm", R, Z)
    return istft(Y[:-1].permute(0, 3, 1, 2), samples)
