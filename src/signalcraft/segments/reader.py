"""Reading segments: which are complete, in what order, and their tensors.

The order of segments is one rule everywhere: by ``start_time_utc`` from the manifest,
then by folder name. Folder names are local time and repeat when the clocks go back,
so they never decide the order alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import math
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Container, Optional

from ..clock import FOLDER_TIME
from ..files import load_failure, read_regular
from .layout import MANIFEST, candidate_names, room_file, tensor_file
from .manifest import Manifest, ManifestError, read_manifest

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TENSOR_OVERHEAD_BYTES = 64 * 1024  # torch.save's archive around the tensor's data


@dataclasses.dataclass(frozen=True)
class StoredSegment:
    """A complete segment folder and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def start_time(self) -> dt.datetime:
        """UTC time of the first sample."""
        return self.manifest.start_time_utc

    def load_tensor(self, mic: int, source: str) -> "torch.Tensor":
        """The tensor of (mic, source); TensorError if it is not usable."""
        return read_tensor(self.path, mic, source, self.manifest.tensor_shape)

    def load_tensors(self, reported: bool = False) -> tuple[dict[tuple[int, str], "torch.Tensor"], int]:
        """Every tensor the manifest lists, by (mic, source), and how many were
        unusable (unreadable, of the wrong shape or type, non-finite; each is logged as
        a warning, or only in the debug log if ``reported`` already)."""
        out, corrupt = {}, 0
        for mic, source in self.manifest.tensor_keys():
            try:
                out[(mic, source)] = self.load_tensor(mic, source)
            except TensorError as e:
                log.log(logging.DEBUG if reported else logging.WARNING, "%s", e)
                corrupt += 1
        return out, corrupt

    def load_room(self, reported: bool = False) -> dict[int, "torch.Tensor"]:
        """The room tensor of each microphone that has one (manifest format 4 on, with
        separation), by mic; one that is unusable is left out and logged as
        ``load_tensors`` logs it."""
        out = {}
        for mic in self.manifest.room:
            try:
                out[mic] = _read(self.path / room_file(mic), self.manifest.tensor_shape)
            except TensorError as e:
                log.log(logging.DEBUG if reported else logging.WARNING, "%s", e)
        return out


class TensorError(ValueError):
    """A tensor file that is not a usable log-mel tensor."""


def read_tensor(folder: Path, mic: int, source: str, shape: tuple[int, ...]) -> "torch.Tensor":
    """The float32 tensor of (mic, source) in the segment ``folder``.

    Raises
    ------
    TensorError
        Missing, a link (the file or its microphone folder), not a regular file, far
        larger than a tensor of that shape, unreadable, not a tensor (or a pickle that
        is more than one: refused unread by ``weights_only``), of another shape, or
        holding NaN or infinity.
    """
    return _read(Path(folder) / tensor_file(mic, source), shape)


def _read(path: Path, shape: tuple[int, ...]) -> "torch.Tensor":
    import torch  # here: listing segments needs no torch

    try:
        if not stat.S_ISDIR(os.lstat(path.parent).st_mode):
            raise TensorError(f"{path}: skipped, {path.parent.name} is not a folder (a link is not followed)")
        data = read_regular(path, math.prod(shape) * 8 + TENSOR_OVERHEAD_BYTES)
    except OSError as e:
        raise TensorError(f"{path}: skipped, cannot read it ({e.strerror})") from None
    try:
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails inside torch.load in many ways
        raise TensorError(f"{path}: skipped, not a usable tensor ({load_failure(e)})") from None
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TensorError(f"{path}: skipped, holds {type(tensor).__name__}, not a float tensor")
    if tuple(tensor.shape) != tuple(shape):
        raise TensorError(f"{path}: skipped, expected a tensor of shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise TensorError(f"{path}: skipped, non-finite values")
    return tensor.float()


def is_complete(folder: Path) -> bool:
    """True for a published segment folder (its manifest is there)."""
    return (Path(folder) / MANIFEST).is_file()


def open_segment(folder: Path) -> StoredSegment:
    """The complete segment in ``folder``.

    Raises
    ------
    ManifestError
        Its manifest is unreadable, malformed or of an unknown version.
    FileNotFoundError
        It has no manifest: not a (complete) segment.
    """
    return StoredSegment(Path(folder), read_manifest(folder))


def list_segments(
    output_dir: Path,
    skip: Container[str] = (),
    since: Optional[dt.datetime] = None,
    until: Optional[dt.datetime] = None,
    on_error: Optional[Callable[[Path, ManifestError], None]] = None,
) -> list[StoredSegment]:
    """The complete segments under ``output_dir``, oldest first (start time, then
    name), leaving out the folder names in ``skip`` and those starting before ``since``
    or at or after ``until`` (aware datetimes). A folder without a manifest is not a
    segment (yet); one whose manifest cannot be used is left out and handed to
    ``on_error`` (default: logged as a warning)."""
    found = []
    for name in candidate_names(output_dir):
        if name in skip:
            continue
        try:
            segment = open_segment(Path(output_dir) / name)
        except FileNotFoundError:
            continue
        except ManifestError as e:
            if on_error is None:
                log.warning("segment skipped: %s", e)
            else:
                on_error(Path(output_dir) / name, e)
            continue
        if (since is None or segment.start_time >= since) and (until is None or segment.start_time < until):
            found.append(segment)
    return sorted(found, key=lambda s: (s.start_time, s.name))


# Folder names are local time: when the clocks go back, the newest segment can have a
# name up to an hour earlier than another's. Only folders named within this much of the
# newest name are opened to find the newest segment (not months of them).
NEWEST_NAME_SLACK = dt.timedelta(hours=3)


def newest_segment(output_dir: Path) -> Optional[StoredSegment]:
    """The complete segment that started last under ``output_dir`` (None: none yet),
    opening only the folders named within ``NEWEST_NAME_SLACK`` of the newest name. An
    unusable manifest is passed by silently (the detector reports those)."""
    names = sorted(candidate_names(output_dir))
    if not names:
        return None
    # Names are fixed-width local times: text order is time order, but for the clocks going back.
    cutoff = (dt.datetime.strptime(names[-1][:19], FOLDER_TIME) - NEWEST_NAME_SLACK).strftime(FOLDER_TIME)
    segments = list_segments(output_dir, skip={n for n in names if n < cutoff}, on_error=lambda folder, e: None)
    return segments[-1] if segments else None
