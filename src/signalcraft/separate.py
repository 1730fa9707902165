"""Source separation with a Demucs model from a local model folder.

Models are in demucs' own packaged format (``NAME-<sha8>.th``, as ``train-separator``
writes them) and load through demucs' own loader with an explicit local ``repo``, which
verifies the checksum in the file name. Nothing is ever downloaded.

A mono model separates each microphone channel on its own; an array model
(``train_separator.array``) takes all microphones at once and returns every source at
every microphone. Like ``demucs.separate``, the input is scaled to unit standard
deviation for the model (each channel, or the array as a whole) and scaled back
afterwards; models trained by signalcraft see the same scaling.

An array model trained by signalcraft also carries each source's spatial covariance,
learnt from its training recordings (``dsp.spatial``), under the package key
``spatial`` (demucs' own loader ignores it). Its output then goes through the
multichannel Wiener filter of ``dsp.spatial`` (``separation.spatial_iterations``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import SeparationConfig
from .compute import torch_device
from .errors import SignalcraftError
from .files import load_failure, sha256_file

log = logging.getLogger(__name__)

MIX = "mix"  # the one source when no separator is configured
SPATIAL_KEY = "spatial"  # the package entry of an array model's spatial covariances
SPATIAL_FORMAT = 1
SECONDS_PER_PASS = 16.0  # audio through the network at once, s (a bounded memory)


class ModelError(SignalcraftError):
    """A model file is missing, corrupt or does not fit the capture."""


@dataclasses.dataclass(frozen=True)
class SeparatorInfo:
    """What the manifest records about the separator."""

    name: Optional[str]  # None: no separation
    sources: tuple[str, ...]
    file: Optional[str] = None
    sha256: Optional[str] = None
    samplerate: Optional[int] = None
    # 1: each microphone separated on its own; more: an array model that takes this many
    # microphones at once.
    audio_channels: int = 1
    # Multichannel Wiener iterations on the array model's output (dsp.spatial); 0: none.
    spatial_iterations: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"sources": list(self.sources)}


class Separator:
    """Maps float32 audio of shape = (channels, samples) to shape = (channels, sources,
    samples). Without a model it passes each channel through as the source "mix". A
    mono model separates each channel on its own (scaled to unit standard deviation); an
    array model (``info.audio_channels`` > 1) takes all channels at once, scaled together
    so that the level differences between microphones stay, and with ``spatial`` (its
    sources' spatial covariances, complex64, (sources, freq, mics, mics)) its output goes
    through the multichannel Wiener filter for ``info.spatial_iterations`` iterations."""

    def __init__(self, info: SeparatorInfo, model=None, config: Optional[SeparationConfig] = None,
                 sample_rate: Optional[int] = None, onnx=None, spatial: Optional[torch.Tensor] = None):
        self.info = info
        self.sources = info.sources
        self._model = model
        self._onnx = onnx  # an edge.runtime.OnnxSeparator: the model's export run by ONNX Runtime
        self._config = config
        self._sample_rate = sample_rate
        self._whole = False  # a segment in one pass (separation.segment: whole)
        self._spatial: Optional[torch.Tensor] = None  # (sources, freq, mics, mics): the array model's
        self._room: Optional[torch.Tensor] = None  # (freq, mics, mics): the room's, from set_room
        self._room_cap: Optional[torch.Tensor] = None  # (freq,): the room's most power, from set_room
        if model is not None:
            self._device = torch_device(config.device, "separation.device")
            self._model.to(self._device)
            if spatial is not None:
                self._spatial = spatial.to(self._device)
            from demucs.demucs import Demucs

            self._whole = config.segment == "whole" and type(model) is Demucs
            if config.segment == "whole" and not self._whole:
                log.info("separator %s: a %s model separates in chunks of its training length (%g s), not whole "
                         "segments", config.model, type(model).__name__, float(model.segment))

    def _chunks(self, samples: int) -> tuple[Optional[float], float]:
        """(chunk length in s or None for the model's own, overlap) for ``samples`` at
        the model's rate: the whole of them as one chunk (segments longer than
        SECONDS_PER_PASS in chunks of that length), or ``separation.segment``."""
        if self._whole:
            rate = self._model.samplerate
            if self._config.shifts:  # apply_model pads for its shifts by up to half a second
                samples += 2 * int(0.5 * rate)
            if samples > SECONDS_PER_PASS * rate:
                return SECONDS_PER_PASS, self._config.overlap
            return one_pass_seconds(samples, rate), 0.0
        segment = self._config.segment
        return (None if segment == "whole" else segment), self._config.overlap

    @property
    def spatial(self) -> bool:
        """Whether the output goes through the multichannel Wiener filter."""
        return self._spatial is not None and self.info.spatial_iterations > 0

    def set_room(self, noise: np.ndarray) -> None:
        """The room's spatial covariance for the filter (and, with
        ``separation.room_headroom``, the most power it takes in a bin), from float32
        audio recorded on all microphones at once with the machines off, shape = (mics,
        samples), at the capture's rate (the noise clips). Without it, each segment's own
        rest is used."""
        from .audio_backend import torchaudio
        from .dsp.spatial import covariance, power

        x = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32))
        if self._sample_rate != self._model.samplerate:
            x = torchaudio.functional.resample(x, self._sample_rate, self._model.samplerate)
        self._room = covariance([x.numpy()], self.info.audio_channels).to(self._device)
        if self._config.room_headroom is not None:
            self._room_cap = (self._config.room_headroom * power(x.numpy())).to(self._device)

    def _filter(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The array model's output (sources, mics, samples) for its input x (mics,
        samples), both at the model's rate, through the spatial filter when it is on
        (and the audio is at least one of its frames long)."""
        from .dsp.spatial import N_FFT, wiener

        if not self.spatial or x.shape[-1] < N_FFT:
            return y
        return wiener(x.to(self._device), y.to(self._device), self._spatial, self._room,
                      self.info.spatial_iterations, self._room_cap)

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self._onnx is not None else "torch"

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        if self._model is None:
            return audio[:, None, :].copy()
        if self._onnx is not None:  # load_separator chose it: same rate, no shifts
            return self._separate_onnx(audio)
        from demucs.apply import apply_model

        from .audio_backend import torchaudio

        c, sr, model_sr = self._config, self._sample_rate, self._model.samplerate
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if model_sr != sr:
            x = torchaudio.functional.resample(x, sr, model_sr)
        array = self.info.audio_channels > 1
        if array and x.shape[0] != self.info.audio_channels:
            raise ValueError(f"the array separator takes {self.info.audio_channels} channels, got {x.shape[0]}")
        # (batch, audio channels, samples): the whole array as one example, or each channel as its own.
        scale = (x.std() if array else x.std(dim=-1, keepdim=True)).clamp_min(1e-8)
        batch = (x / scale)[None] if array else (x / scale)[:, None, :]
        segment, overlap = self._chunks(x.shape[-1])
        # At most SECONDS_PER_PASS of audio through the network at once (bounded memory).
        group = max(1, int(SECONDS_PER_PASS // (segment or float(self._model.segment))))  # examples per pass
        with torch.no_grad():
            y = torch.cat([apply_model(self._model, part, shifts=c.shifts, split=True, overlap=overlap,
                                       segment=segment, device=self._device, progress=False)
                           for part in batch.split(group)])  # (batch, sources, audio channels, samples)
        if array:
            y = self._filter(x, y[0] * scale).transpose(0, 1)  # (mics, sources, samples)
        else:
            y = y[:, :, 0, :] * scale[:, None, :]
        if model_sr != sr:
            y = torchaudio.functional.resample(y, model_sr, sr)
        out = np.zeros((audio.shape[0], len(self.sources), audio.shape[-1]), np.float32)
        n = min(out.shape[-1], y.shape[-1])
        out[..., :n] = y[..., :n].cpu().numpy()
        return out

    def _separate_onnx(self, audio: np.ndarray) -> np.ndarray:
        """``__call__`` through the ONNX export: the same scaling (and spatial filter)."""
        x = np.ascontiguousarray(audio, dtype=np.float32)
        segment, overlap = self._chunks(x.shape[-1])
        if self.info.audio_channels > 1:
            if x.shape[0] != self.info.audio_channels:
                raise ValueError(f"the array separator takes {self.info.audio_channels} channels, got {x.shape[0]}")
            scale = max(float(x.std()), 1e-8)
            y = torch.from_numpy(np.ascontiguousarray(self._onnx(x[None] / scale, overlap, segment)[0] * scale))
            return np.ascontiguousarray(self._filter(torch.from_numpy(x), y).cpu().numpy().transpose(1, 0, 2))
        scale = np.maximum(x.std(axis=-1, keepdims=True), 1e-8)
        y = self._onnx((x / scale)[:, None, :], overlap, segment)
        return np.ascontiguousarray(y[:, :, 0, :] * scale[:, None, :])


def one_pass_seconds(samples: int, rate: int) -> float:
    """The chunk length, s, that demucs' ``apply_model`` (and ``OnnxSeparator``) turns
    into exactly ``samples`` samples at ``rate``: the whole input as one chunk."""
    return (samples + 0.5) / rate  # int(rate * length) is samples


def model_file(repo: Path, name: str) -> Path:
    """The file of model ``name`` in ``repo`` (``NAME-<sha8>.th`` or ``NAME.th``).

    Raises
    ------
    ModelError
        No such model; the message lists the models in the folder.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise ModelError(
            f"separation.repo: model folder {repo} does not exist. Train a model into it with "
            "`signalcraft train-separator`, or set separation.model to null to skip separation."
        )
    candidates = [p for p in repo.glob("*.th") if p.stem == name or p.stem.rsplit("-", 1)[0] == name]
    if len(candidates) == 1:
        return candidates[0]
    available = sorted({p.stem.rsplit("-", 1)[0] for p in repo.glob("*.th")})
    if not candidates:
        raise ModelError(
            f"separation.model: no model {name!r} in {repo} (found: {', '.join(available) or 'none'})."
        )
    raise ModelError(f"separation.model: {repo} holds several files for {name!r}: "
                     f"{', '.join(p.name for p in candidates)}. Keep one.")


def load_separator(config: SeparationConfig, sample_rate: int, runtime: str = "torch",
                   precision: str = "fp32") -> Separator:
    """The configured separator, checked against the capture's sample rate. With
    ``runtime`` onnxruntime it runs the model's ONNX export (``export-onnx``), checked
    against the model file; shifts or another sample rate keep it on torch (logged).

    Raises
    ------
    ModelError
        The model is missing, corrupt (checksum), not a demucs model, or at another
        sample rate with ``resample`` off. The message names the file.
    EdgeError
        onnxruntime: the export is missing, damaged or of another version of the model.
    """
    if config.model is None:
        return Separator(SeparatorInfo(name=None, sources=(MIX,)))
    if config.threads:
        torch.set_num_threads(config.threads)
    path = model_file(config.repo, config.model)
    model, spatial = read_package(path)
    model.eval()
    from .segments.layout import valid_source

    bad = [s for s in model.sources if not valid_source(s)]
    if bad or len(set(model.sources)) != len(model.sources):
        raise ModelError(f"{path}: source names {bad or list(model.sources)} cannot name tensor files (letters and "
                         "digits, then '_', '-', '.', '+' or spaces; distinct). Rename the training folders and "
                         "retrain.")
    audio_channels = getattr(model, "audio_channels", None)
    if not isinstance(audio_channels, int) or audio_channels < 1:
        raise ModelError(f"{path}: the model has no usable number of audio channels ({audio_channels!r}); "
                         "retrain it with `signalcraft train-separator`.")
    if model.samplerate != sample_rate:
        if not config.resample:
            raise ModelError(
                f"{path}: the model runs at {model.samplerate} Hz, the capture at {sample_rate} Hz. "
                "Set separation.resample: true, or train at the capture rate."
            )
        log.info("separator %s runs at %d Hz: resampling from %d Hz and back", config.model,
                 model.samplerate, sample_rate)
    if spatial is None and audio_channels > 1 and config.spatial_iterations:
        log.info("separator %s carries no spatial covariances: its output is not spatially filtered (retrain it "
                 "with `signalcraft train-separator` to add them)", config.model)
    iterations = config.spatial_iterations if spatial is not None else 0
    info = SeparatorInfo(name=config.model, sources=tuple(model.sources), file=path.name,
                         sha256=sha256_file(path), samplerate=model.samplerate, audio_channels=audio_channels,
                         spatial_iterations=iterations)
    onnx = None
    if runtime == "onnxruntime":
        from .edge.export import not_exportable

        why = not_exportable(model) or ("it resamples" if model.samplerate != sample_rate else None) \
            or ("separation.shifts is set" if config.shifts else None)
        if why:
            log.warning("separator %s runs on torch: %s, which an ONNX export does not do", config.model, why)
        else:
            from .edge.runtime import OnnxSeparator

            onnx = OnnxSeparator(path, precision, threads=config.threads)
            onnx.check_model(model)
    return Separator(info, model, config, sample_rate, onnx=onnx, spatial=spatial)


def _model_classes() -> tuple[type, ...]:
    """The demucs model classes a separator file may hold."""
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs

    return (Demucs, HDemucs, HTDemucs)


def read_model(path: Path) -> torch.nn.Module:
    """The demucs model of a file in demucs' packaged format (``read_package``)."""
    return read_package(path)[0]


def read_package(path: Path) -> tuple[torch.nn.Module, Optional[torch.Tensor]]:
    """A demucs model from a file in demucs' packaged format (``save_model``, demucs'
    own training), read without running any code from the file, and its spatial
    covariances (complex64, shape = (sources, freq, mics, mics)) when it carries them.

    The file is unpickled with ``weights_only=True``: only tensors, plain containers
    and the demucs model classes are allowed, so a crafted file that would run code
    when loaded by ``torch.load`` is refused unread. The model is then built from its
    recorded constructor arguments by demucs' own ``load_model``. A ``NAME-<sha8>.th``
    file must match its checksum, as demucs checks it.

    Raises
    ------
    ModelError
        Checksum mismatch, damaged, holding anything but a demucs model, not
        buildable from its arguments, or with spatial covariances that do not fit
        it. The message names the file.
    """
    import pickle

    from demucs.repo import ModelLoadingError, check_checksum
    from demucs.states import load_model

    path = Path(path)
    retrain = "Retrain it or restore the file."
    if "-" in path.stem:
        try:
            check_checksum(path, path.stem.rsplit("-", 1)[1])
        except ModelLoadingError as e:
            raise ModelError(f"{path}: cannot load separator: {e}. {retrain}") from None
    classes = _model_classes()
    try:
        with torch.serialization.safe_globals(list(classes)):
            package = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"{path}: refused: the file holds more than a demucs model (code or other objects), or "
                         f"is damaged. signalcraft loads only demucs models. {retrain}") from None
    except Exception as e:  # a damaged file fails inside torch.load in many ways
        raise ModelError(f"{path}: not a readable demucs model ({load_failure(e)}). {retrain}") from None
    if not (isinstance(package, dict) and {"klass", "args", "kwargs", "state"} <= package.keys()
            and package["klass"] in classes and isinstance(package["args"], (list, tuple))
            and isinstance(package["kwargs"], dict) and isinstance(package["state"], dict)
            and all(isinstance(v, torch.Tensor) for v in package["state"].values())):
        raise ModelError(f"{path}: not a demucs model package (klass, args, kwargs, state). {retrain}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # demucs warns about arguments of other versions it drops
            model = load_model(package)
    except Exception as e:
        raise ModelError(f"{path}: cannot build the separator from its file ({type(e).__name__}: "
                         f"{str(e)[:200]}). {retrain}") from None
    spatial = package.get(SPATIAL_KEY)
    return model, (None if spatial is None else _spatial(spatial, model, path, retrain))


def _spatial(entry, model: torch.nn.Module, path: Path, retrain: str) -> torch.Tensor:
    """The package's spatial covariances, checked against the model: complex64,
    shape = (sources, freq, mics, mics)."""
    from .dsp.spatial import N_FFT

    def bad(why: str) -> ModelError:
        return ModelError(f"{path}: its spatial covariances {why}. {retrain}")

    if not (isinstance(entry, dict) and entry.get("format") == SPATIAL_FORMAT and entry.get("n_fft") == N_FFT
            and isinstance(entry.get("covariance"), torch.Tensor)):
        raise bad(f"are not of format {SPATIAL_FORMAT} with n_fft {N_FFT}")
    R = entry["covariance"]
    mics, want = model.audio_channels, (len(model.sources), N_FFT // 2 + 1, model.audio_channels,
                                        model.audio_channels, 2)
    if mics < 2 or R.dtype != torch.float32 or tuple(R.shape) != want:
        raise bad(f"have shape {tuple(R.shape)} ({R.dtype}); the model needs {want} (float32)")
    if not torch.isfinite(R).all():
        raise bad("hold values that are not finite")
    R = torch.view_as_complex(R.contiguous())
    trace = torch.diagonal(R, dim1=-2, dim2=-1).real.sum(-1)
    if not (torch.allclose(R, R.conj().transpose(-1, -2), atol=1e-5)
            and torch.allclose(trace, torch.ones_like(trace), atol=1e-3)
            and torch.linalg.eigvalsh(R).min() >= -1e-4):
        raise bad("are not positive semi-definite Hermitian matrices of trace 1 at every frequency")
    return R


def spatial_entry(covariances: torch.Tensor) -> dict:
    """The package entry (``SPATIAL_KEY``) for spatial covariances, complex, shape =
    (sources, freq, mics, mics)."""
    from .dsp.spatial import N_FFT

    return {"format": SPATIAL_FORMAT, "n_fft": N_FFT,
            "covariance": torch.view_as_real(covariances.to(torch.complex64).cpu()).contiguous()}


def save_model(model: torch.nn.Module, repo: Path, name: str, half: bool = False,
               spatial: Optional[torch.Tensor] = None) -> Path:
    """Save a demucs model in demucs' own packaged format as ``repo/NAME-<sha8>.th``,
    loadable by ``load_separator`` and by ``python -m demucs.separate --repo REPO -n NAME``.
    With ``half`` the weights are stored in half precision (demucs' own option: half the
    file; the model loads and runs in float32). ``spatial``: an array model's spatial
    covariances, complex, shape = (sources, freq, mics, mics), stored beside. Written
    atomically; older files of the same name are removed after."""
    import io

    from demucs.states import get_state

    from .files import atomic_write

    args, kwargs = model._init_args_kwargs  # recorded by demucs' @capture_init
    package = {"klass": type(model), "args": args, "kwargs": kwargs, "state": get_state(model, None, half=half)}
    if spatial is not None:
        package[SPATIAL_KEY] = spatial_entry(spatial)
    buf = io.BytesIO()
    torch.save(package, buf)
    data = buf.getvalue()
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    path = repo / f"{name}-{hashlib.sha256(data).hexdigest()[:8]}.th"
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    for old in repo.glob(f"{name}-*.th"):
        if old != path and old.stem.rsplit("-", 1)[0] == name:
            old.unlink()
    return path
