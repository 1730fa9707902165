"""What operators tell `detect`: ``ack``, ``label`` and ``maintenance``.

Each is stored in the detection state (``store.Store``) and takes effect at the next
`detect` run:

- ``acknowledge``: the machine's current alarm is seen. Its alerts so far, and those it
  raises while it stays in the same state, are covered: they no longer count for
  `detect`'s exit code, and retention may delete their segments. A change of state
  (worse, better or back to NORMAL) ends the acknowledgement.
- ``label``: a segment is ``normal`` (a false alarm: `train-detector` may train on it)
  or ``anomaly`` (a confirmed fault: never trained on). A labelled segment's alerts are
  answered, so retention may delete it.
- ``maintenance``: the machine was serviced at a time. From then on its tensors are
  collected as CALIBRATING until ``detect.calibration_segments`` of them are there, and
  the machine is refitted on them alone (``run._recalibrate_when_ready``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Optional

from .. import clock
from ..config import Config
from ..errors import SignalcraftError
from ..publish.messages import Outbox
from ..segments.layout import is_segment_name
from .run import state_path
from .store import LABELS, Store


class OperatorError(SignalcraftError):
    """An acknowledgement, label or maintenance record that cannot be taken."""


def _known_machine(store: Store, asset: str) -> None:
    known = store.sources()
    if asset not in known:
        raise OperatorError(f"{store.path}: no machine {asset!r} has been scored here. Known machines: "
                            f"{', '.join(known) or 'none yet'} (the names in separation.assets, or the model's "
                            "sources).")


def acknowledge(config: Config, output: Path, asset: str, note: str = "") -> str:
    """Acknowledge ``asset``'s current WARNING or CRITICAL; returns what was done."""
    with Store(state_path(config, output), create=False) as store:
        _known_machine(store, asset)
        newest = store.newest_scored(asset)
        status = newest["status"] if newest is not None else None
        if status is None or status == "NORMAL":
            raise OperatorError(f"{asset} is {status or 'not scored yet'}: there is no alarm to acknowledge.")
        with store.transaction():
            ack_id = store.add_ack(asset, status, newest["folder"], newest["start_time_utc"], clock.now_iso(), note)
            if (outbox := Outbox.of(config)) is not None:
                outbox.acknowledged(store, ack_id, asset, status, newest["folder"], note)
    return (f"{asset} {status} acknowledged (newest segment {newest['folder']}): silent until its state "
            "changes")


def label(config: Config, output: Path, segment: str, value: str, note: str = "") -> str:
    """Label a segment (its folder name, or a path to it) ``normal`` or ``anomaly``."""
    if value not in LABELS:
        raise OperatorError(f"label {value!r}: use one of {', '.join(LABELS)}.")
    folder = Path(segment).name
    if not is_segment_name(folder):
        raise OperatorError(f"{segment!r}: not a segment folder's name (like 2026-12-01_08-11-28, as under the "
                            "output folder and in the rows of `signalcraft -v detect`).")
    with Store(state_path(config, output), create=False) as store:
        store.set_label(folder, value, clock.now_iso(), note)
    meaning = ("a false alarm: `train-detector` may train on it" if value == "normal"
               else "a confirmed fault: never trained on")
    return f"{folder} labelled {value} ({meaning})"


def maintenance(config: Config, output: Path, asset: str, note: str, at: Optional[dt.datetime] = None) -> str:
    """Record maintenance of ``asset`` at ``at`` (default now)."""
    at_utc = (at or clock.now()).isoformat()
    with Store(state_path(config, output), create=False) as store:
        _known_machine(store, asset)
        with store.transaction():
            maintenance_id = store.add_maintenance(asset, at_utc, note)
            if (outbox := Outbox.of(config)) is not None:
                outbox.maintenance(store, maintenance_id, asset, at_utc, note)
    return (f"maintenance of {asset} recorded at {at_utc[:19]} UTC: its next {config.detect.calibration_segments} "
            "segments recalibrate it")
