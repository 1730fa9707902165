"""Configuration: frozen dataclasses per stage and one strict loader.

Defaults live only in these dataclasses. ``load_config`` reads a YAML file, rejects
unknown keys, wrong types and values out of range with the key's path in the message
(every problem of the file at once, one line each), and resolves relative paths against
the folder of the config file (so cron, which runs in another working directory, finds
the same files).

Which file is read: ``--config FILE``, else ``$SIGNALCRAFT_CONFIG``, else
``./config.yaml`` if present, else the built-in defaults.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

ENV_VAR = "SIGNALCRAFT_CONFIG"
DEFAULT_FILE = "config.yaml"


class ConfigProblems(ConfigError):
    """Every problem found in one config file: one line each in the message, each
    starting with the file and the key (``problems`` holds the lines)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


class _FieldError(ValueError):
    """A value failed a check; the loader adds the key's path (``key`` is relative to
    the dataclass in ``__post_init__``, the whole path in ``_convert``)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# While the loader builds a dataclass, the failed checks of its ``__post_init__`` are
# collected here instead of raised, so that one run names every bad value of a section.
_failed_checks: contextvars.ContextVar[Optional[list[_FieldError]]] = contextvars.ContextVar(
    "signalcraft_failed_checks", default=None)


def _require(ok: bool, key: str, message: str) -> None:
    if ok:
        return
    failed = _failed_checks.get()
    if failed is None:  # built in code, not by the loader: the first failed check raises
        raise _FieldError(key, message)
    failed.append(_FieldError(key, message))


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """Where audio comes from and how it is cut into segments."""

    # Input device: an index from `signalcraft devices`, or a case-insensitive
    # substring of its name. None: the system's default input device.
    device: Optional[Union[int, str]] = None
    # Device channels to record, 1-based. None: every input channel of the device
    # (but the reference channels).
    channels: Optional[tuple[int, ...]] = None
    # Reference microphones, 1-based device channels: placed near a noise source that
    # comes and goes, away from the machines. Recorded and fed to the canceller
    # (`reference` section), never exported as mic_N nor scored.
    reference_channels: tuple[int, ...] = ()
    sample_rate: int = 16000  # Hz; the device must accept it
    segment_seconds: float = 10.0  # length of one exported segment, s
    # Sample format asked of the device. Ask for its native format: a converted
    # format can cost frames on some ALSA plugins. Audio is float32 in [-1, 1) after.
    sample_format: Literal["int16", "int32", "float32"] = "int16"
    block_frames: int = 1024  # frames per PortAudio callback
    # Blocks of audio the capture queue holds while segments are assembled, s.
    queue_seconds: float = 30.0
    # When the device fails mid-run (unplugged, PortAudio error), `record` reopens it
    # up to this many times in a row, waiting reconnect_delay_s before the first try
    # and doubling the wait each time (at most 60 s). 0: give up at once.
    reconnect_attempts: int = 5
    reconnect_delay_s: float = 2.0

    def __post_init__(self):
        _require(self.sample_rate > 0, "sample_rate", "must be a positive number of Hz")
        _require(self.reconnect_attempts >= 0, "reconnect_attempts", "must be 0 or more")
        _require(self.reconnect_delay_s >= 0, "reconnect_delay_s", "must be 0 or more seconds")
        _require(self.segment_seconds > 0, "segment_seconds", "must be positive")
        _require(self.block_frames > 0, "block_frames", "must be positive")
        _require(self.queue_seconds > 0, "queue_seconds", "must be positive")
        if self.channels is not None:
            _require(len(self.channels) > 0, "channels", "must list at least one channel, or be null")
            _require(all(c >= 1 for c in self.channels), "channels", "are 1-based: the first channel is 1")
            _require(len(set(self.channels)) == len(self.channels), "channels", "lists a channel twice")
            both = sorted(set(self.channels) & set(self.reference_channels))
            _require(not both, "reference_channels", f"channel {both[0] if both else ''} is also in capture.channels; "
                     "a reference microphone is not a machine microphone")
        _require(all(c >= 1 for c in self.reference_channels), "reference_channels",
                 "are 1-based: the first channel is 1")
        _require(len(set(self.reference_channels)) == len(self.reference_channels), "reference_channels",
                 "lists a channel twice")
        _require(
            self.sample_rate <= 0 or round(self.segment_seconds * self.sample_rate) > 0,  # else: the rate's problem
            "segment_seconds",
            "is shorter than one sample",
        )

    @property
    def segment_frames(self) -> int:
        """Samples per channel in one segment."""
        return round(self.segment_seconds * self.sample_rate)


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """Room-noise calibration (`signalcraft calibrate-noise`)."""

    dir: Path = Path("noise_samples")  # one clip per channel: channel_<C>.pt
    seconds: float = 10.0  # length of the recording, s
    # A channel whose RMS is below this is reported dead (unplugged mic, no phantom
    # power). Digital silence is always dead.
    dead_rms_dbfs: float = -80.0
    clip_level: float = 0.999  # |x| at or above this counts as clipped
    max_clipped_fraction: float = 0.001  # more clipped samples than this fails the clip

    def __post_init__(self):
        _require(self.seconds > 0, "seconds", "must be positive")
        _require(0 < self.clip_level <= 1, "clip_level", "must be in (0, 1]")
        _require(0 <= self.max_clipped_fraction < 1, "max_clipped_fraction", "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class DenoiseConfig:
    """Per-channel spectral gating against that channel's noise clip (noisereduce)."""

    enabled: bool = True
    # Stationary: a fixed threshold per frequency from the noise clip. False: a
    # threshold that follows the signal itself (noise clip not used).
    stationary: bool = True
    prop_decrease: float = 1.0  # 1.0 removes gated noise fully, 0.5 halves it
    n_fft: int = 2048  # STFT size, samples (128 ms at 16 kHz: resolves machine harmonics)
    # A bin is signal when its power, averaged over decision_ms, exceeds the noise clip's
    # mean of the same average by this many standard deviations of it.
    n_std_thresh: float = 1.75
    # Averaging of the power before the decision, ms (dsp.gate): a machine's steady sound
    # near the room's level passes. null: decide on each STFT frame alone (noisereduce's
    # own decision), which drops more of the machines in reverberant rooms.
    decision_ms: Optional[float] = 400.0
    # Mask smoothing. Smoothing across frequency spreads the gate of the surrounding
    # noise over steady machine tones and erases them: keep it null unless the room
    # noise is itself tonal.
    freq_mask_smooth_hz: Optional[float] = None
    time_mask_smooth_ms: Optional[float] = 50.0

    def __post_init__(self):
        _require(0 <= self.prop_decrease <= 1, "prop_decrease", "must be in [0, 1]")
        _require(self.n_fft >= 16, "n_fft", "must be at least 16")
        _require(self.n_std_thresh > 0, "n_std_thresh", "must be positive")
        _require(self.decision_ms is None or self.decision_ms > 0, "decision_ms", "must be positive, or null")


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """The reference canceller (``dsp.canceller``): on when capture.reference_channels
    lists reference microphones."""

    # nlms: frequency-domain normalised LMS (the default); rls: frequency-domain RLS,
    # which also decorrelates several references that hear much the same, in one
    # partition (cheaper, slower to follow a change).
    method: Literal["nlms", "rls"] = "nlms"
    # Filter length per (microphone, reference), samples: the longest delay from a
    # reference to a machine microphone plus the room's echo worth cancelling (4096 at
    # 16 kHz: 256 ms, the direct sound and the early echo of a reverberant pump room).
    # A power of two is fastest.
    taps: int = 4096
    # nlms: block of the frequency-domain filter, samples: taps is a multiple of it.
    # Smaller follows per-sample NLMS more closely and adapts more often, at more cost.
    block: int = 256
    step_size: float = 0.5  # in (0, 2) for nlms, (0, 1] for rls; larger adapts faster, leaves more residual
    forgetting: float = 0.98  # the references' power estimate: weight of the past, per block
    regularisation: float = 1e-8  # power floor of the references, full scale squared (-80 dB)
    # Learn only while the references are this much above their quiet level (the noise
    # source is on), dB; null: always. Off, the references hear the machines, and a
    # filter that learnt them would cancel machine sound.
    adapt_above_db: Optional[float] = 6.0
    # Reset the filter (and pass the segment through) when over a segment a microphone's
    # output is this much louder than its input, dB.
    divergence_db: float = 3.0

    def __post_init__(self):
        _require(16 <= self.taps <= 65536, "taps", "must be between 16 and 65536")
        _require(8 <= self.block <= self.taps, "block", "must be at least 8 and at most taps")
        _require(self.block > self.taps or self.taps % self.block == 0, "taps",
                 f"must be a multiple of reference.block ({self.block})")
        limit = 2.0 if self.method == "nlms" else 1.0
        _require(0 < self.step_size < limit or (self.method == "rls" and self.step_size == 1.0), "step_size",
                 f"must be in (0, {limit:g}{']' if self.method == 'rls' else ')'} for {self.method}")
        _require(0 < self.forgetting < 1, "forgetting", "must be in (0, 1)")
        _require(self.regularisation > 0, "regularisation", "must be positive")
        _require(self.divergence_db > 0, "divergence_db", "must be positive")
        _require(self.adapt_above_db is None or self.adapt_above_db >= 0, "adapt_above_db", "must be 0 or more, or null")


@dataclasses.dataclass(frozen=True)
class SeparationConfig:
    """Demucs source separation, one signal per machine."""

    # Folder of models in demucs' own format (NAME-<sha8>.th), as train-separator
    # writes it. Never a download: models load only from here.
    repo: Path = Path("models/separator")
    # Model name in repo. null: no separation, one source named "mix" per microphone.
    model: Optional[str] = None
    # The machines in the room, each mapped to the model's source that is its sound,
    # e.g. {P-101: pump, F-201: fan} (without separation: {P-101: mix}). Only these are
    # exported, scored and reported, under these names; a source of the model that no
    # machine maps to is not exported. null: every source of the model, by its own name.
    assets: Optional[dict[str, str]] = None
    # How a segment goes through the model. "whole": in one pass, no chunks (a Demucs v2
    # network takes any length; HDemucs and HTDemucs keep their training length; over
    # separate.SECONDS_PER_PASS, chunks of that length). A
    # number: chunks of that many seconds, cross-faded over ``overlap``. null: chunks of
    # the model's training length.
    segment: Union[float, Literal["whole"], None] = "whole"
    overlap: float = 0.25  # overlap between chunks, fraction
    shifts: int = 0  # random-shift passes averaged (slower, slightly better)
    # An array model with spatial covariances (train-separator in array mode stores
    # them): iterations of the multichannel Wiener filter on its output, which puts
    # each sound back at the machine it came from (dsp.spatial). 0: the network alone.
    spatial_iterations: int = 2
    # With noise clips recorded together: the room's power in each time-frequency bin is
    # at most this many times its mean in the clips, and what the network leaves of the
    # mixture beyond that goes to the machines by where it comes from (a fault's new
    # tone, which the network never heard); the room keeps its transients (a knock, a
    # door) uncapped. null: the room takes all that the network leaves (dsp.spatial,
    # docs/benchmarks.md).
    room_headroom: Optional[float] = 1.0
    threads: int = 0  # torch CPU threads; 0: torch's default (all cores)
    device: Literal["cpu", "cuda", "auto"] = "auto"  # auto: CUDA when present
    # A model trained at another sample rate: resample to it and back (True) or refuse.
    resample: bool = True

    def __post_init__(self):
        _require(self.segment in (None, "whole") or self.segment > 0, "segment",
                 f"must be a positive number of seconds, whole or null, got {self.segment!r}")
        _require(0 <= self.overlap < 1, "overlap", "must be in [0, 1)")
        _require(self.shifts >= 0, "shifts", "must be 0 or more")
        _require(0 <= self.spatial_iterations <= 10, "spatial_iterations", "must be 0 (off) to 10")
        _require(self.room_headroom is None or 1 <= self.room_headroom <= 1e6, "room_headroom",
                 f"must be null or a number from 1 to 1e6, got {self.room_headroom!r}")
        _require(self.threads >= 0, "threads", "must be 0 or more")
        if self.assets is not None:
            from .segments.layout import valid_source

            _require(bool(self.assets), "assets", "must name at least one machine, or be null")
            for asset in self.assets:
                _require(valid_source(asset), "assets", f"{asset!r} cannot name a tensor file (letters and digits, "
                         "then also '_', '-', '.', '+' or spaces; at most 64)")
            twice = sorted({s for s in self.assets.values() if list(self.assets.values()).count(s) > 1})
            _require(not twice, "assets", f"source {', '.join(map(repr, twice))} is mapped to more than one "
                     "machine; a separator gives one signal per source")


@dataclasses.dataclass(frozen=True)
class TrainSeparatorConfig:
    """`signalcraft train-separator`: the model and how it is trained."""

    name: str = "separator"  # model name; written to separation.repo as NAME-<sha8>.th
    # Start from the weights of this model in separation.repo (e.g. the bundled `plant`)
    # instead of random ones: same architecture, size and sample rate; the output of a
    # source it does not have starts afresh (--resume continues the checkpoint instead).
    # null: from scratch.
    init: Optional[str] = None
    # false: one microphone at a time (a mono model; every channel of a training file
    # is a recording). true: one model for the whole array, every training file holding
    # one channel per microphone (capture.channels order), each machine recorded alone
    # where it stands; the model takes all microphones and returns every source at each.
    array: bool = False
    # Demucs family: demucs (v2, waveform), hdemucs (hybrid), htdemucs (transformer).
    architecture: Literal["demucs", "hdemucs", "htdemucs"] = "demucs"
    # Width of the first layer; the cost grows with its square. 16 separated about as
    # well as 32 after the same 30 minutes on 2 cores, and runs the chain at 0.1 x real time.
    channels: int = 16
    depth: int = 4  # encoder/decoder layers
    # hdemucs and htdemucs: STFT size of the spectrogram branch, samples (a power of 2).
    # Larger sizes resolve machine tones closer together (4096 at 16 kHz: 3.9 Hz bins)
    # and need more layers: hdemucs takes 1024 with depth 4, 4096 with depth 5 or 6.
    nfft: int = 1024
    # Training excerpt length, s; also the chunk at inference where separation.segment
    # is null.
    segment_seconds: float = 1.0
    batch_size: int = 8
    learning_rate: float = 1.0e-3  # the bundled model's; 3e-4 progressed about three times slower
    # constant: learning_rate throughout. cosine: from learning_rate down to 0 along a
    # half cosine over the training's length (epochs x steps_per_epoch steps or
    # max_minutes, whichever ends it first).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    # Training loss: l1 (waveform L1, as demucs) or snr (negative SNR of each source,
    # soft-thresholded at 30 dB so silent sources and perfect ones stay bounded).
    loss: Literal["l1", "snr"] = "l1"
    # Store the exported weights in half precision: half the file; it runs in float32.
    export_half: bool = False
    epochs: int = 100  # at most
    steps_per_epoch: int = 50
    patience: int = 5  # stop after this many epochs without a better validation SI-SDR
    # Stop after this much training time (every --resume run counted); a default run
    # ends within the hour. null: no limit.
    max_minutes: Optional[float] = 50.0
    # The last fraction of every recording is held out for validation.
    validation_fraction: float = 0.15
    validation_mixtures: int = 24
    gain_db: float = 6.0  # each source's level varies by up to +-this in a mixture
    silent_probability: float = 0.1  # a source is left out of a mixture this often
    noise_snr_db: tuple[float, ...] = (0.0, 20.0)  # range of machines-to-_noise ratio, dB
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"

    def __post_init__(self):
        _require(bool(self.name) and "-" not in self.name and "/" not in self.name, "name",
                 "must be non-empty, without '-' or '/'")
        _require(self.init is None or (bool(self.init) and "-" not in self.init and "/" not in self.init), "init",
                 "must be a model name in separation.repo (non-empty, without '-' or '/'), or null")
        _require(self.channels >= 1 and self.depth >= 1, "channels", "and depth must be positive")
        _require(self.nfft >= 256 and self.nfft & (self.nfft - 1) == 0, "nfft", "must be a power of 2, at least 256")
        _require(self.segment_seconds > 0, "segment_seconds", "must be positive")
        _require(self.batch_size >= 1 and self.steps_per_epoch >= 1 and self.epochs >= 1, "batch_size",
                 "steps_per_epoch and epochs must be positive")
        _require(self.learning_rate > 0, "learning_rate", "must be positive")
        _require(0 < self.validation_fraction < 1, "validation_fraction", "must be in (0, 1)")
        _require(self.validation_mixtures >= 1, "validation_mixtures", "must be positive")
        _require(0 <= self.silent_probability < 1, "silent_probability", "must be in [0, 1)")
        _require(len(self.noise_snr_db) == 2 and self.noise_snr_db[0] <= self.noise_snr_db[1],
                 "noise_snr_db", "must be [low, high] in dB")
        _require(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be positive or null")


@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    """Log-mel tensors, shape = (1, n_mels, n_frames), one per microphone and source."""

    n_mels: int = 240
    n_frames: int = 240  # per segment; the hop length is derived from the segment length
    n_fft: int = 2048  # samples; 1024 leaves empty mel bands at 240 mels and 16 kHz
    f_min: float = 0.0  # Hz
    f_max: Optional[float] = None  # Hz; null: half the sample rate
    # Values are 10*log10(power) relative to a full-scale reference (fixed, so tensors
    # compare across segments and machines), floored at this level in dB (>= -100).
    floor_db: float = -100.0

    def __post_init__(self):
        _require(self.n_mels >= 1, "n_mels", "must be positive")
        _require(self.n_frames >= 2, "n_frames", "must be at least 2")
        _require(self.n_fft >= 16, "n_fft", "must be at least 16")
        _require(self.f_min >= 0, "f_min", "must be 0 Hz or more")
        _require(self.f_max is None or self.f_max > self.f_min, "f_max", "must be above f_min")
        _require(-100 <= self.floor_db < 0, "floor_db", "must be in [-100, 0) dB")


SCORER_KINDS = ("ensemble", "profile", "modulation", "bands", "frames", "flux", "autoencoder", "online")
# Members that fit in about a second: the ensemble cross-fits each member inside each
# of its own cross-fitting folds, which would train an autoencoder tens of times; and
# online learning is the online scorer's own.
ENSEMBLE_MEMBERS = ("profile", "modulation", "bands", "frames", "flux")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """The ``autoencoder`` scorer's network and training."""

    channels: int = 16  # width of the first conv layer
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 1.0e-3
    seed: int = 0

    def __post_init__(self):
        _require(self.channels >= 1, "channels", "must be positive")
        _require(self.epochs >= 1, "epochs", "must be positive")
        _require(self.batch_size >= 1, "batch_size", "must be positive")
        _require(self.learning_rate > 0, "learning_rate", "must be positive")


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """The ``online`` scorer: River's HalfSpaceTrees, learning from NORMAL segments at or
    below the warning level."""

    trees: int = 10
    height: int = 8
    # Segments per reference window: the model scores against the last full window of
    # normal segments and fills the next one.
    window: int = 50
    seed: int = 0

    def __post_init__(self):
        _require(self.trees >= 1, "trees", "must be positive")
        _require(1 <= self.height <= 20, "height", "must be between 1 and 20")
        _require(self.window >= 1, "window", "must be positive")


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """How a tensor becomes an anomaly score (the README's Detection section)."""

    # ensemble: each of `members` standardised on its calibration scores, the most
    # abnormal counts; profile: each mel band's level against normal, worst bands;
    # modulation: a shrunk Gaussian on how each band group's level fluctuates; bands:
    # the same on each group's level and spread; frames: the same on short windows of
    # frames, scored by the worst; flux: the same on how unsteadily each pair of upper
    # bands changes level from frame to frame; autoencoder: a convolutional autoencoder
    # and band profiles; online: River HalfSpaceTrees on band statistics, learning as it
    # goes.
    kind: Literal["ensemble", "profile", "modulation", "bands", "frames", "flux", "autoencoder",
                  "online"] = "ensemble"
    members: tuple[str, ...] = ("profile", "modulation")
    # The flux scorer reads the mel bands from this frequency up, Hz: friction, rattle
    # and scraping show up as faster level changes in the upper bands, while the lower
    # bands of a plant carry the room's own varying hum. Below features.f_max.
    flux_min_hz: float = 2500.0
    autoencoder: AutoencoderConfig = dataclasses.field(default_factory=AutoencoderConfig)
    online: OnlineConfig = dataclasses.field(default_factory=OnlineConfig)

    def __post_init__(self):
        for member in self.members:
            _require(member in ENSEMBLE_MEMBERS, "members",
                     f"{member!r} is not a scorer an ensemble can hold (choose from {', '.join(ENSEMBLE_MEMBERS)})")
        _require(len(set(self.members)) == len(self.members) and len(self.members) >= 1, "members",
                 "must name at least one scorer, each once")
        _require(math.isfinite(self.flux_min_hz) and self.flux_min_hz >= 0, "flux_min_hz", "must be 0 Hz or more")

    @property
    def uses_flux(self) -> bool:
        """Whether the flux scorer runs, alone or as an ensemble member."""
        return self.kind == "flux" or (self.kind == "ensemble" and "flux" in self.members)


@dataclasses.dataclass(frozen=True)
class LevelsConfig:
    """WARNING and CRITICAL levels per microphone and machine, and how they adapt."""

    # gamma (quantiles of a fitted gamma distribution), sigma (mean + k standard
    # deviations) or percentile (empirical), on the cross-fitted calibration scores.
    method: Literal["gamma", "sigma", "percentile"] = "gamma"
    warning_quantile: float = 0.99  # gamma and percentile
    critical_quantile: float = 0.999
    warning_sigma: float = 3.0  # sigma
    critical_sigma: float = 5.0
    # Slow drift: each NORMAL score at or below the warning level moves the score
    # distribution by this weight (exponentially weighted); no other score does.
    adapt_rate: float = 0.01

    def __post_init__(self):
        _require(0 < self.warning_quantile < self.critical_quantile < 1, "warning_quantile",
                 "and critical_quantile must satisfy 0 < warning < critical < 1")
        _require(0 < self.warning_sigma < self.critical_sigma, "warning_sigma", "must be below critical_sigma")
        _require(0 <= self.adapt_rate < 1, "adapt_rate", "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class AlertsConfig:
    """When scores above the levels become WARNING or CRITICAL."""

    # CRITICAL needs at least k of the last n segments above the critical level.
    k: int = 3
    n: int = 5
    # WARNING needs at least warning_k of the last warning_n segments above the warning
    # level (a score above the critical level is above the warning level too): one
    # segment above it alone (a door, a forklift, a machine's odd minute) is no alert.
    # 1 and 1: every score above the warning level is WARNING.
    warning_k: int = 3
    warning_n: int = 5
    # Or a fault too small for any one segment: a CUSUM of standardised scores (how many
    # standard deviations above the mean of normal scores, less cusum_slack each
    # segment) that passes cusum_limit. null: off.
    cusum_slack: float = 0.5
    cusum_limit: Optional[float] = 20.0

    def __post_init__(self):
        _require(1 <= self.k <= self.n, "k", "must be between 1 and n")
        _require(1 <= self.warning_k <= self.warning_n, "warning_k", "must be between 1 and warning_n")
        _require(self.cusum_slack > 0, "cusum_slack", "must be positive")
        _require(self.cusum_limit is None or self.cusum_limit > 0, "cusum_limit", "must be positive or null")


@dataclasses.dataclass(frozen=True)
class DetectConfig:
    """`signalcraft detect`: the scorer, its levels and the alert rule."""

    # SQLite file with segments seen, scores, thresholds and alerts.
    # null: signalcraft.sqlite in the folder given to `detect`
    state: Optional[Path] = None
    # The trained detector (plain data, loaded with weights_only=True).
    model: Path = Path("models/detector.pt")
    # Segments taken as normal before the detector trains itself:
    # 60 segments of 10 s are 10 minutes of audio.
    calibration_segments: int = 60
    device: Literal["cpu", "cuda", "auto"] = "auto"  # for training and scoring; auto: CUDA when present
    # Where another machine's stream at the same microphone gained more new power in a
    # mel band, a stream's rise there is taken as a leak of that machine's sound and left
    # out before scoring, and so is its drop where another's new sound (or the room's,
    # mic_<N>/_room.pt) covers it; where the array cannot tell two machines apart, or
    # where another that clearly changed rose too, one's rise goes with that one
    # (detect/attribution.py). Takes effect when the detector trains.
    attribution: bool = True
    # Where the room's own sound (what separation gave to no machine, saved as
    # mic_<N>/_room.pt) is more than this many dB above its typical level in
    # calibration, in a mel band and frame, a loud event is taken to hide the machines
    # there: every machine's stream at that microphone is given its median over the
    # band's other frames before scoring (detect/room.py). null: off. Takes effect
    # when the detector trains (the state file keeps the value it trained with);
    # segments without a room tensor pass unmasked.
    room_mask_db: Optional[float] = 10.0
    scorer: ScorerConfig = dataclasses.field(default_factory=ScorerConfig)
    levels: LevelsConfig = dataclasses.field(default_factory=LevelsConfig)
    alerts: AlertsConfig = dataclasses.field(default_factory=AlertsConfig)

    def __post_init__(self):
        _require(self.calibration_segments >= 5, "calibration_segments", "must be at least 5")
        _require(self.room_mask_db is None or self.room_mask_db > 0, "room_mask_db", "must be above 0 dB (or null)")


# Keys of earlier versions, and where they are now.
MOVED_KEYS = {
    "detect.scorer": "detect.scorer.kind",
    **{f"detect.{k}": f"detect.scorer.autoencoder.{k}" for k in ("channels", "epochs", "batch_size",
                                                                   "learning_rate", "seed")},
    "detect.threshold_method": "detect.levels.method",
    **{f"detect.{k}": f"detect.levels.{k}" for k in ("warning_quantile", "critical_quantile", "warning_sigma",
                                                       "critical_sigma", "adapt_rate")},
    "detect.alert_k": "detect.alerts.k",
    "detect.alert_n": "detect.alerts.n",
    "detect.cusum_slack": "detect.alerts.cusum_slack",
    "detect.cusum_limit": "detect.alerts.cusum_limit",
}


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Hand-over from capture to processing."""

    # Finished segments waiting for the processing worker. When full, the newest
    # segment is dropped, logged, and counted in the next segment's manifest.
    queue_segments: int = 4

    def __post_init__(self):
        _require(self.queue_segments >= 1, "queue_segments", "must be at least 1")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where segments are written."""

    dir: Path = Path("output")  # output/<YYYY-MM-DD_HH-MM-SS>/ per segment, local time
    keep_raw: bool = False  # also keep each segment's audio as audio.flac
    # Retention, applied by `detect` after scoring (and by `prune`): delete the oldest
    # segments older than keep_days and/or beyond max_gb in all. Segments not yet
    # scored, and the evidence of alarms not yet acknowledged, are never deleted.
    # None: no limit. 7 days of 4 microphones x 4 machines take about 220 GB.
    keep_days: Optional[float] = 7.0
    max_gb: Optional[float] = None
    # `record` refuses to start, and stops, when the output disk has less free space.
    min_free_gb: float = 1.0

    def __post_init__(self):
        _require(self.keep_days is None or self.keep_days > 0, "keep_days", "must be positive, or null")
        _require(self.max_gb is None or self.max_gb > 0, "max_gb", "must be positive, or null")
        _require(self.min_free_gb >= 0, "min_free_gb", "must be 0 or more")


# MQTT topic levels may not hold these: a wildcard or a level separator in a site's name
# would publish into, or subscribe to, other sites' topics.
_TOPIC_FORBIDDEN = ("+", "#", "/", "\0")


@dataclasses.dataclass(frozen=True)
class MqttConfig:
    """The plant's MQTT broker (`signalcraft publish`, and `detect` after each run)."""

    host: str = ""
    port: int = 1883  # 8883 is usual with TLS
    tls: bool = False
    ca_file: Optional[Path] = None  # with tls: the CA that signed the broker's certificate; null: the system's
    username: Optional[str] = None
    # The password is never written in this file: a file holding it (one line, readable
    # by this user only) or the name of an environment variable.
    password_file: Optional[Path] = None
    password_env: Optional[str] = None
    client_id: Optional[str] = None  # null: signalcraft-<site>
    topic_prefix: str = "signalcraft"
    qos: Literal[1, 2] = 1
    keepalive_s: int = 60
    # How long to wait for the broker to answer (connect, or acknowledge a message)
    # before leaving the rest in the outbox for the next run, s.
    timeout_s: float = 10.0

    def __post_init__(self):
        _require(bool(self.host.strip()), "host", "must name the broker (host name or address)")
        _require(1 <= self.port <= 65535, "port", "must be between 1 and 65535")
        _require(self.ca_file is None or self.tls, "ca_file", "is used only with tls: true")
        _require(self.password_file is None or self.password_env is None, "password_file",
                 "and password_env: give one of them")
        _require(self.username is not None or (self.password_file is None and self.password_env is None),
                 "username", "is needed with a password")
        _require(bool(self.topic_prefix) and not any(c in self.topic_prefix for c in ("+", "#", "\0"))
                 and not self.topic_prefix.startswith("/") and not self.topic_prefix.endswith("/"),
                 "topic_prefix", "must be non-empty, without +, # or a leading or trailing /")
        _require(5 <= self.keepalive_s <= 65535, "keepalive_s", "must be between 5 and 65535")
        _require(self.timeout_s > 0, "timeout_s", "must be positive")


@dataclasses.dataclass(frozen=True)
class PublishConfig:
    """Machine states to the plant's MQTT broker through a local outbox (docs/fleet.md)."""

    # This pump room's name in topics and messages; null: this computer's host name.
    site: Optional[str] = None
    # Unsent messages older than this are dropped (logged), days. Sent ones are
    # forgotten after a day (or this, if shorter).
    max_outbox_days: float = 7.0
    mqtt: Optional[MqttConfig] = None  # null: publishing off (nothing is queued)

    def __post_init__(self):
        _require(self.site is None or (bool(self.site) and not any(c in self.site for c in _TOPIC_FORBIDDEN)),
                 "site", "must be non-empty, without /, + or # (it is one level of the MQTT topics)")
        _require(self.max_outbox_days > 0, "max_outbox_days", "must be positive")


# Keys refused with a reason of their own.
REFUSED_KEYS = {
    "publish.mqtt.password": "a password is never kept in config.yaml (it is often world-readable and "
                             "copied around); put it in a file readable only by this user and name it in "
                             "publish.mqtt.password_file, or name an environment variable in "
                             "publish.mqtt.password_env.",
}


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """Which runtime runs the networks: the separator and the detector's scoring path."""

    # torch: the models as trained. onnxruntime: their ONNX exports, written beside them
    # by `signalcraft export-onnx` (a part that is not a network, such as the online
    # scorer, stays as it is). Training always uses torch.
    runtime: Literal["torch", "onnxruntime"] = "torch"
    # With onnxruntime: fp32 exports, or the int8 ones (statically quantised on the
    # calibration data) where export-onnx wrote them.
    precision: Literal["fp32", "int8"] = "fp32"


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where log messages go besides stderr."""

    # Log file, rotated by size; None: stderr only. Every command appends to it,
    # also in quiet mode (-q), at `level`.
    file: Optional[Path] = Path("logs/signalcraft.log")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_mb: float = 10.0  # size at which the file is rotated, MB (10**6 bytes)
    backups: int = 5  # rotated files kept: signalcraft.log.1 ... .5

    def __post_init__(self):
        _require(self.max_mb > 0, "max_mb", "must be positive")
        _require(self.backups >= 1, "backups", "must be at least 1")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration, one section per stage."""

    capture: CaptureConfig = dataclasses.field(default_factory=CaptureConfig)
    noise: NoiseConfig = dataclasses.field(default_factory=NoiseConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    denoise: DenoiseConfig = dataclasses.field(default_factory=DenoiseConfig)
    separation: SeparationConfig = dataclasses.field(default_factory=SeparationConfig)
    features: FeaturesConfig = dataclasses.field(default_factory=FeaturesConfig)
    train_separator: TrainSeparatorConfig = dataclasses.field(default_factory=TrainSeparatorConfig)
    detect: DetectConfig = dataclasses.field(default_factory=DetectConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    publish: PublishConfig = dataclasses.field(default_factory=PublishConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    # Where this configuration came from (None: built-in defaults). Not a key.
    source: Optional[Path] = dataclasses.field(default=None, compare=False)


def find_config_file(explicit: Optional[Path]) -> Optional[Path]:
    """The file to read: explicit, else $SIGNALCRAFT_CONFIG, else ./config.yaml, else None."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    if Path(DEFAULT_FILE).is_file():
        return Path(DEFAULT_FILE)
    return None


def load_config(path: Optional[Path] = None) -> Config:
    """Read and check a configuration file (see module docstring for which one).

    Raises
    ------
    ConfigError
        The file is missing or unreadable, or is not YAML; the message names the file.
    ConfigProblems
        (a ConfigError) The file has unknown keys, values of the wrong type or values out
        of range: all of them, one line each, naming the file and the key.
    """
    path = find_config_file(path)
    if path is None:
        return _resolve_paths(Config(), Path.cwd())
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size / 1e6:.1f} MB is too large for a config file "
                              f"(at most {MAX_FILE_BYTES / 1e6:g} MB); is it the right file?")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file in UTF-8; save the config as UTF-8 YAML.") from None
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found. Pass an existing file with --config or "
            f"${ENV_VAR}, or copy config.yaml from the signalcraft source."
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return config_from_dict(data or {}, path)


MAX_FILE_BYTES = 1_000_000  # a config file is a few kB; anything this big is the wrong file


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps
    the last one silently, so an edit near the top of a section would do nothing)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` brings keys that the mapping may override
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # not a key any section has: refused later as unknown
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one section; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def config_from_dict(data: Any, path: Optional[Path] = None) -> Config:
    """Build a Config from plain data, as read from YAML. ``path`` is used in messages
    and as the base for relative paths (the current directory if None).

    Raises ConfigProblems naming every unknown key, wrong type and bad value at once."""
    problems = _Problems(str(path) if path is not None else "config")
    config = _build(Config, data, "", problems, exclude=("source",))
    if config is not None:
        nyquist = config.capture.sample_rate / 2
        if "capture.sample_rate" in problems.keys:
            pass  # a bad rate says nothing about the frequencies
        elif config.features.f_max is not None and config.features.f_max > nyquist:
            problems.add("features.f_max", f"{config.features.f_max:g} Hz is above half of capture.sample_rate "
                         f"({nyquist:g} Hz); lower it or set it to null.")
        elif config.features.f_min >= nyquist:
            problems.add("features.f_min", f"{config.features.f_min:g} Hz is not below half of "
                         f"capture.sample_rate ({nyquist:g} Hz); lower it.")
        else:
            top = config.features.f_max if config.features.f_max is not None else nyquist
            if config.detect.scorer.uses_flux and not config.detect.scorer.flux_min_hz < top:
                problems.add("detect.scorer.flux_min_hz",
                             f"{config.detect.scorer.flux_min_hz:g} Hz is not below the top of the mel bands "
                             f"({top:g} Hz: " + ("features.f_max" if config.features.f_max is not None
                                                else "half of capture.sample_rate") + "); lower it.")
    if problems.lines:
        raise ConfigProblems(problems.lines)
    base = path.resolve().parent if path is not None else Path.cwd()
    return dataclasses.replace(_resolve_paths(config, base), source=path)


class _Problems:
    """The problems found in one file, in the order found, one line each:
    ``<file>: <key>: <what is wrong and what to do>``."""

    def __init__(self, where: str):
        self.where = where
        self.lines: list[str] = []
        self.keys: set[str] = set()

    def add(self, key: str, message: str) -> None:
        # One line per key: a later check of a value already found wrong adds nothing.
        if key not in self.keys:
            self.keys.add(key)
            self.lines.append(f"{self.where}: {key}: {message}")


def _build(cls: type, data: Any, prefix: str, problems: _Problems, exclude: tuple[str, ...] = ()):
    """An instance of the dataclass ``cls`` from the mapping ``data``, or None if
    ``data`` is not a mapping. Each problem is added to ``problems`` and checking goes
    on: a key that fails keeps its default, so the checks of the other keys still run."""
    if not isinstance(data, dict):
        problems.add(prefix.rstrip(".") or "top level", f"expected a mapping of keys, got {_kind(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            if f"{prefix}{key}" in REFUSED_KEYS:
                problems.add(f"{prefix}{key}", REFUSED_KEYS[prefix + key])
            elif f"{prefix}{key}" in MOVED_KEYS:
                problems.add(f"{prefix}{key}", f"this key is now {MOVED_KEYS[prefix + key]}; move it there (see "
                             "config.yaml in the signalcraft source).")
            else:
                problems.add(f"{prefix}{key}", f"unknown key. Known keys here: {', '.join(fields)}.")
            continue
        try:
            converted = _convert(hints[key], value, f"{prefix}{key}", problems)
        except _FieldError as e:
            problems.add(e.key, str(e))
            continue
        if converted is not None or value is None:  # None from _build: a section that is not a mapping
            kwargs[key] = converted
    failed: list[_FieldError] = []
    token = _failed_checks.set(failed)
    try:
        instance = cls(**kwargs)
    finally:
        _failed_checks.reset(token)
    for e in failed:
        problems.add(f"{prefix}{e.key}", str(e))
    return instance


def _convert(tp: Any, value: Any, key: str, problems: _Problems) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists to tuples,
    strings to Paths, ints to floats). A wrong value raises _FieldError naming ``key``;
    the problems inside a section are added to ``problems``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict) and key in MOVED_KEYS:
            raise _FieldError(key, f"now a section; write {key}: {{{MOVED_KEYS[key].rsplit('.', 1)[1]}: {value}}} "
                              "(see config.yaml in the signalcraft source).")
        return _build(tp, value, key + ".", problems)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, key, problems)
        for option in options:
            try:
                return _convert(option, value, key, problems)
            except _FieldError:
                continue
        raise _type_error(key, tp, value)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):  # true is not 1
            return value
        raise _FieldError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise _type_error(key, tp, value)
        return tuple(_convert(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        return {_convert(args[0], k, f"{key} (a name)", problems): _convert(args[1], v, f"{key}.{k}", problems)
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise _FieldError(key, f"must be a finite number, got {str(value)[:40]}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            return Path(value).expanduser()
    raise _type_error(key, tp, value)


def _type_error(key: str, tp: Any, value: Any) -> _FieldError:
    return _FieldError(key, f"expected {_describe(tp)}, got {_kind(value)} {value!r}")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        plural = {int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(typing.get_args(tp)[0], 'values')}"
    if origin is dict:
        return "a mapping of names to names"
    if origin is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             Path: "a path", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _resolve_paths(obj: Any, base: Path) -> Any:
    """Return ``obj`` with every relative Path field made absolute against ``base``."""
    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _resolve_paths(value, base)
        elif isinstance(value, Path) and f.name != "source" and not value.is_absolute():
            changes[f.name] = Path(os.path.normpath(base / value))
    return dataclasses.replace(obj, **changes)
