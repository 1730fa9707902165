"""Convolutional autoencoders that score log-mel tensors by how badly they reconstruct.

One autoencoder per source type (pump, fan, ...) is trained on that source's normal
tensors, shape = (1, n_mels, n_frames) in dB re full scale, pooled over microphones. A
narrow bottleneck lets the network reproduce only what it saw in training, so a new
tone, a broadband rattle or a changed level reconstructs worse.

Inputs are standardised per mel band with the mean and standard deviation of that band
in the training tensors (never per tensor: a machine that gets louder must score
differently). Per band, because faults live in few bands: a bearing rings a resonance
at a few kHz where a healthy machine is quiet, imbalance raises the lowest bands; with
one scale for the whole tensor those bands would count for little beside the loud ones.
For the same reason the score is the squared reconstruction error averaged over frames
per band, then over the ``SCORE_BAND_FRACTION`` worst bands, not over the whole tensor
(where a fault in a few bands would be diluted).

A convolutional autoencoder generalises: a tone 12 dB louder than in training, or a
little more energy in many bands at once, is still a tone or a noise floor, and it
reconstructs it well. Yet that is how the commonest faults of one machine show (the 1x
tone of an imbalance, the harmonics of looseness, the hiss of a leak). So each source
also has a ``BandProfile``: the typical level of every band in the calibration tensors
(its median over frames, which a knock or a forklift beep shorter than half the segment
does not move) and how it varies from segment to segment. The few directions along
which all bands move together in normal operation (load, the room's noise level, which
microphone) are learnt and left out; what remains is standardised per band. Each band
gets the autoencoder's error plus the squared profile deviation, both in units of the
calibration spread, and the score averages the worst bands of that sum.

A trained detector is saved as plain data (argument dicts, feature settings, state dicts
and their SHA-256) and loads with ``torch.load(weights_only=True)``; no class is pickled.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import time
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .. import __version__, clock
from ..config import DetectConfig
from ..compute import torch_device
from ..errors import SignalcraftError
from ..files import load_failure, save_torch, storage_error

log = logging.getLogger(__name__)

# 2: per-band normalisation, 3: band profiles, 4: the scorer's kind, 5: Gaussian scorers
# keep one basis matrix (and the ensemble, profile, bands, frames kinds); bump when the saved
# layout changes; older files are refused, not guessed at.
MODEL_FORMAT = 5

N_STAGES = 4  # stride-2 stages: 240 -> 120 -> 60 -> 30 -> 15 bins/frames
DOWNSAMPLING = 2**N_STAGES  # n_mels and n_frames must be multiples of this
KERNEL = 4  # with stride 2 and padding 1 a conv halves and a transposed conv doubles exactly
MAX_GROUPS = 8  # GroupNorm groups per layer (fewer when the width is not a multiple)
LEAKY_SLOPE = 0.2
MIN_STD_DB = 1.0  # dB; floor for a band's normalisation std (a silent band is all floor_db)
SCORE_BAND_FRACTION = 0.1  # the score averages the error of this fraction of worst mel bands
# Band profiles: directions of common normal variation left out (at most one per 4
# calibration tensors, so a small calibration keeps enough data for the spread), and a
# floor for a band's spread (tensors alike in a band would otherwise flag any change).
PROFILE_COMPONENTS = 4
TENSORS_PER_COMPONENT = 4
MIN_PROFILE_STD_DB = 0.5  # dB
# A band's spread from a few calibration tensors is itself noisy (from 3 tensors it is
# often a third of the true one, and that band then flags every segment): it is shrunk
# towards the median spread of all bands as if that were worth this many more tensors
# (moderated variance, as in limma). With the default 60 segments it changes little.
PROFILE_PRIOR_DOF = 4
LOGGED_EPOCHS = 5  # progress lines per source in the log while an autoencoder trains
SCORE_BATCH = 32  # tensors per forward pass when scoring (about 60 MB of activations on CPU)
RETRAIN = "retrain it with `signalcraft train-detector`"


class DetectorError(SignalcraftError):
    """A detector file is missing, corrupt or does not fit the data; or bad input to it."""


@dataclasses.dataclass(frozen=True)
class AutoencoderArgs:
    """Plain data that rebuilds a ``ConvAutoencoder`` (saved with the weights)."""

    n_mels: int = 240  # input height, mel bands; a multiple of DOWNSAMPLING
    n_frames: int = 240  # input width, frames; a multiple of DOWNSAMPLING
    channels: int = 16  # width of the first conv layer; doubles per stage
    # Bottleneck width at 1/16 resolution: 8 x 15 x 15 values for a 240 x 240 tensor
    # (32x fewer than the input), too few to learn the identity.
    latent_channels: int = 8

    def __post_init__(self):
        for name in ("n_mels", "n_frames"):
            value = getattr(self, name)
            if value < DOWNSAMPLING or value % DOWNSAMPLING:
                raise ValueError(f"{name} must be a positive multiple of {DOWNSAMPLING}, got {value}")
        if self.channels < 1 or self.latent_channels < 1:
            raise ValueError("channels and latent_channels must be positive")


def _norm(width: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: it behaves the same in training and eval, with batches of
    # a few tensors and a model trained on only ~60 of them.
    return nn.GroupNorm(math.gcd(width, MAX_GROUPS), width)


class ConvAutoencoder(nn.Module):
    """Maps normalised tensors of shape = (batch, 1, n_mels, n_frames) to the same shape.

    Encoder: N_STAGES stride-2 convolutions 1 -> c -> 2c -> 4c -> 8c, each with GroupNorm
    and LeakyReLU, then a 1x1 convolution to ``latent_channels``. The decoder mirrors it
    with transposed convolutions; the last layer is linear (outputs are normalised dB).
    """

    def __init__(self, args: AutoencoderArgs):
        super().__init__()
        self.args = args
        widths = [1] + [args.channels * 2**i for i in range(N_STAGES)]
        encoder: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            encoder += [nn.Conv2d(w_in, w_out, KERNEL, stride=2, padding=1), _norm(w_out), nn.LeakyReLU(LEAKY_SLOPE)]
        encoder.append(nn.Conv2d(widths[-1], args.latent_channels, 1))
        decoder: list[nn.Module] = [nn.Conv2d(args.latent_channels, widths[-1], 1), _norm(widths[-1]),
                                    nn.LeakyReLU(LEAKY_SLOPE)]
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]):
            decoder.append(nn.ConvTranspose2d(w_in, w_out, KERNEL, stride=2, padding=1))
            if w_out != 1:
                decoder += [_norm(w_out), nn.LeakyReLU(LEAKY_SLOPE)]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@dataclasses.dataclass(frozen=True)
class BandProfile:
    """The typical level of each mel band of one source in normal operation.

    A tensor's profile is the median over frames of each band, dB, shape = (n_mels,).
    ``mean`` is the calibration profiles' mean; ``components`` (k, n_mels), orthonormal,
    are the k directions along which they varied most (all bands louder with the load or
    the room, another microphone), which the deviation leaves out; ``std`` (n_mels,) is
    the spread per band of what those directions leave (moderated towards the median
    band's, ``PROFILE_PRIOR_DOF``), dB, at least ``MIN_PROFILE_STD_DB``.
    """

    mean: torch.Tensor
    components: torch.Tensor
    std: torch.Tensor

    @staticmethod
    def of(tensors: torch.Tensor) -> torch.Tensor:
        """Profiles of tensors of shape = (N, 1, n_mels, n_frames): float64 dB, shape = (N, n_mels)."""
        return median_over_frames(tensors)

    @classmethod
    def fit(cls, tensors: torch.Tensor) -> "BandProfile":
        """From normal tensors, shape = (N, 1, n_mels, n_frames), N >= 1."""
        p = cls.of(tensors)
        n = p.shape[0]
        mean = p.mean(dim=0)
        centred = p - mean
        k = min(PROFILE_COMPONENTS, (n - 1) // TENSORS_PER_COMPONENT)
        components = torch.linalg.svd(centred, full_matrices=False).Vh[:k] if k > 0 else p.new_zeros((0, p.shape[1]))
        residual = centred - centred @ components.T @ components
        dof = n - 1 - k  # each fitted direction takes one degree of freedom from the spread
        if dof > 0:
            var = residual.pow(2).sum(dim=0) / dof
            var = (dof * var + PROFILE_PRIOR_DOF * var.median()) / (dof + PROFILE_PRIOR_DOF)
        else:
            var = torch.zeros_like(mean)
        # Contiguous, as a loaded profile is: the same memory layout gives the same rounding.
        return cls(mean.float(), components.float().contiguous(), var.sqrt().clamp_min(MIN_PROFILE_STD_DB).float())

    def deviation(self, tensors: torch.Tensor) -> torch.Tensor:
        """Squared standardised deviation per band of each tensor's profile from normal,
        the common directions left out: float64, shape = (N, n_mels); about 1 per band
        for a normal tensor."""
        return _deviation(tensors, self.mean.double(), self.components.double(), self.std.double())

    def module(self) -> "ProfileDeviation":
        """``deviation`` as an ``nn.Module`` (for export)."""
        return ProfileDeviation(self)

    def to_data(self) -> dict[str, list]:
        return {"mean": self.mean.tolist(), "components": self.components.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_data(cls, data: dict[str, list], n_mels: int) -> "BandProfile":
        mean = torch.tensor(data["mean"], dtype=torch.float32)
        std = torch.tensor(data["std"], dtype=torch.float32)
        components = torch.tensor(data["components"], dtype=torch.float32).reshape(-1, n_mels)
        if mean.shape != (n_mels,) or std.shape != (n_mels,) or not bool((std > 0).all()) \
                or not all(bool(torch.isfinite(t).all()) for t in (mean, std, components)):
            raise ValueError(f"band profile does not have {n_mels} bands with finite levels and positive spreads")
        return cls(mean, components, std)


def _deviation(tensors: torch.Tensor, mean: torch.Tensor, components: torch.Tensor, std: torch.Tensor
               ) -> torch.Tensor:
    """Squared standardised deviation per band of each tensor's profile, the common
    directions left out (``BandProfile.deviation``; float64 ``mean``, ``components``, ``std``)."""
    centred = median_over_frames(tensors) - mean
    residual = centred - centred @ components.T @ components
    return (residual / std).pow(2)


def median_over_frames(tensors: torch.Tensor) -> torch.Tensor:
    """(N, 1, n_mels, n_frames) -> float64 (N, n_mels): the lower median of each band over
    frames, the value ``torch.median`` gives, by a sort (which ONNX has; a median it has not)."""
    n_frames = tensors.shape[-1]
    return tensors[:, 0].double().sort(dim=2).values[:, :, (n_frames - 1) // 2]


class ProfileDeviation(nn.Module):
    """``BandProfile.deviation`` as a module: tensors -> float64 (N, n_mels)."""

    def __init__(self, profile: BandProfile):
        super().__init__()
        self.register_buffer("mean", profile.mean.double())
        self.register_buffer("components", profile.components.double())
        self.register_buffer("std", profile.std.double())

    def forward(self, tensors: torch.Tensor) -> torch.Tensor:
        return _deviation(tensors, self.mean, self.components, self.std)


class WorstBands(nn.Module):
    """Per-band values (N, n_mels) -> the mean of the worst ``fraction`` of bands, (N,)."""

    def __init__(self, n_mels: int, fraction: float = SCORE_BAND_FRACTION):
        super().__init__()
        self.worst = max(1, round(fraction * n_mels))

    def forward(self, per_band: torch.Tensor) -> torch.Tensor:
        return per_band.topk(self.worst, dim=1).values.mean(dim=1)


class AutoencoderScore(nn.Module):
    """The ``autoencoder`` kind's whole scoring path for one source, float32 dB tensors
    (N, 1, n_mels, n_frames) -> float64 scores (N,): ``Detector.score`` as one module."""

    def __init__(self, model: "ConvAutoencoder", norm: tuple[torch.Tensor, torch.Tensor], profile: BandProfile):
        super().__init__()
        self.model = model
        self.register_buffer("norm_mean", norm[0].float().view(1, 1, -1, 1))
        self.register_buffer("norm_std", norm[1].float().view(1, 1, -1, 1))
        self.profile = profile.module()
        self.worst = WorstBands(model.args.n_mels)

    def forward(self, tensors: torch.Tensor) -> torch.Tensor:
        xn = (tensors - self.norm_mean) / self.norm_std
        per_band = (self.model(xn) - xn).double().pow(2).mean(dim=(1, 3)) + self.profile(tensors)
        return self.worst(per_band)


@dataclasses.dataclass
class Detector:
    """One autoencoder and one band profile per source type, shared across microphones:
    the scorer of kind ``autoencoder`` (``scorers.SCORERS``)."""

    kind: typing.ClassVar[str] = "autoencoder"
    # Cross-fitting for the levels trains this many models on parts of the calibration
    # data: each autoencoder costs a full training, so two.
    cross_fit_folds: typing.ClassVar[int] = 2

    models: dict[str, ConvAutoencoder]  # source name -> model, in eval mode
    norm: dict[str, tuple[torch.Tensor, torch.Tensor]]  # source -> per-band (mean, std), dB, shape = (n_mels,)
    args: AutoencoderArgs
    features: dict  # LogMel.settings() of the training data
    trained_on: dict  # plain data: source -> tensors, date, epochs, final loss, ...
    profiles: dict[str, BandProfile]  # source -> typical band levels

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.models)

    @classmethod
    def fit(cls, tensors_by_source: dict[str, torch.Tensor], features: dict, config: DetectConfig) -> "Detector":
        """Train on normal tensors (``train_detector_models``)."""
        return train_detector_models(tensors_by_source, features, config, device=config.device)

    def to_data(self) -> dict[str, Any]:
        """Plain data that ``from_data`` rebuilds this detector from."""
        states = {s: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for s, m in self.models.items()}
        return {
            "args": dataclasses.asdict(self.args),
            "features": dict(self.features),
            "norm": {s: [m.tolist(), sd.tolist()] for s, (m, sd) in self.norm.items()},
            "profiles": {s: p.to_data() for s, p in self.profiles.items()},
            "trained_on": self.trained_on,
            "state_dicts": states,
            "sha256": {s: _state_sha256(state) for s, state in states.items()},
        }

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> "Detector":
        """The detector ``to_data`` gave; DetectorError or another exception when damaged."""
        args = AutoencoderArgs(**data["args"])
        models, norm, profiles = {}, {}, {}
        for source, state in data["state_dicts"].items():
            if _state_sha256(state) != data["sha256"][source]:
                raise DetectorError(f"the weights of source {source!r} fail their checksum (the file is damaged). "
                                    f"Restore the file or {RETRAIN}.")
            model = ConvAutoencoder(args)
            model.load_state_dict(state)
            models[source] = model.eval()
            mean, std = data["norm"][source]
            norm[source] = (torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))
            if norm[source][0].shape != (args.n_mels,) or norm[source][1].shape != (args.n_mels,):
                raise ValueError(f"normalisation of {source!r} does not have {args.n_mels} bands")
            profiles[source] = BandProfile.from_data(data["profiles"][source], args.n_mels)
        return cls(models=models, norm=norm, args=args, features=dict(data["features"]),
                   trained_on=dict(data["trained_on"]), profiles=profiles)

    def score(self, source: str, tensors: torch.Tensor) -> np.ndarray:
        """Anomaly scores: per mel band, the squared reconstruction error of each
        standardised tensor averaged over frames plus the squared deviation of the band's
        level from the band profile; then the mean over the worst
        ``SCORE_BAND_FRACTION`` of bands.

        Parameters
        ----------
        source : str
            A source this detector was trained on.
        tensors : torch.Tensor
            float32 dB, shape = (N, 1, n_mels, n_frames). Not modified.

        Returns
        -------
        np.ndarray
            float64, shape = (N,). Higher is more abnormal; both terms are in units of the
            spread of the training data in each band (a normal tensor scores a few). A
            non-finite input gives a non-finite score.

        Raises
        ------
        DetectorError
            ``source`` is unknown, or the tensors have the wrong shape.
        """
        model, x = scoring_input(self.models, source, tensors, (self.args.n_mels, self.args.n_frames))
        if x.shape[0] == 0:
            return np.zeros(0, np.float64)
        device = next(model.parameters()).device
        path = self._scoring_path(source).to(device)  # shares the model's weights, where they are
        with torch.no_grad():
            return torch.cat([path(batch.to(device, torch.float32)).cpu() for batch in x.split(SCORE_BATCH)]).numpy()

    def _scoring_path(self, source: str) -> "AutoencoderScore":
        self.models[source].eval()
        return AutoencoderScore(self.models[source], self.norm[source], self.profiles[source]).eval()

    def scoring_module(self, source: str) -> nn.Module:
        """The scoring path of ``source`` as one module (``AutoencoderScore``), a copy on
        the CPU (the detector's own model stays where it is)."""
        return copy.deepcopy(self._scoring_path(source)).cpu().eval()


def scoring_input(models: dict, source: str, tensors, size: tuple[int, int]) -> tuple[Any, torch.Tensor]:
    """(the model of ``source``, ``tensors`` as a tensor), checked for any detector kind.

    Raises
    ------
    DetectorError
        No model for ``source``, or tensors not of shape (N, 1, n_mels, n_frames) = ``size``.
    """
    model = models.get(source)
    if model is None:
        raise DetectorError(
            f"no detector model for source {source!r} (this detector knows: {', '.join(sorted(models)) or 'none'}). "
            f"Score one of those sources, or {RETRAIN} on data that includes {source!r}."
        )
    x = torch.as_tensor(tensors)
    expected = (1, *size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise DetectorError(
            f"source {source!r}: cannot score tensors of shape {tuple(x.shape)}; the detector expects "
            f"(N, {', '.join(map(str, expected))}). Stack the exported (1, n_mels, n_frames) tensors with "
            f"torch.stack, or {RETRAIN} if the feature settings changed."
        )
    return model, x


def _check_training_tensors(tensors_by_source: dict[str, torch.Tensor], features: dict,
                            multiple: int = DOWNSAMPLING) -> tuple[int, int]:
    """The common (n_mels, n_frames) of all sources' tensors, each a multiple of
    ``multiple``; DetectorError if they do not fit."""
    if not tensors_by_source:
        raise DetectorError("no training tensors: record some segments of every machine first, then train again.")
    shapes = {}
    for source, x in tensors_by_source.items():
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[0] < 1:
            raise DetectorError(
                f"source {source!r}: training tensors of shape {tuple(x.shape)}; expected (N, 1, n_mels, n_frames) "
                "with N >= 1 (stack the exported tensors with torch.stack)."
            )
        if not torch.isfinite(x).all():
            raise DetectorError(f"source {source!r}: the training tensors contain NaN or infinite values; "
                                "remove the damaged segments and train again.")
        shapes[source] = tuple(x.shape[2:])
    if len(set(shapes.values())) > 1:
        raise DetectorError(f"training tensors differ in shape between sources: {shapes}; "
                            "all must come from the same feature settings.")
    n_mels, n_frames = next(iter(shapes.values()))
    for key, value in (("n_mels", n_mels), ("n_frames", n_frames)):
        if key in features and features[key] != value:
            raise DetectorError(f"features say {key} = {features[key]} but the tensors have {value}; "
                                "pass the settings the tensors were made with.")
        if value % multiple:
            raise DetectorError(
                f"{key} = {value} is not a multiple of {DOWNSAMPLING}, which the autoencoder's {N_STAGES} "
                f"halvings need; set features.{key} to a multiple of {DOWNSAMPLING} (240 is one)."
            )
    return n_mels, n_frames


def fit_sources(kind: str, tensors_by_source: dict[str, torch.Tensor], features: dict,
                fit_one: Callable[[torch.Tensor, int, int], Any]) -> tuple[dict, int, int, dict, dict]:
    """Fit one model per source with ``fit_one(x, n_mels, n_frames)``, x the source's
    float32 CPU tensors, shape = (N, 1, n_mels, n_frames), N >= 2.

    Returns
    -------
    tuple
        (source -> model, n_mels, n_frames, the feature settings, source -> tensors, date
        and seconds taken).

    Raises
    ------
    DetectorError
        No sources, fewer than 2 tensors of a source, wrong shapes, non-finite values.
    """
    features = dict(features or {})
    n_mels, n_frames = _check_training_tensors(tensors_by_source, features, multiple=1)
    models, trained_on = {}, {}
    for source in sorted(tensors_by_source):
        x = tensors_by_source[source].detach().to("cpu", torch.float32)
        if x.shape[0] < 2:
            raise DetectorError(f"source {source!r}: {x.shape[0]} tensor to fit on; the {kind} scorer needs at least 2.")
        began = time.monotonic()
        with torch.no_grad():
            models[source] = fit_one(x, n_mels, n_frames)
        trained_on[source] = {"tensors": int(x.shape[0]), "date": clock.now().isoformat(timespec="seconds"),
                              "seconds": round(time.monotonic() - began, 3)}
    return models, n_mels, n_frames, features, trained_on


def train_detector_models(
    tensors_by_source: dict[str, torch.Tensor],
    features: dict,
    config: DetectConfig,
    progress: Optional[bool] = None,
    device: str = "auto",
) -> Detector:
    """Train one autoencoder per source on its normal tensors.

    Each source's model starts from ``torch.manual_seed(seed)`` and sees its
    tensors in an order drawn from a generator with the same seed, so a model does not
    depend on which other sources are trained, and training is repeatable on CPU (CUDA
    kernels may differ in the last bits).

    Parameters
    ----------
    tensors_by_source : dict[str, torch.Tensor]
        source -> float32 dB tensors, shape = (N, 1, n_mels, n_frames), all
        microphones pooled. Not modified.
    features : dict
        ``LogMel.settings()`` of the tensors; saved with the detector and checked on load.
        Its n_mels and n_frames, when present, must match the tensors.
    config : DetectConfig
        ``scorer.autoencoder`` (channels, epochs, batch_size, learning_rate, seed) is used.
    progress : bool or None
        A progress bar per source with the loss; None: only when stderr is a terminal.
    device : str
        auto (CUDA when present), cuda or cpu. The returned models are on the CPU.

    Raises
    ------
    DetectorError
        No sources, tensors of the wrong shape or with non-finite values, or sizes that
        the autoencoder cannot halve four times.
    """
    from tqdm import tqdm

    features = dict(features or {})  # a manifest without settings: nothing to check against
    n_mels, n_frames = _check_training_tensors(tensors_by_source, features)
    ae = config.scorer.autoencoder
    args = AutoencoderArgs(n_mels=n_mels, n_frames=n_frames, channels=ae.channels)
    dev = torch_device(device, "device")
    models, norm, trained_on, profiles = {}, {}, {}, {}
    for source in sorted(tensors_by_source):
        x = tensors_by_source[source].detach().to("cpu", torch.float32)
        n = x.shape[0]
        # One (mean, std) per mel band over every tensor and frame: the level of each
        # tensor stays in the data.
        mean = x.double().mean(dim=(0, 1, 3)).float()
        std = (x.double().std(dim=(0, 1, 3)).float() if n * n_frames > 1 else torch.zeros_like(mean))
        std = std.clamp_min(MIN_STD_DB)
        xn = (x - mean.view(1, 1, -1, 1)) / std.view(1, 1, -1, 1)
        torch.manual_seed(ae.seed)
        order = torch.Generator().manual_seed(ae.seed)
        model = ConvAutoencoder(args).to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=ae.learning_rate)
        model.train()
        began = time.monotonic()
        loss_value = math.nan
        bar = tqdm(range(ae.epochs), desc=f"{source}", unit="epoch", leave=False,
                   disable=not progress if progress is not None else None)
        every = max(1, ae.epochs // LOGGED_EPOCHS)
        for epoch in bar:
            total = 0.0
            for idx in torch.randperm(n, generator=order).split(ae.batch_size):
                batch = xn[idx].to(dev)
                loss = nn.functional.mse_loss(model(batch), batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            loss_value = total / n
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if epoch == 0 or (epoch + 1) % every == 0:
                # In the log too: from cron the first training would otherwise be silent.
                elapsed = time.monotonic() - began
                log.info("detector for %s: epoch %d of %d, loss %.4f, about %.0f s left for this source", source,
                         epoch + 1, ae.epochs, loss_value, elapsed / (epoch + 1) * (ae.epochs - epoch - 1))
        bar.close()
        seconds = time.monotonic() - began
        model.cpu().eval()
        models[source], norm[source] = model, (mean, std)
        profiles[source] = BandProfile.fit(x)
        trained_on[source] = {
            "tensors": n,
            "date": clock.now().isoformat(timespec="seconds"),
            "epochs": ae.epochs,
            "batch_size": ae.batch_size,
            "learning_rate": ae.learning_rate,
            "seed": ae.seed,
            "final_loss": loss_value,
            "seconds": round(seconds, 3),
            "device": str(dev),
        }
        log.info("detector for %s: %d tensors, %d epochs, final loss %.4f, %.1f s on %s", source, n,
                 ae.epochs, loss_value, seconds, dev)
    return Detector(models=models, norm=norm, args=args, features=features, trained_on=trained_on,
                    profiles=profiles)


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_detector(detector, path: Path) -> Path:
    """Write a detector of any kind (``scorers.SCORERS``) to ``path`` as plain data,
    atomically.

    The file holds ``format``, ``kind``, ``signalcraft_version`` and what the kind's
    ``to_data()`` gives (for ``autoencoder``: ``args``, ``features``, ``norm``,
    ``profiles``, ``trained_on``, ``state_dicts`` and their ``sha256``); it loads with
    ``torch.load(weights_only=True)``. A previous file at ``path`` stays intact until the
    new one is complete.

    Raises
    ------
    StorageError
        The folder cannot be created or written; the message names the file.
    """
    path = Path(path)
    data = {"format": MODEL_FORMAT, "kind": detector.kind, "signalcraft_version": __version__, **detector.to_data()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(path, e) from None
    return save_torch(path, data)


def _differences(stored: dict, given: dict) -> list[str]:
    missing = "<missing>"
    return [
        f"{key}: model {stored.get(key, missing)}, data {given.get(key, missing)}"
        for key in sorted(set(stored) | set(given), key=str)
        if stored.get(key, missing) != given.get(key, missing)
    ]


def load_detector(path: Path, features: Optional[dict] = None):
    """Read a detector written by ``save_detector`` (with ``weights_only=True``), of the
    kind its file records.

    Parameters
    ----------
    path : Path
        The detector file.
    features : dict or None
        ``LogMel.settings()`` of the data to be scored. When given, every setting must
        equal the one the detector was trained on.

    Raises
    ------
    DetectorError
        The file is missing, unreadable or damaged (checksum), of an unknown format or
        kind, or trained on other feature settings (the message lists them). Each names
        the file.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DetectorError(f"{path}: detector model not found. Train one with `signalcraft train-detector`, "
                            "or set detect.model to the file.") from None
    except Exception as e:  # a damaged file fails inside torch.load in many ways
        raise DetectorError(f"{path}: not a readable detector model ({load_failure(e)}). "
                            f"Restore the file or {RETRAIN}.") from None
    if not isinstance(data, dict) or "format" not in data:
        raise DetectorError(f"{path}: not a signalcraft detector model (no format field). "
                            f"Check detect.model, or {RETRAIN}.")
    if data["format"] != MODEL_FORMAT:
        raise DetectorError(
            f"{path}: detector format {data['format']!r} (written by signalcraft "
            f"{data.get('signalcraft_version', '?')}); this signalcraft {__version__} reads format {MODEL_FORMAT}. "
            f"Use the matching signalcraft, or {RETRAIN}."
        )
    from .recalibrated import RecalibratedDetector
    from .scorers import SCORERS

    kinds = {**SCORERS, RecalibratedDetector.kind: RecalibratedDetector}
    kind = data.get("kind")
    if kind not in kinds:
        raise DetectorError(f"{path}: a detector of kind {kind!r}, which this signalcraft does not know "
                            f"(it knows {', '.join(SCORERS)}). Use the signalcraft that wrote it, or {RETRAIN}.")
    try:
        detector = kinds[kind].from_data(data)
    except DetectorError as e:
        raise DetectorError(f"{path}: {e}") from None
    except Exception as e:
        raise DetectorError(f"{path}: damaged detector model ({type(e).__name__}: {e}). "
                            f"Restore the file or {RETRAIN}.") from None
    if features is not None:
        diffs = _differences(detector.features, dict(features))
        if diffs:
            raise DetectorError(
                f"{path}: the detector was trained on other feature settings than the data "
                f"({'; '.join(diffs)}). Its scores would be meaningless: {RETRAIN} on the current data."
            )
    return detector
