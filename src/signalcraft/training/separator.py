"""Train a Demucs separator on isolated recordings of each machine.

Training data layout (``signalcraft simulate --training-set`` writes it; real
recordings can be dropped in the same way)::

    DATA_DIR/
      pump/        isolated recordings of one machine type: *.wav or *.flac
      fan/         one folder per source; the folder names become the model's sources
      _noise/      optional: room background without machines, mixed in as interference

With ``train_separator.array: false`` (one microphone at a time) multichannel files
contribute each channel as a separate recording, and the model is mono. With ``array:
true`` every file must have one channel per microphone of the array (in the order of
``capture.channels``), each machine recorded alone on the whole array where it stands:
the model takes all microphones as its input channels and returns every source at every
microphone, so where a machine is (which microphones hear it first and loudest) helps
to separate it. Files at another sample rate are resampled (with a note in the log). Mixtures are made on the fly: for
each example every source gets a random excerpt of a random recording, a random gain
(and is sometimes left out), and background noise is added at a random level. Whole recordings
(the last ``validation_fraction`` of each folder, at least one) are held out for
validation, or the end of the only recording: validation mixtures never reuse training
audio.

The model sees each mixture scaled to unit standard deviation (over all its channels:
the level differences between microphones stay), as ``separate.Separator`` scales its
input at inference. The loss is the L1 distance of the waveforms, as in demucs, or
(``loss: snr``) each source's soft-thresholded negative SNR; validation reports the
scale-invariant SDR of the separated sources and its improvement over the unprocessed
mixture (SI-SDRi).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Config, TrainSeparatorConfig
from ..compute import torch_device
from ..errors import ConfigError, SignalcraftError, StorageError
from ..files import load_failure, save_torch

log = logging.getLogger(__name__)

NOISE_DIR = "_noise"
AUDIO_SUFFIXES = (".wav", ".flac")
CHECKPOINT_FORMAT = 1


class TrainingDataError(SignalcraftError):
    """The training data folder is missing, empty or unreadable."""


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Recordings per source, split into training and validation parts.

    Each list holds float32 arrays, shape = (channels, samples), at ``sample_rate``:
    ``channels`` is 1, or the array's microphones in array mode.
    """

    sources: tuple[str, ...]
    train: tuple[list[np.ndarray], ...]  # per source
    valid: tuple[list[np.ndarray], ...]
    noise_train: list[np.ndarray]
    noise_valid: list[np.ndarray]
    sample_rate: int
    channels: int = 1  # the model's audio channels


@dataclasses.dataclass(frozen=True)
class TrainResult:
    model_path: Path
    sources: tuple[str, ...]
    epochs: int
    steps: int
    seconds: float  # training wall time, all runs of this checkpoint together
    best_si_sdr: float  # dB, validation
    best_si_sdri: float  # dB, validation improvement over the mixture
    stopped_because: str


def _read_recordings(folder: Path, sample_rate: int, array: bool = False) -> list[list[np.ndarray]]:
    """Per file, its recordings as float32 arrays, shape = (channels, samples), at
    ``sample_rate``: each channel alone (channels 1), or with ``array`` the whole file."""
    import soundfile as sf

    from ..audio_backend import torchaudio

    out = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
        try:
            audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            raise TrainingDataError(f"{path}: cannot read as audio ({e}). Remove or replace it.") from None
        audio = audio.T  # (channels, samples)
        if rate != sample_rate:
            log.info("%s: %d Hz, resampled to %d Hz", path, rate, sample_rate)
            audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, sample_rate).numpy()
        out.append([np.ascontiguousarray(audio)] if array else [np.ascontiguousarray(c[None]) for c in audio])
    return out


def load_training_data(data_dir: Path, sample_rate: int, config: TrainSeparatorConfig) -> TrainingData:
    """Read DATA_DIR (see module docstring) and hold out validation audio.

    Raises
    ------
    TrainingDataError
        The folder is missing, has fewer than two sources, a source folder holds no
        audio, a file is unreadable, or a recording is too short to split.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainingDataError(f"{data_dir}: training data folder not found. It needs one folder per machine "
                                "type with isolated recordings (see `signalcraft train-separator --help`).")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and p.name != NOISE_DIR and not p.name.startswith("."))
    if len(folders) < 2:
        raise TrainingDataError(
            f"{data_dir}: found {len(folders)} source folder(s) ({', '.join(p.name for p in folders) or 'none'}); "
            "separation needs at least two machine types, each in its own folder."
        )
    segment = round(config.segment_seconds * sample_rate)
    train, valid = [], []
    widths: dict[int, Path] = {}
    for folder in folders:
        recordings = _read_recordings(folder, sample_rate, config.array)
        if not recordings:
            raise TrainingDataError(f"{folder}: no .wav or .flac recordings. Add some or remove the folder.")
        for file_recordings in recordings:
            widths.setdefault(file_recordings[0].shape[0], folder)
        t, v = _split(recordings, config.validation_fraction, segment, folder)
        train.append(t)
        valid.append(v)
    noise_train, noise_valid = [], []
    noise = _read_recordings(data_dir / NOISE_DIR, sample_rate, config.array) if (data_dir / NOISE_DIR).is_dir() else []
    for file_recordings in noise:
        widths.setdefault(file_recordings[0].shape[0], data_dir / NOISE_DIR)
    if len(widths) > 1:
        raise TrainingDataError(
            f"{data_dir}: train_separator.array is true, but the recordings have different numbers of channels "
            f"({', '.join(f'{n} in {p.name}' for n, p in sorted(widths.items()))}). Each file must hold one "
            "channel per microphone of the array, in the order of capture.channels.")
    if noise:
        try:
            noise_train, noise_valid = _split(noise, config.validation_fraction, segment, data_dir / NOISE_DIR)
        except TrainingDataError:
            # Background is interference, never scored: too little to split is still usable.
            noise_train = noise_valid = [c for f in noise for c in f if c.shape[-1] >= segment]
            log.warning("%s: too little background to hold some out; validation uses the same", data_dir / NOISE_DIR)
    log.info("training data: sources %s, %s training and %s validation recordings, %d noise recordings",
             [f.name for f in folders], [len(t) for t in train], [len(v) for v in valid], len(noise_train))
    channels = next(iter(widths)) if config.array else 1
    if config.array:
        log.info("array mode: one model for %d microphones", channels)
    return TrainingData(tuple(f.name for f in folders), tuple(train), tuple(valid), noise_train, noise_valid,
                        sample_rate, channels)


def _split(files: list[list[np.ndarray]], fraction: float, segment: int, folder: Path):
    """Hold out whole files (the last ``fraction`` of them, at least one, never all) when
    there are several, else the last ``fraction`` of the only one. The channels of a
    file stay on one side. Channels shorter than a training excerpt are skipped."""
    usable = [[c for c in f if c.shape[-1] >= segment] for f in files]
    usable = [f for f in usable if f]
    skipped = sum(len(f) for f in files) - sum(len(f) for f in usable)
    if skipped:
        log.warning("%s: %d recordings shorter than one training excerpt (%d samples) skipped", folder,
                    skipped, segment)
    if len(usable) >= 2:
        held = min(len(usable) - 1, max(1, round(len(usable) * fraction)))
        return [c for f in usable[:-held] for c in f], [c for f in usable[-held:] for c in f]
    if len(usable) == 1 and min(c.shape[-1] for c in usable[0]) * fraction >= segment:
        cuts = [round(c.shape[-1] * (1 - fraction)) for c in usable[0]]
        return [c[:, :k] for c, k in zip(usable[0], cuts)], [c[:, k:] for c, k in zip(usable[0], cuts)]
    raise TrainingDataError(
        f"{folder}: not enough audio to train and validate: needs two recordings of at least "
        f"{segment} samples (one training excerpt), or one of at least {math.ceil(segment / fraction)}. "
        "Add recordings."
    )


class MixtureSampler:
    """Random mixtures and their sources from per-source recordings.

    ``sample(n)`` returns (mix, sources): float32 tensors of shape = (n, channels,
    samples) and (n, n_sources, channels, samples), both divided by the mixture's
    standard deviation. A source's gain is the same on every channel.
    """

    def __init__(self, recordings, noise, samples: int, config: TrainSeparatorConfig, rng: np.random.Generator):
        self.recordings, self.noise, self.samples, self.config, self.rng = recordings, noise, samples, config, rng

    def _excerpt(self, pool: list[np.ndarray]) -> np.ndarray:
        clip = pool[self.rng.integers(len(pool))]
        start = self.rng.integers(0, clip.shape[-1] - self.samples + 1)
        return clip[:, start:start + self.samples]

    def sample(self, n: int, all_active: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        c, S = self.config, len(self.recordings)
        channels = self.recordings[0][0].shape[0]
        sources = np.zeros((n, S, channels, self.samples), np.float32)
        mix = np.zeros((n, channels, self.samples), np.float32)
        for i in range(n):
            active = np.ones(S, bool) if all_active else self.rng.random(S) >= c.silent_probability
            if not active.any():
                active[self.rng.integers(S)] = True
            for s in np.flatnonzero(active):
                x = self._excerpt(self.recordings[s])
                rms = np.sqrt(np.mean(x ** 2)) + 1e-8
                sources[i, s] = x / rms * 10 ** (self.rng.uniform(-c.gain_db, c.gain_db) / 20)
            mix[i] = sources[i].sum(0)
            if self.noise:
                noise = self._excerpt(self.noise)
                snr = self.rng.uniform(*c.noise_snr_db)
                gain = np.sqrt(np.mean(mix[i] ** 2) / (np.mean(noise ** 2) + 1e-12)) * 10 ** (-snr / 20)
                mix[i] += gain * noise
            scale = mix[i].std() + 1e-8
            mix[i] /= scale
            sources[i] /= scale
        return torch.from_numpy(mix), torch.from_numpy(sources)


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB over the last axis; shapes must match."""
    reference = reference - reference.mean(-1, keepdim=True)
    estimate = estimate - estimate.mean(-1, keepdim=True)
    alpha = (estimate * reference).sum(-1, keepdim=True) / ((reference ** 2).sum(-1, keepdim=True) + eps)
    target = alpha * reference
    return 10 * torch.log10(((target ** 2).sum(-1) + eps) / (((estimate - target) ** 2).sum(-1) + eps))


SNR_THRESHOLD = 1e-3  # soft threshold of the snr loss: 30 dB below the source's power


def snr_loss(estimate: torch.Tensor, reference: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Mean over sources and channels of 10 log10(|s - est|^2 + tau |s|^2 + eps), less
    10 log10(|s|^2 + eps): the negative SNR of each estimate, soft-thresholded so that
    errors 30 dB (tau) below the source and the mixture no longer count. ``eps`` is tau
    times the mixture's power, so a silent source is pushed towards silence with a
    bounded loss (after Wisdom et al., "Unsupervised sound separation using mixture
    invariant training", 2020). Shapes: (batch, sources, channels, samples) and (batch,
    channels, samples) for ``mix``."""
    power = (reference ** 2).sum(-1)
    eps = SNR_THRESHOLD * (mix ** 2).sum(-1)[:, None] + 1e-8
    error = ((reference - estimate) ** 2).sum(-1)
    return (10 * torch.log10(error + SNR_THRESHOLD * power + eps) - 10 * torch.log10(power + eps)).mean()


def build_model(config: TrainSeparatorConfig, sources: tuple[str, ...], sample_rate: int,
                audio_channels: int = 1) -> torch.nn.Module:
    """A Demucs model of the configured architecture and size with ``audio_channels``
    input channels (1: mono; the array's microphones in array mode)."""
    common = dict(sources=list(sources), audio_channels=audio_channels, samplerate=sample_rate,
                  channels=config.channels, depth=config.depth, segment=config.segment_seconds)
    if config.architecture == "demucs":
        from demucs.demucs import Demucs

        # At the capture's own rate: demucs' default doubles it inside the model, which
        # makes a step 3.3 times dearer on a CPU and trained less far in the same time.
        return Demucs(resample=False, **common)
    if config.architecture == "hdemucs":
        from demucs.hdemucs import HDemucs

        return HDemucs(nfft=config.nfft, **common)
    from demucs.htdemucs import HTDemucs

    return HTDemucs(nfft=config.nfft, **common)


def check_model_fits(model: torch.nn.Module, config: TrainSeparatorConfig, audio_channels: int,
                     sample_rate: int) -> None:
    """Run one training excerpt of silence through ``model``: a hybrid model whose
    spectrogram branch does not meet its waveform branch at the configured nfft and depth
    fails here, with a config error, rather than at the first training step."""
    samples = round(config.segment_seconds * sample_rate)
    try:
        with torch.no_grad():
            model(torch.zeros(1, audio_channels, samples, device=next(model.parameters()).device))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise ConfigError(f"train_separator: {config.architecture} with nfft {config.nfft} and depth {config.depth} "
                          f"does not fit together ({type(e).__name__}: {str(e)[:120]}). For hdemucs use nfft 1024 "
                          "with depth 4, or 4096 with depth 5 or 6.") from None


def start_from(model: torch.nn.Module, config: TrainSeparatorConfig, repo: Path, sources: tuple[str, ...],
               sample_rate: int, audio_channels: int) -> None:
    """Load the weights of model ``config.init`` in ``repo`` into ``model``, a model of
    the same kind, size, sample rate and microphones. Its sources may differ: the output
    layers take, for each of ``sources``, the weights of the source of that name in the
    start model, and keep their random start for a source it lacks.

    Raises
    ------
    ConfigError
        No such model, a damaged file, or a model of another kind or size.
    """
    from ..separate import ModelError, model_file, read_model

    try:
        path = model_file(repo, config.init)
        start = read_model(path)
    except ModelError as e:
        raise ConfigError(f"train_separator.init: {e}") from None
    ours, theirs = model.state_dict(), start.state_dict()
    with torch.random.fork_rng():  # the probe's random weights leave training's random state alone
        probe = build_model(config, (*sources, "_probe"), sample_rate, audio_channels).state_dict()
    # Per-source tensors (the output layers): (axis, width per source) from the probe,
    # which has one source more.
    per_source = {}
    for key, value in ours.items():
        if probe[key].shape != value.shape:
            axis = next(a for a, (m, n) in enumerate(zip(value.shape, probe[key].shape)) if m != n)
            per_source[key] = (axis, probe[key].shape[axis] - value.shape[axis])

    def fits(key: str) -> bool:
        if key not in per_source:
            return theirs[key].shape == ours[key].shape
        axis, width = per_source[key]
        shape = list(ours[key].shape)
        shape[axis] = width * len(start.sources)
        return list(theirs[key].shape) == shape

    if (type(start) is not type(model) or start.samplerate != model.samplerate
            or start.audio_channels != model.audio_channels or ours.keys() != theirs.keys()
            or not all(fits(k) for k in ours)):
        raise ConfigError(f"train_separator.init: model {config.init!r} ({path}) is a {type(start).__name__} of "
                          "another size, sample rate or number of microphones than train_separator and "
                          "capture.sample_rate describe: set architecture, channels, depth and nfft as it was "
                          "trained, or init to null to train afresh.")
    known = [s for s in sources if s in start.sources]
    weights = {}
    for key, value in ours.items():
        if key not in per_source:
            weights[key] = theirs[key].to(value)
            continue
        axis, width = per_source[key]
        weights[key] = value.clone()
        for s in known:
            j, i = sources.index(s), list(start.sources).index(s)
            weights[key].narrow(axis, j * width, width).copy_(theirs[key].narrow(axis, i * width, width))
    model.load_state_dict(weights)
    fresh = [s for s in sources if s not in known]
    log.info("starting from the weights of %s%s", path,
             f"; sources {fresh} start afresh (not in it)" if fresh else "")


def evaluate(model: torch.nn.Module, mix: torch.Tensor, sources: torch.Tensor, device, batch: int) -> tuple[float, float]:
    """Mean SI-SDR (dB) of separated sources over active ones, and its improvement over
    using the mixture itself as each source's estimate."""
    model.eval()
    outs = []
    with torch.no_grad():
        for k in range(0, len(mix), batch):
            outs.append(model(mix[k:k + batch].to(device)).cpu())
    model.train()
    est = torch.cat(outs)  # (n, sources, channels, samples)
    active = sources.abs().amax(-1) > 0  # per source and channel
    sdr = si_sdr(est, sources)[active]
    base = si_sdr(mix[:, None].expand_as(sources), sources)[active]  # mix: (n, channels, samples)
    return float(sdr.mean()), float((sdr - base).mean())


def checkpoint_path(config: Config) -> Path:
    """Where training progress is kept, resumable: <separation.repo>/checkpoints/<name>.pt."""
    return config.separation.repo / "checkpoints" / f"{config.train_separator.name}.pt"


class NotBetterError(SignalcraftError):
    """The trained separator is no better than not separating: not exported."""


def train_separator(
    data_dir: Path,
    config: Config,
    resume: bool = False,
    stop: Optional[threading.Event] = None,
    progress: Optional[bool] = None,
    force: bool = False,
) -> TrainResult:
    """Train, validate every epoch, stop early, and export the best model.

    A checkpoint is written after every epoch and when ``stop`` is set; with ``resume``
    training continues from its step with the same model, optimiser and random state.
    The exported model goes to ``separation.repo`` in demucs' packaged format, unless
    its validation SI-SDR is no better than the mixtures' own (SI-SDRi <= 0: worse than
    not separating), which is refused without ``force``; the checkpoint stays, to
    resume.

    Raises
    ------
    TrainingDataError, ConfigError, StorageError, NotBetterError
    """
    from tqdm import tqdm

    from ..separate import save_model

    c = config.train_separator
    stop = stop or threading.Event()
    sr = config.capture.sample_rate
    ckpt = checkpoint_path(config)
    if resume and not ckpt.exists():
        raise StorageError(f"{ckpt}: no checkpoint to resume. Run without --resume to start training.")
    data = load_training_data(data_dir, sr, c)
    spatial = spatial_covariances(data)  # before training: a source it cannot place stops it now
    device = torch_device(c.device, "train_separator.device")
    samples = round(c.segment_seconds * sr)
    torch.manual_seed(c.seed)
    model = build_model(c, data.sources, sr, data.channels).to(device)
    if c.architecture != "demucs":
        check_model_fits(model, c, data.channels, sr)
    if c.init and not resume:
        start_from(model, c, config.separation.repo, data.sources, sr, data.channels)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.learning_rate)
    rng = np.random.default_rng(c.seed)
    state = {"epoch": 0, "step": 0, "best": -math.inf, "best_sdri": -math.inf, "bad_epochs": 0, "best_state": None,
             "train_seconds": 0.0}
    if resume:
        state = _load_checkpoint(ckpt, c, data.sources, model, optimizer, rng)
        log.info("resuming %s from epoch %d, step %d", ckpt, state["epoch"], state["step"])
    elif ckpt.exists():
        log.info("starting afresh; the checkpoint %s will be replaced (use --resume to continue it)", ckpt)

    # Validation mixtures are fixed by the seed, whatever the training state.
    valid = MixtureSampler(data.valid, data.noise_valid, samples, c, np.random.default_rng(c.seed + 1))
    valid_mix, valid_sources = valid.sample(c.validation_mixtures, all_active=True)
    train = MixtureSampler(data.train, data.noise_train, samples, c, rng)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %d channels, depth %d%s, %.2f M parameters, on %s", c.architecture, c.channels, c.depth,
             "" if c.architecture == "demucs" else f", nfft {c.nfft}", n_params / 1e6, device)

    began = time.monotonic()
    resumed_seconds = state["train_seconds"]
    budget = math.inf if c.max_minutes is None else 60 * c.max_minutes

    def out_of_time() -> bool:  # the budget counts every run of this checkpoint
        return resumed_seconds + time.monotonic() - began >= budget

    def learning_rate() -> float:
        if c.lr_schedule == "constant":
            return c.learning_rate
        done = max(state["step"] / (c.epochs * c.steps_per_epoch),
                   (resumed_seconds + time.monotonic() - began) / budget)
        return c.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    reason = "epochs"
    model.train()
    while state["epoch"] < c.epochs:
        bar = tqdm(total=c.steps_per_epoch, desc=f"epoch {state['epoch'] + 1}/{c.epochs}", leave=False,
                   disable=not progress if progress is not None else None, unit="step")
        losses = []
        for _ in range(c.steps_per_epoch):
            if stop.is_set() or out_of_time():
                break
            mix, sources = train.sample(c.batch_size)
            mix, sources = mix.to(device), sources.to(device)
            estimate = model(mix)
            loss = (snr_loss(estimate, sources, mix) if c.loss == "snr"
                    else torch.nn.functional.l1_loss(estimate, sources))
            optimizer.zero_grad()
            loss.backward()
            rate = learning_rate()
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.step()
            state["step"] += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", best_si_sdr=f"{state['best']:.1f}dB")
        bar.close()
        state["train_seconds"] = resumed_seconds + time.monotonic() - began
        if stop.is_set():
            reason = "interrupted"
            _save_checkpoint(ckpt, c, data.sources, model, optimizer, rng, state)
            break
        state["epoch"] += 1
        sdr, sdri = evaluate(model, valid_mix, valid_sources, device, c.batch_size)
        improved = sdr > state["best"]
        if improved:
            state.update(best=sdr, best_sdri=sdri, bad_epochs=0,
                         best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        log.info("epoch %d (step %d): loss %.4f, validation SI-SDR %.2f dB (SI-SDRi %.2f dB)%s",
                 state["epoch"], state["step"], np.mean(losses), sdr, sdri, " best" if improved else "")
        _save_checkpoint(ckpt, c, data.sources, model, optimizer, rng, state)
        if state["bad_epochs"] >= c.patience:
            reason = f"no improvement for {c.patience} epochs"
            break
        if out_of_time():
            reason = f"time budget of {c.max_minutes:g} min"
            break
    seconds = state["train_seconds"]
    if state["best_state"] is None:
        raise SignalcraftError("training stopped before the first validation; nothing to export. "
                               "Run again with --resume to continue.")
    if state["best_sdri"] <= 0:
        message = (f"the trained separator is no better than not separating: validation SI-SDR "
                   f"{state['best']:.2f} dB, {state['best_sdri']:.2f} dB against the unseparated mixtures "
                   f"({state['epoch']} epochs, {seconds / 60:.1f} min; stopped: {reason})")
        if not force:
            raise NotBetterError(f"{message}. Not exported; {c.name} in {config.separation.repo} is unchanged. "
                                 f"Train longer with --resume (train_separator.max_minutes), or pass --force to "
                                 f"export it anyway.")
        log.error("%s; exported anyway (--force)", message)
    best = copy.deepcopy(model).cpu()
    best.load_state_dict(state["best_state"])
    path = save_model(best, config.separation.repo, c.name, half=c.export_half, spatial=spatial)
    log.info("exported %s (validation SI-SDR %.2f dB, SI-SDRi %.2f dB); stopped: %s", path, state["best"],
             state["best_sdri"], reason)
    return TrainResult(path, data.sources, state["epoch"], state["step"], seconds, state["best"],
                       state["best_sdri"], reason)


def spatial_covariances(data: TrainingData) -> Optional[torch.Tensor]:
    """In array mode, each source's spatial covariance per frequency (``dsp.spatial``)
    from all its recordings alone on the array, training and validation: complex64,
    shape = (sources, freq, mics, mics). None for a mono model.

    Raises
    ------
    TrainingDataError
        A source has no recording long enough to learn it from.
    """
    if data.channels < 2:
        return None
    from ..dsp.spatial import N_FFT, covariance

    out = []
    for source, train, valid in zip(data.sources, data.train, data.valid):
        try:
            out.append(covariance(train + valid, data.channels))
        except ValueError:
            raise TrainingDataError(f"source {source!r}: no recording of at least {N_FFT} samples on all "
                                    f"{data.channels} microphones to learn where it stands from.") from None
    log.info("spatial covariances of %d sources learnt from their recordings on the array", len(out))
    return torch.stack(out)


def _save_checkpoint(path, c, sources, model, optimizer, rng, state) -> None:
    """Plain data only: loads with torch.load(weights_only=True)."""
    data = {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(c),
        "sources": list(sources),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        **{k: v for k, v in state.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(path, data)


def _load_checkpoint(path, c, sources, model, optimizer, rng) -> dict:
    if not path.exists():
        raise StorageError(f"{path}: no checkpoint to resume. Run without --resume to start training.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("unknown format")
    except Exception as e:
        raise StorageError(f"{path}: not a readable checkpoint ({load_failure(e)}). "
                           "Delete it and train without --resume.") from None
    saved = data["config"]
    defaults = {"array": False, "nfft": 1024}  # keys that checkpoints of earlier versions lack
    keys = ("architecture", "channels", "depth", "segment_seconds", "array")
    for key in keys if c.architecture == "demucs" else keys + ("nfft",):
        was = saved.get(key, defaults.get(key))
        if was != getattr(c, key):
            raise ConfigError(f"{path}: was trained with train_separator.{key} = {was!r}, the config now says "
                              f"{getattr(c, key)!r}. Restore the setting or train without --resume.")
    if tuple(data["sources"]) != tuple(sources):
        raise ConfigError(f"{path}: was trained on sources {data['sources']}, the data folder now has "
                          f"{list(sources)}. Train without --resume.")
    try:
        model.load_state_dict(data["model"])
    except RuntimeError:
        raise ConfigError(f"{path}: its model does not fit the training data (recordings with another number of "
                          "channels?). Train without --resume.") from None
    optimizer.load_state_dict(data["optimizer"])
    rng.bit_generator.state = data["numpy_rng"]
    torch.set_rng_state(data["torch_rng"])
    return {k: data[k] for k in ("epoch", "step", "best", "best_sdri", "bad_epochs", "best_state", "train_seconds")}
