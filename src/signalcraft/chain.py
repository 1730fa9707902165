"""The chain: the stages of ``dsp`` composed from the configuration and the resources
(``resources``), applied to one segment at a time, and the export of its tensors and
manifest (``segments``). No device or capture code here: `record` and `process`
(``signalcraft.record``) hand it segments.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from . import __version__
from .capture import Segment
from .config import Config
from .errors import ConfigError
from .files import atomic_write
from .segments import Level, Manifest, SegmentWriter

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Processes one segment and returns the folder it was exported to. The second argument
# counts segments dropped since the previous one was queued.
Processor = Callable[[Segment, int], Path]
# Builds the processor once the channels to record are known (before capture starts, so
# a missing noise clip or model fails before any audio is lost): (microphone channels,
# reference channels) -> processor.
ProcessorFactory = Callable[[tuple[int, ...], tuple[int, ...]], Processor]


def segment_manifest(segment: Segment, dropped_segments: int, **processing) -> Manifest:
    """The manifest of an exported segment: its capture, and ``processing`` (levels,
    denoise, separator, features and tensors: see ``Manifest``)."""
    return Manifest(
        signalcraft_version=__version__,
        start_time_utc=segment.start_time,
        duration_s=segment.duration,
        sample_rate=segment.sample_rate,
        device=segment.device,
        # mic_<N> in the output is channels[N]: N counts from 0 over the recorded channels.
        channels=tuple(segment.channels),
        start_frame=segment.start_frame,
        overflows=segment.overflows,
        dropped_frames=segment.dropped_frames,
        dropped_segments=dropped_segments,
        reconnects=segment.reconnects,
        **processing,
    )


def write_flac(path: Path, segment: Segment, sample_format: str) -> Path:
    """Write a segment's audio losslessly: 16-bit FLAC for 16-bit capture, else 24-bit."""
    import soundfile as sf

    frames = segment.audio.T  # soundfile wants (frames, channels)
    if sample_format == "int16":
        # Exact: capture samples are k / 2**15, so this recovers the integers.
        data, subtype = np.round(frames * 2**15).clip(-(2**15), 2**15 - 1).astype(np.int16), "PCM_16"
    else:
        data, subtype = frames, "PCM_24"
    return atomic_write(
        path, lambda tmp: sf.write(str(tmp), data, segment.sample_rate, subtype=subtype, format="FLAC")
    )


class Chain:
    """The chain for one set of channels: the reference canceller (with reference
    channels), per-channel spectral gating, separation, a log-mel tensor per
    (microphone, machine), export. The stages (``dsp.Stage``) carry their state from
    one segment to the next; it is reset when a segment does not follow on from the
    previous one (a reconnect, a dropped segment, another device or file, a gap).

    Parameters
    ----------
    config : Config
    channels : tuple of int
        1-based device channels of the microphones, in the order of the segments' rows
        (mic_0 first).
    sample_rate : int
        Hz.
    references : tuple of int
        1-based device channels of the reference microphones (capture.reference_channels):
        the segments' last rows. They feed the canceller and are never exported.
    """

    def __init__(self, config: Config, channels: tuple[int, ...], sample_rate: int,
                 references: tuple[int, ...] = ()):
        from .dsp.canceller import Canceller
        from .dsp.gate import Denoiser
        from .features import LogMel
        from .resources import load_noise_clips, load_separator

        self.config = config
        self.channels = tuple(channels)
        self.references = tuple(references)
        self.sample_rate = sample_rate
        d = config.denoise
        self.noise_clips = load_noise_clips(config, self.channels, sample_rate) if d.enabled and d.stationary \
            else None
        self.canceller = Canceller(config.reference, len(self.channels), len(self.references), sample_rate) \
            if self.references else None
        clips = None if self.noise_clips is None else [clip.audio for clip in self.noise_clips]
        self.denoiser = Denoiser(d, sample_rate, clips) if d.enabled else None
        self.separator = load_separator(config, len(self.channels), sample_rate)
        if self.separator.spatial:
            self._place_room()
        self.stages = [s for s in (self.canceller, self.denoiser, self.separator) if s is not None]
        self.exports = exported_sources(config, self.separator.sources)
        self.logmel = LogMel(config.features, sample_rate, round(config.capture.segment_seconds * sample_rate))
        self._follows: Optional[tuple[str, int]] = None  # (device, frame) a segment that follows on starts at

    def _place_room(self) -> None:
        """Give the spatial filter the room from the noise clips, when they were
        recorded on all microphones at once: its covariance and (for
        ``separation.room_headroom``) its level. The clips as recorded, not gated: where
        the gate closes, the mixture is gone and the room's level does not matter; where
        it opens, the room is there at the level recorded."""
        from .noise import together

        room = None if self.noise_clips is None else together(self.noise_clips)
        if room is not None:
            self.separator.set_room(room)
        else:
            log.info("spatial filter: %s; the room's part is estimated in each segment",
                     "no noise clips (denoising is off)" if self.noise_clips is None
                     else "the noise clips were not recorded together")

    @property
    def names(self) -> tuple[str, ...]:
        """What the tensors of a microphone are named, in order: the machines of
        ``separation.assets``, else the separator's sources."""
        return tuple(name for name, _ in self.exports)

    def reset(self) -> None:
        """Forget what the stages carried over: the next segment stands alone."""
        for stage in self.stages:
            if hasattr(stage, "reset"):
                stage.reset()
        self._follows = None

    def clean(self, audio: np.ndarray, reference: Optional[np.ndarray] = None) -> np.ndarray:
        """The stages before separation (reference canceller, gate): float32 audio,
        shape = (mics, samples), and the references' audio, shape = (references,
        samples) -> the cleaned microphones, shape = (mics, samples)."""
        x = audio
        for stage in self.stages[:-1]:  # the separator is last
            x = stage(x, reference)
        return x

    def features(self, audio: np.ndarray, reference: Optional[np.ndarray] = None) -> "torch.Tensor":
        """float32 audio, shape = (mics, samples), and the references' audio, shape =
        (references, samples) -> log-mel tensor, shape = (mics, len(names), n_mels,
        n_frames), one per exported machine. Does not change ``audio``."""
        return self.tensors(audio, reference, room=False)[0]

    @property
    def separates(self) -> bool:
        """A separator model is in use (so there is a room part to export)."""
        return self.config.separation.model is not None

    def tensors(self, audio: np.ndarray, reference: Optional[np.ndarray] = None, room: bool = True
                ) -> tuple["torch.Tensor", Optional["torch.Tensor"]]:
        """``features``, and with a separator model (and ``room``) the room's log-mel
        tensor per microphone, shape = (mics, 1, n_mels, n_frames): the cleaned audio less
        the sources of the machines exported, what separation gave to no machine in the
        room (else None)."""
        clean = self.clean(audio, reference)
        sources = self.separator(clean)  # (mics, sources, samples)
        mels = self.logmel(sources[:, [k for _, k in self.exports]])
        if not (room and self.separates):
            return mels, None
        machines = sorted({k for _, k in self.exports})  # two assets of one source count once
        return mels, self.logmel((clean - sources[:, machines].sum(axis=1))[:, None])

    def __call__(self, segment: Segment, dropped_segments: int = 0) -> Path:
        rows = self.channels + self.references
        if segment.channels != rows or segment.sample_rate != self.sample_rate:
            raise ValueError(f"chain is for channels {rows} at {self.sample_rate} Hz, segment has "
                             f"{segment.channels} at {segment.sample_rate} Hz")
        if (segment.device, segment.start_frame) != self._follows or dropped_segments or segment.reconnects:
            self.reset()
        self._follows = (segment.device, segment.start_frame + segment.audio.shape[-1])
        segment, nonfinite = _finite(segment)
        m = len(self.channels)
        mics = [mic for mic, bad in enumerate(nonfinite[:m]) if not bad]  # a tensor never hides a broken channel
        for row, bad in enumerate(nonfinite):
            if bad:
                what = f"mic_{row}" if row < m else "reference"
                log.warning("%s %s (channel %d): %d samples of the segment starting %s are not finite (NaN or "
                            "infinity); %s and the manifest counts them. Check the interface or the file.",
                            segment.device, what, segment.channels[row], bad, segment.start_time.isoformat(),
                            "its tensors are not exported" if row < m else "they are cancelled as silence")
        mels, room = self.tensors(segment.audio[:m], segment.audio[m:] if self.references else None)
        with SegmentWriter(self.config.output.dir, segment.start_time) as w:
            for mic in mics:
                for k, name in enumerate(self.names):
                    w.save_tensor(mic, name, mels[mic, k][None].clone())  # clone: only this slice's storage
                if room is not None:
                    w.save_room(mic, room[mic].clone())
            if self.config.output.keep_raw:  # every recorded channel, the references too
                write_flac(w.audio_path(), segment, self.config.capture.sample_format)
            return w.commit(self.manifest(segment, dropped_segments, nonfinite, mics))

    def manifest(self, segment: Segment, dropped_segments: int, nonfinite: list[int], mics: list[int]) -> Manifest:
        from .noise import clip_path, levels

        m = len(self.channels)
        lv = [levels(row, self.config.noise.clip_level) for row in segment.audio]

        def level(n: int, channel: int, v, bad: int) -> Level:
            return Level(mic=n, channel=channel, rms_dbfs=round(v.rms_dbfs, 2) if np.isfinite(v.rms_dbfs) else None,
                         peak=round(v.peak, 6), clipped_fraction=v.clipped_fraction, nonfinite_samples=bad)

        reference = None
        if self.references:
            reference = {
                "channels": list(self.references),
                "levels": [{k: x for k, x in dataclasses.asdict(level(0, c, v, bad)).items() if k != "mic"}
                           for c, v, bad in zip(self.references, lv[m:], nonfinite[m:])],  # not microphones
                **dataclasses.asdict(self.config.reference), "block": self.canceller.block,  # rls: taps
                "resets": self.canceller.resets,  # divergences reset since the chain started
            }
        return segment_manifest(
            dataclasses.replace(segment, channels=self.channels), dropped_segments,
            levels=tuple(level(n, c, v, bad) for n, (c, v, bad) in enumerate(zip(self.channels, lv, nonfinite))),
            denoise=(
                None if self.denoiser is None else {
                    **dataclasses.asdict(self.config.denoise),
                    "noise_clips": None if self.noise_clips is None else [
                        {"file": clip_path(self.config.noise.dir, clip.channel).name, "channel": clip.channel,
                         "device": clip.device, "recorded_at": clip.recorded_at.isoformat()}
                        for clip in self.noise_clips
                    ],
                }
            ),
            separator={**self.separator.info.to_dict(),
                       **({"assets": dict(self.config.separation.assets)} if self.config.separation.assets else {})},
            features=self.logmel.settings(),
            tensors={n: self.names for n in mics},
            reference=reference,
            room=tuple(mics) if self.separates else (),
        )


def exported_sources(config: Config, sources: tuple[str, ...]) -> list[tuple[str, int]]:
    """(name, index of the separator's source) of each tensor a microphone exports.

    Raises
    ------
    ConfigError
        ``separation.assets`` maps a machine to a source the separator does not have.
    """
    assets = config.separation.assets
    if assets is None:
        return [(source, k) for k, source in enumerate(sources)]
    unknown = {asset: source for asset, source in assets.items() if source not in sources}
    if unknown:
        where = config.source or "config"
        raise ConfigError(
            f"{where}: separation.assets: {', '.join(f'{a}: {s}' for a, s in unknown.items())}: "
            f"{'no such source' if len(unknown) == 1 else 'no such sources'} in the separator "
            f"{config.separation.model or '(none: the one source is mix)'}, whose sources are "
            f"{', '.join(sources)}. Map each machine to one of those."
        )
    return [(asset, sources.index(source)) for asset, source in assets.items()]


def _finite(segment: Segment) -> tuple[Segment, list[int]]:
    """The segment with NaN and infinite samples set to 0 (a copy, only if there are
    any), and how many there were per channel."""
    bad = ~np.isfinite(segment.audio)
    counts = [int(n) for n in bad.sum(axis=-1)]
    if not any(counts):
        return segment, counts
    return dataclasses.replace(segment, audio=np.where(bad, np.float32(0), segment.audio)), counts


def chain_factory(config: Config, sample_rate: Optional[int] = None) -> ProcessorFactory:
    """Chains for `record` (capture rate) and `process` (the file's rate)."""
    return lambda channels, references=(): Chain(config, channels, sample_rate or config.capture.sample_rate,
                                                 references)
