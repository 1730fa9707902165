"""The manifest of a segment: what was recorded, how it was processed, which files
it holds. Typed and versioned.

``FORMAT`` is the version this signalcraft writes; it reads that and every earlier
one (format 1 had no per-microphone count of non-finite samples: read as 0; formats 1
and 2 had no reference microphones: read as none; formats 1 to 3 had no room tensors:
read as none). A
manifest of a newer version is refused with a message to upgrade (never
half-understood); a known one is read strictly: every key of its version present,
nothing unknown, each value of its type. Nothing read from disk is trusted: a source name that is not a plain file name,
a tensor shape that is not positive, a start time without a time zone are all refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import StorageError
from ..files import read_regular
from .layout import AUDIO, MANIFEST, mic_folder, parse_mic_folder, room_file, tensor_file, valid_source

FORMAT = 4


MAX_BYTES = 1_000_000  # a manifest is a few kB


class ManifestError(StorageError):
    """A manifest that is unreadable, malformed or of an unknown version. ``transient``:
    the file could not be read this time (permissions, I/O), which may change."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclasses.dataclass(frozen=True)
class Level:
    """Input level of one microphone over the segment."""

    mic: int
    channel: int
    rms_dbfs: Optional[float]  # None: digital silence
    peak: float
    clipped_fraction: float
    nonfinite_samples: int = 0  # NaN or infinite samples (set to 0 before the levels were taken)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything a segment folder records about itself (in the form of the current
    ``FORMAT``, whatever version it was read from).

    ``tensors`` maps each microphone (0-based over the recorded channels, so mic N is
    device channel ``channels[N]``) to the sources exported for it.
    """

    start_time_utc: dt.datetime  # aware; first sample
    duration_s: float
    sample_rate: int
    device: str
    channels: tuple[int, ...]
    start_frame: int
    overflows: int
    dropped_frames: int
    dropped_segments: int
    reconnects: int
    levels: tuple[Level, ...]
    denoise: Optional[dict]  # the denoise settings and noise clips used; None: not denoised
    separator: dict  # SeparatorInfo.to_dict()
    features: dict  # LogMel.settings()
    tensors: dict[int, tuple[str, ...]]
    signalcraft_version: str
    # The reference microphones and the canceller's settings (channels, levels, method,
    # ...); None: no reference microphones. They are recorded, never exported as mic_N.
    reference: Optional[dict] = None
    # The microphones with a room tensor (mic_<N>/_room.pt: what separation gave to no
    # machine, as a log-mel tensor of the same shape), for detect to tell where the
    # room, not a machine, was loud. Empty without separation.
    room: tuple[int, ...] = ()
    files: tuple[str, ...] = ()  # relative paths, set by the writer

    @property
    def tensor_shape(self) -> tuple[int, int, int]:
        return (1, self.features["n_mels"], self.features["n_frames"])

    def tensor_keys(self) -> list[tuple[int, str]]:
        """(mic, source) of every tensor, in order."""
        return [(mic, source) for mic in sorted(self.tensors) for source in self.tensors[mic]]

    def to_dict(self) -> dict:
        """The JSON form (``start_time_local`` is added for people reading the file)."""
        return {
            "format": FORMAT,
            "signalcraft_version": self.signalcraft_version,
            "start_time_utc": self.start_time_utc.isoformat(),
            "start_time_local": self.start_time_utc.astimezone().isoformat(),
            "duration_s": self.duration_s,
            "sample_rate": self.sample_rate,
            "device": self.device,
            "channels": list(self.channels),
            "start_frame": self.start_frame,
            "overflows": self.overflows,
            "dropped_frames": self.dropped_frames,
            "dropped_segments": self.dropped_segments,
            "reconnects": self.reconnects,
            "levels": [dataclasses.asdict(lv) for lv in self.levels],
            "denoise": self.denoise,
            "separator": self.separator,
            "features": self.features,
            "tensors": {mic_folder(mic): list(sources) for mic, sources in sorted(self.tensors.items())},
            "reference": self.reference,
            "room": [mic_folder(mic) for mic in sorted(self.room)],
            "files": sorted(self.files),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> "Manifest":
        """Parse the JSON form strictly.

        Raises
        ------
        ManifestError
            Of another version, a key missing or unknown, or a value of the wrong type
            or out of range; the message names ``where`` and the key.
        """
        try:
            return cls._from_dict(data, where)
        except (TypeError, ValueError, OverflowError, RecursionError) as e:  # values no check above foresaw
            raise ManifestError(f"{where}: malformed ({type(e).__name__}: {str(e)[:200]})") from None

    @classmethod
    def _from_dict(cls, data: Any, where: str) -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: not a JSON object")
        version = data.get("format")
        if not _is_int(version):
            raise ManifestError(f"{where}: no format version")
        if version > FORMAT:
            raise ManifestError(f"{where}: written by a newer signalcraft (manifest format {version}; this one reads "
                                f"up to {FORMAT}). Upgrade signalcraft to read this segment.")
        if version < 1:
            raise ManifestError(f"{where}: manifest format {version} is not one signalcraft wrote")
        later = (_BEFORE_3 if version < 3 else frozenset()) | (_BEFORE_4 if version < 4 else frozenset())
        optional = _FORMAT_1_OPTIONAL if version == 1 else frozenset()
        missing = sorted(_KEYS - optional - later - data.keys())
        unknown = sorted(data.keys() - (_KEYS - later))  # a later format's key is unknown to this one
        if missing or unknown:
            problems = [f"missing {', '.join(missing)}"] if missing else []
            problems += [f"unknown {', '.join(unknown)}"] if unknown else []
            raise ManifestError(f"{where}: " + "; ".join(problems))
        r = _Reader(data, where)
        start = r.time("start_time_utc")
        r.string("start_time_local")
        channels = tuple(r.int_list("channels", minimum=1))
        features = r.mapping("features")
        for key in ("n_mels", "n_frames"):
            if not _is_int(features.get(key)) or features[key] < 1:
                raise ManifestError(f"{where}: features.{key} must be a positive integer")
        tensors: dict[int, tuple[str, ...]] = {}
        for name, sources in r.mapping("tensors").items():
            try:
                mic = parse_mic_folder(name)
            except ValueError as e:
                raise ManifestError(f"{where}: tensors: {e}") from None
            if not isinstance(sources, list) or not all(valid_source(s) for s in sources) \
                    or len(set(sources)) != len(sources):
                raise ManifestError(f"{where}: tensors.{name} must be a list of distinct source names")
            tensors[mic] = tuple(sources)
        room = []
        for name in r.string_list("room") if "room" in data else []:
            try:
                mic = parse_mic_folder(name)
            except ValueError as e:
                raise ManifestError(f"{where}: room: {e}") from None
            if mic not in tensors or mic in room:
                raise ManifestError(f"{where}: room lists {name}, which is not one of its microphones once")
            room.append(mic)
        files = r.string_list("files")
        allowed = {tensor_file(m, s) for m, ss in tensors.items() for s in ss} | {room_file(m) for m in room} | {AUDIO}
        if not set(files) <= allowed:
            raise ManifestError(f"{where}: files lists {sorted(set(files) - allowed)[0]!r}, which is not a file of "
                                "this layout")
        levels = []
        for k, lv in enumerate(r.list("levels")):
            keys = _LEVEL_KEYS if version >= 2 else _LEVEL_KEYS - {"nonfinite_samples"}
            if not isinstance(lv, dict) or set(lv) != keys:
                raise ManifestError(f"{where}: levels[{k}] must have the keys {', '.join(sorted(keys))}")
            lr = _Reader(lv, f"{where}: levels[{k}]")
            levels.append(Level(lr.int("mic"), lr.int("channel"), lr.number("rms_dbfs", optional=True),
                                lr.number("peak"), lr.number("clipped_fraction"),
                                lr.int("nonfinite_samples") if version >= 2 else 0))
        denoise = data["denoise"]
        if denoise is not None and not isinstance(denoise, dict):
            raise ManifestError(f"{where}: denoise must be an object or null")
        reference = data.get("reference")
        if reference is not None and not isinstance(reference, dict):
            raise ManifestError(f"{where}: reference must be an object or null")
        return cls(
            start_time_utc=start, duration_s=r.number("duration_s"), sample_rate=r.int("sample_rate", minimum=1),
            device=r.string("device"), channels=channels, start_frame=r.int("start_frame"),
            overflows=r.int("overflows"), dropped_frames=r.int("dropped_frames"),
            dropped_segments=r.int("dropped_segments"),
            reconnects=r.int("reconnects") if "reconnects" in data else 0, levels=tuple(levels),
            denoise=denoise, separator=r.mapping("separator"), features=features, tensors=tensors,
            signalcraft_version=r.string("signalcraft_version"), reference=reference, room=tuple(room),
            files=tuple(files),
        )


_KEYS = frozenset(set(Manifest.__dataclass_fields__) | {"format", "start_time_local"})
_LEVEL_KEYS = frozenset(Level.__dataclass_fields__)
# Keys that early format-1 manifests did not have yet (read as 0).
_FORMAT_1_OPTIONAL = frozenset({"reconnects"})
_BEFORE_3 = frozenset({"reference"})  # keys that formats 1 and 2 did not have
_BEFORE_4 = frozenset({"room"})  # keys that formats 1 to 3 did not have


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Reader:
    """Typed access to one JSON object; every failure names the key."""

    def __init__(self, data: dict, where: str):
        self.data, self.where = data, where

    def _fail(self, key: str, what: str):
        raise ManifestError(f"{self.where}: {key} must be {what}, not {self.data.get(key)!r:.60}")

    def int(self, key: str, minimum: int = 0) -> int:
        x = self.data.get(key)
        if not _is_int(x) or x < minimum:
            self._fail(key, f"an integer of at least {minimum}")
        return x

    def number(self, key: str, optional: bool = False) -> Optional[float]:
        x = self.data.get(key)
        if optional and x is None:
            return None
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
            self._fail(key, "a finite number")
        return float(x)

    def string(self, key: str) -> str:
        x = self.data.get(key)
        if not isinstance(x, str):
            self._fail(key, "a string")
        return x

    def time(self, key: str) -> dt.datetime:
        try:
            t = dt.datetime.fromisoformat(self.string(key))
        except ValueError:
            t = None
        if t is None or t.tzinfo is None:
            self._fail(key, "an ISO 8601 time with its UTC offset")
        return t.astimezone(dt.timezone.utc)

    def mapping(self, key: str) -> dict:
        x = self.data.get(key)
        if not isinstance(x, dict):
            self._fail(key, "an object")
        return x

    def list(self, key: str) -> list:
        x = self.data.get(key)
        if not isinstance(x, list):
            self._fail(key, "a list")
        return x

    def int_list(self, key: str, minimum: int = 0) -> list[int]:
        x = self.list(key)
        if not all(_is_int(v) and v >= minimum for v in x):
            self._fail(key, f"a list of integers of at least {minimum}")
        return x

    def string_list(self, key: str) -> list[str]:
        x = self.list(key)
        if not all(isinstance(v, str) for v in x):
            self._fail(key, "a list of strings")
        return x


def manifest_signature(folder: Path) -> str:
    """Identifies the manifest of ``folder`` as it is now, for this signalcraft: its
    size, modification time and the format this version reads. A rejected manifest is
    read again once this changes (the file was fixed, or signalcraft was upgraded)."""
    try:
        st = os.lstat(Path(folder) / MANIFEST)
    except OSError:
        return "absent"
    return f"format {FORMAT}; {st.st_size} bytes; mtime {st.st_mtime_ns}"


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a segment folder.

    Raises
    ------
    ManifestError
        Unreadable, not JSON, malformed or of an unknown version; names the file.
    FileNotFoundError
        The folder has no manifest (it is not a complete segment).
    """
    path = Path(folder) / MANIFEST
    try:
        text = read_regular(path, MAX_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        permanent = e.errno in (errno.ELOOP, errno.EINVAL, errno.EFBIG)  # what the file is, not a passing failure
        raise ManifestError(f"{path}: cannot read segment manifest ({e.strerror})", transient=not permanent) from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ManifestError(f"{path}: not valid JSON (nested too deep)") from None
    except ValueError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_dict(data, str(path))
