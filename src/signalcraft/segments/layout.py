"""Where a segment's files are: the one definition of the on-disk layout.

::

    <output>/<YYYY-MM-DD_HH-MM-SS>[_k]/   local time of the segment's first sample
        manifest.json                     written last: a folder without it is no segment
        mic_<N>/<source>.pt               1 x n_mels x n_frames float32 log-mel tensor
        mic_<N>/_room.pt                  the same of what separation left to no machine
        audio.flac                        the captured audio (output.keep_raw)
    <output>/.incomplete/                 segments being written or deleted

``N`` counts from 0 over the recorded channels; ``source`` is a separator source name
(or the machine's asset name). ``_room`` can never be a source name: they start with a
letter or digit.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from .. import clock

MANIFEST = "manifest.json"
AUDIO = "audio.flac"
ROOM = "_room"  # the room tensor's name in a microphone folder (never a source name)
FOLDER_FORMAT = clock.FOLDER_TIME

# A source name is a single, harmless path component (it comes from a model file and is
# read back from manifests, which are not trusted): letters and digits of any script,
# then also '_', '-', '.', '+' and spaces; never '/', a leading '.' or '..'.
_SOURCE = re.compile(r"^[^\W_][\w .+-]{0,63}$")
_MIC = re.compile(r"^mic_(0|[1-9][0-9]{0,3})$")
_SEGMENT_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(_[1-9][0-9]{0,2})?$")


def folder_name(start_time: dt.datetime) -> str:
    """Folder name for a segment: its start in local time, ``YYYY-MM-DD_HH-MM-SS``."""
    return start_time.astimezone().strftime(FOLDER_FORMAT)


def mic_folder(mic: int) -> str:
    """``mic_<N>``."""
    return f"mic_{mic}"


def parse_mic_folder(name: str) -> int:
    """N of ``mic_<N>``; ValueError for anything else."""
    match = _MIC.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a microphone folder name (mic_<N>)")
    return int(match[1])


def valid_source(name: str) -> bool:
    """True for a source name that is safe as a file name."""
    return isinstance(name, str) and _SOURCE.match(name) is not None and ".." not in name


def tensor_file(mic: int, source: str) -> str:
    """The tensor of (mic, source), relative to its segment folder."""
    if not valid_source(source):
        raise ValueError(f"{source!r} is not a usable source name (letters and digits, then also '_', '-', '.', "
                         "'+' or spaces; at most 64)")
    return f"{mic_folder(mic)}/{source}.pt"


def room_file(mic: int) -> str:
    """The room tensor of a microphone, relative to its segment folder."""
    return f"{mic_folder(mic)}/{ROOM}.pt"


def is_segment_name(name: str) -> bool:
    """True for a name the writer gives (``YYYY-MM-DD_HH-MM-SS`` or with ``_<k>``)."""
    return _SEGMENT_NAME.match(name) is not None


def candidate_names(output_dir: Path) -> list[str]:
    """Names of the folders under ``output_dir`` that may be segments: named as the
    writer names them, real folders (not links). Anything else in the output folder
    (``report/``, a backup, staging) is never taken for a segment. Whether each is
    complete is known only from its manifest."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [p.name for p in output_dir.iterdir()
            if is_segment_name(p.name) and p.is_dir() and not p.is_symlink()]
