"""Room masking: the cells of a segment where the room, not a machine, was loud are
left out of every machine's tensor at that microphone before it is scored.

A forklift, a door or a beep is no machine, and the separator gives most of it to no
machine: it stays in the room tensor (``mic_<N>/_room.pt``: the cleaned audio less the
separated sources of the machines in the room, as a log-mel tensor). But under a loud
event the separator also loses track of the machines: in bench_attribution's busy
shifts a fan's stream fell 8 dB below its calibration level in the bands and frames of
the events, and a healthy machine went WARNING for it. Where the room tensor is more than ``detect.room_mask_db`` above the
room's typical level in calibration (its band medians' power mean, kept in the state file
with the machines' levels under the name ``_room``), a cell says more about the event
than about the machines: in those cells every stream of the microphone is replaced by its
own median over the band's other frames, as if the event had not happened.

A band in which fewer than ``KEEP`` of the frames are left is not masked at all: an event
that fills most of a segment leaves no normal frames to stand in for it, and a machine's
new continuous sound that the separator gave to the room (a fault's tone it never heard)
stays visible to the scorers. Calibration tensors are masked the same way before the
detector, its levels and attribution's levels are fitted.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..segments.layout import ROOM
from .attribution import Levels, SegmentTensors, levels_of, room_profiles

# A band is masked only where at least this fraction of its frames is left to stand in
# for the masked ones. In replays of bench_attribution's cases (mask at 10 dB) this kept
# every fault case CRITICAL on its machine.
KEEP = 0.3

Rooms = dict[int, torch.Tensor]  # mic -> room tensor, (1, n_mels, n_frames)


def fit_room_levels(rooms: Sequence[Rooms]) -> Levels:
    """The room's typical level per band at each microphone in ``rooms`` (normal
    operation): keyed (mic, ``ROOM``) like the machines' levels (``attribution``)."""
    return levels_of([room_profiles(by_mic) for by_mic in rooms])


def masked(tensors: SegmentTensors, rooms: Rooms, levels: Mapping[tuple[int, str], np.ndarray],
           above_db: Optional[float]) -> SegmentTensors:
    """``tensors`` with the cells where the room is more than ``above_db`` dB over its
    level (``levels[(mic, ROOM)]``) replaced in every stream of that microphone by the
    stream's median over the band's other frames (module docstring). A microphone
    without a room tensor or level, or of another shape, passes unchanged; so does
    everything with ``above_db`` None. Returns a new dict; the tensors it changes are new
    tensors."""
    if above_db is None:
        return dict(tensors)
    out = dict(tensors)
    for mic, room in rooms.items():
        level = levels.get((mic, ROOM))
        if level is None or room.dim() != 3 or level.shape != (room.shape[1],):
            continue
        loud = room[0] > torch.from_numpy(level + above_db).to(room.dtype)[:, None]  # (n_mels, n_frames)
        loud &= (~loud).float().mean(dim=1, keepdim=True) >= KEEP
        if not bool(loud.any()):
            continue
        for key, t in tensors.items():
            if key[0] == mic and key[1] != ROOM and t.shape == room.shape:
                out[key] = _filled(t, loud)
    return out


def _filled(tensor: torch.Tensor, loud: torch.Tensor) -> torch.Tensor:
    """``tensor`` (1, n_mels, n_frames) with the ``loud`` cells (n_mels, n_frames) set to
    the median of the band's other cells."""
    rest = tensor[0].masked_fill(loud, float("nan"))
    median = rest.nanmedian(dim=1, keepdim=True).values.nan_to_num(0.0)  # a band all loud is not masked
    return torch.where(loud, median, tensor[0])[None]
