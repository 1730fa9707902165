"""The messages signalcraft publishes, and their queueing in the outbox.

Topics, under ``publish.mqtt.topic_prefix`` (default ``signalcraft``):

- ``<prefix>/<site>/<asset>/state`` (retained): the machine's state when it changes
  (and the first time one is queued for it): NORMAL, WARNING or CRITICAL, since when, the score
  against the levels per microphone.
- ``<prefix>/<site>/<asset>/score``: every scored segment of the machine.
- ``<prefix>/<site>/<asset>/ack`` and ``.../maintenance``: an operator acknowledged the
  machine's alarm, or recorded its maintenance.
- ``<prefix>/<site>/status`` (retained): a heartbeat after every `detect` and `publish`
  run, with the recorder's liveness and every machine's state; the broker replaces it by
  the last will (``online: false``) when the site's connection is lost.

Every payload is a JSON object with ``schema`` (``SCHEMA``), ``type`` (the topic's last
level), ``message_id``, ``site``, ``asset`` (null on ``status``) and ``at_utc`` (ISO 8601
UTC), then the fields of its type (docs/fleet.md). ``message_id`` is a UUID derived from
the site, the asset, the type and the event (the segment's start time in UTC, which
unlike its folder name never repeats; an acknowledgement's or maintenance's number and
time), fixed when the message is queued: however often it is sent, a subscriber drops
the repeats by it.

The ``Outbox`` methods only write rows into the store; call them inside the
transaction that records the result, so that the result and its message are committed
together or not at all.
"""

from __future__ import annotations

import json
import math
import socket
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol

from .. import clock
from ..config import Config

SCHEMA = 1
# Message ids are uuid5(NAMESPACE, "<site>/<asset>/<type>/<event>").
NAMESPACE = uuid.UUID("6f0b7a52-3c1e-5b8e-9a53-2d6c1f0e8a41")
ANNOUNCED_KEY = "publish_announced"  # meta key: the machines whose state has been queued once
_LEVEL_FORBIDDEN = str.maketrans({"+": "_", "#": "_", "/": "_", "\0": "_"})


class ScoredRow(Protocol):
    """What a message needs of one scored tensor (``detect.run.Row``)."""

    mic: int
    score: Optional[float]
    warning: Optional[float]
    critical: Optional[float]
    status: str


def site_name(config: Config) -> str:
    """``publish.site``, else this computer's host name (made safe as a topic level)."""
    return config.publish.site or topic_level(socket.gethostname().split(".")[0] or "site")


def topic_level(name: str) -> str:
    """``name`` as one MQTT topic level: the wildcards and the separator become ``_``
    (the payload keeps the real name)."""
    return name.translate(_LEVEL_FORBIDDEN) or "_"


def message_id(site: str, asset: Optional[str], kind: str, event: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{site}/{asset or ''}/{kind}/{event}"))


def status_topic(config: Config) -> str:
    """The site's status topic, after the prefix."""
    return f"{topic_level(site_name(config))}/status"


def will_payload(config: Config, at_utc: str) -> str:
    """What the broker publishes on the status topic when the site's connection is lost."""
    site = site_name(config)
    return _dump({"schema": SCHEMA, "type": "status", "message_id": message_id(site, None, "will", at_utc),
                  "site": site, "asset": None, "at_utc": at_utc, "online": False})


class Outbox:
    """Queues the messages of one site into a ``detect.store.Store``; None of
    ``Outbox.of(config)`` when publishing is off."""

    def __init__(self, config: Config):
        self.site = site_name(config)
        self._announced: Optional[set[str]] = None  # machines whose state was queued once (ANNOUNCED_KEY)

    @classmethod
    def of(cls, config: Config) -> Optional["Outbox"]:
        return cls(config) if config.publish.mqtt is not None else None

    def _queue(self, store, kind: str, asset: Optional[str], event: str, body: dict[str, Any],
               retain: bool = False, supersede: bool = False) -> None:
        at = clock.now_iso()
        mid = message_id(self.site, asset, kind, event)
        payload = {"schema": SCHEMA, "type": kind, "message_id": mid, "site": self.site, "asset": asset,
                   "at_utc": at, **body}
        level = topic_level(self.site)
        topic = f"{level}/{topic_level(asset)}/{kind}" if asset is not None else f"{level}/{kind}"
        store.queue_message(mid, topic, _dump(payload), retain, at, supersede=supersede)

    def scored(self, store, asset: str, segment: str, start_utc: str, state: str, previous: Optional[str],
               rows: Iterable[ScoredRow], acknowledged: bool) -> None:
        """One machine's scores in one segment (already recorded in ``store``); a
        ``state`` message too when its state differs from ``previous`` (its state in its
        previous scored segment), or when none was ever queued for it (publishing was
        turned on later: ``since_utc`` is then when its present state began)."""
        mics = [{"mic": r.mic, "score": _finite(r.score), "warning": _finite(r.warning),
                 "critical": _finite(r.critical), "status": r.status} for r in rows]
        ratios = [m["score"] / m["critical"] for m in mics if m["score"] is not None and m["critical"]]
        body = {"segment": segment, "start_utc": start_utc, "state": state,
                "worst_ratio": max(ratios) if ratios else None, "mics": mics}
        self._queue(store, "score", asset, start_utc, body)
        if self._announced is None:  # read once per Outbox (one detect run), not per segment
            self._announced = set(json.loads(store.get_meta(ANNOUNCED_KEY) or "[]"))
        if state != previous or asset not in self._announced:
            since = start_utc if state != previous else store.state_since(asset) or start_utc
            self._queue(store, "state", asset, f"{start_utc}/{state}", {
                **body, "previous": previous, "since_utc": since, "acknowledged": acknowledged,
                "flagging_mics": [m["mic"] for m in mics if m["status"] != "NORMAL"]}, retain=True)
            if asset not in self._announced:
                self._announced.add(asset)
                store.set_meta(ANNOUNCED_KEY, json.dumps(sorted(self._announced)))

    def acknowledged(self, store, ack_id: int, asset: str, status: str, segment: str, note: str) -> None:
        self._queue(store, "ack", asset, f"{ack_id}/{clock.now_iso()}",
                    {"state": status, "segment": segment, "note": note})

    def maintenance(self, store, maintenance_id: int, asset: str, serviced_utc: str, note: str) -> None:
        self._queue(store, "maintenance", asset, f"{maintenance_id}/{clock.now_iso()}",
                    {"serviced_utc": serviced_utc, "note": note})

    def heartbeat(self, store, recorder: dict[str, Any], machines: dict[str, Optional[str]]) -> None:
        """The site's status: ``recorder`` (newest_segment, started_utc, age_s, alive) and
        each machine's state. Replaces a heartbeat still waiting."""
        at = clock.now_iso()
        self._queue(store, "status", None, at, {"online": True, "recorder": recorder, "machines": machines},
                    retain=True, supersede=True)


def recorder_liveness(config: Config, output_dir: Path) -> dict[str, Any]:
    """The recorder's liveness as the heartbeat reports it (the rule of `doctor`)."""
    from ..doctor import recorder_stale_after_s
    from ..segments import newest_segment

    newest = newest_segment(output_dir) if Path(output_dir).is_dir() else None
    if newest is None:
        return {"newest_segment": None, "started_utc": None, "age_s": None, "alive": False}
    age = (clock.now() - newest.start_time).total_seconds()
    return {"newest_segment": newest.name, "started_utc": newest.start_time.isoformat(), "age_s": round(age, 1),
            "alive": age <= recorder_stale_after_s(config)}


def queue_heartbeat(config: Config, output_dir: Path, store) -> None:
    """Queue the site's heartbeat (in its own transaction) when publishing is on."""
    outbox = Outbox.of(config)
    if outbox is None:
        return
    recorder = recorder_liveness(config, output_dir)
    machines = {source: store.machine_state(source) for source in store.sources()}
    with store.transaction():
        outbox.heartbeat(store, recorder, machines)


def _finite(x: Optional[float]) -> Optional[float]:
    """JSON has no NaN or infinity: those are null."""
    return float(x) if x is not None and math.isfinite(x) else None


def _dump(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False, sort_keys=False)
