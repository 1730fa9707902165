"""docs/fleet.md and its examples against the product's real messages.

The messages are built by the product's own code (``Outbox`` into a real ``Store``, the
heartbeat, the last will) and read back as the broker would get them. Then:

- every topic is subscribed by one of docs/fleet/telegraf.conf's ``mqtt_consumer``
  inputs (MQTT wildcard rules), and every input receives some of them;
- its ``topic_parsing`` takes site and asset from the right levels;
- every path its ``json_v2`` parsers read exists in the payloads that input receives,
  with the declared type (a small model of json_v2 for the parts the file uses);
- every measurement, field and tag the Grafana dashboard queries is one telegraf.conf
  writes, and its state colours match telegraf.conf's ``state_level`` numbers;
- docs/fleet.md's field tables list exactly the fields of each payload.

No network, no broker: fast enough for every run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from signalcraft import clock
from signalcraft.config import config_from_dict
from signalcraft.detect import thresholds as th
from signalcraft.detect.store import Store
from signalcraft.publish.messages import Outbox, queue_heartbeat, recorder_liveness, status_topic, will_payload
from signalcraft.segments import folder_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser under its earlier name, where installed
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "docs" / "fleet.md"
TELEGRAF = ROOT / "docs" / "fleet" / "telegraf.conf"
DASHBOARD = ROOT / "docs" / "fleet" / "grafana-dashboard.json"
SITE = "room-1"
STATES = {"CALIBRATING", th.NORMAL, th.WARNING, th.CRITICAL}  # CALIBRATING: after maintenance


@dataclasses.dataclass
class Row:
    """One scored tensor, as ``Outbox.scored`` takes it (``ScoredRow``)."""

    mic: int
    score: Optional[float]
    warning: Optional[float]
    critical: Optional[float]
    status: str


@dataclasses.dataclass
class Message:
    topic: str  # the whole topic, prefix included
    payload: dict[str, Any]
    retain: bool


# MQTT topic filters


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7: ``+`` is one whole level, ``#`` (last) the rest, the parent
    level included; wildcards at the start do not match topics beginning with ``$``."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    levels, filters = topic.split("/"), topic_filter.split("/")
    for i, f in enumerate(filters):
        if f == "#":
            assert i == len(filters) - 1, f"{topic_filter}: # must be the last level"
            return True
        if i >= len(levels):
            return False
        if f != "+" and f != levels[i]:
            return False
    return len(levels) == len(filters)


def test_the_topic_matcher_follows_mqtt():
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/x/c")
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c") and topic_matches("#", "a/b")
    assert topic_matches("+/+", "a/") and not topic_matches("+", "a/b")
    assert not topic_matches("#", "$SYS/x") and not topic_matches("a/b", "a/b/c")


# The product's messages


@pytest.fixture(scope="module")
def config():
    return config_from_dict({"publish": {"site": SITE, "mqtt": {"host": "b"}}})


@pytest.fixture(scope="module")
def messages(config, tmp_path_factory) -> list[Message]:
    """One of each kind, built and queued by the product, read back from the outbox."""
    folder = tmp_path_factory.mktemp("fleet")
    out = folder / "out"
    out.mkdir()
    outbox = Outbox(config)
    start = clock.now() - dt.timedelta(hours=1)  # an hour ago: segments already recorded

    def segment(k: int) -> str:  # the folder name of the k-th 10 s segment from start
        return folder_name(start + dt.timedelta(seconds=10 * k))

    queued: dict[str, dict] = {}
    with Store(folder / "signalcraft.sqlite") as store:
        with store.transaction():
            for k, (state, previous) in enumerate([(th.NORMAL, None), (th.NORMAL, th.NORMAL),
                                                   (th.CRITICAL, th.NORMAL)]):
                at = (start + dt.timedelta(seconds=10 * k)).isoformat()
                flagged = th.CRITICAL if state == th.CRITICAL else th.NORMAL
                rows = [Row(0, 9.5, 4.0, 6.0, flagged), Row(1, 1.0, 4.0, 6.0, th.NORMAL),
                        Row(2, float("nan"), None, None, th.NORMAL)]  # a score that is not finite
                outbox.scored(store, "P-101", segment(k), at, state, previous, rows,
                              acknowledged=False)
            outbox.scored(store, "F/201", segment(0), start.isoformat(), th.WARNING, th.NORMAL,
                          [Row(0, None, None, None, th.WARNING)], acknowledged=False)  # no ratio at all
            outbox.acknowledged(store, 1, "P-101", th.CRITICAL, segment(2), "fitter booked")
            outbox.maintenance(store, 1, "P-101", start.isoformat(), "bearing replaced")
        queue_heartbeat(config, out, store)  # the real one: no segments yet, nulls
        for row in store.waiting_messages():
            queued[row["message_id"]] = row
        recorder = recorder_liveness(config, out)
        alive = {**recorder, "newest_segment": segment(2), "started_utc": start.isoformat(),
                 "age_s": 12.5, "alive": True}
        assert set(alive) == set(recorder)
        with store.transaction():  # a heartbeat replaces the waiting one: read it separately
            outbox.heartbeat(store, alive, {"P-101": th.CRITICAL, "F/201": None})
        for row in store.waiting_messages():
            queued[row["message_id"]] = row
    prefix = config.publish.mqtt.topic_prefix
    result = [Message(f"{prefix}/{row['topic']}", json.loads(row["payload"]), bool(row["retain"]))
              for row in queued.values()]
    result.append(Message(f"{prefix}/{status_topic(config)}", json.loads(will_payload(config, clock.now_iso())),
                          True))
    kinds = {m.payload["type"] for m in result}
    assert kinds == {"score", "state", "ack", "maintenance", "status"}
    assert any(m.payload["type"] == "status" and not m.payload["online"] for m in result)  # the will
    return result


def kind(message: Message) -> str:
    """The message's type, ``will`` for the last will."""
    p = message.payload
    return "will" if p["type"] == "status" and not p["online"] else p["type"]


# telegraf.conf


@pytest.fixture(scope="module")
def telegraf() -> dict:
    with TELEGRAF.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def consumers(telegraf) -> list[dict]:
    found = telegraf["inputs"]["mqtt_consumer"]
    assert isinstance(found, list) and found
    return found


def received(consumer: dict, messages: list[Message]) -> list[Message]:
    return [m for m in messages if any(topic_matches(f, m.topic) for f in consumer["topics"])]


def test_every_topic_is_subscribed_once_with_qos_1_and_a_persistent_session(consumers, messages):
    for m in messages:
        subscribers = [c for c in consumers if received(c, [m])]
        assert len(subscribers) == 1, f"{m.topic}: subscribed by {len(subscribers)} mqtt_consumer inputs"
    client_ids = [c["client_id"] for c in consumers]
    assert all(client_ids) and len(set(client_ids)) == len(client_ids)  # a persistent session needs its own
    for c in consumers:
        assert c["qos"] == 1 and c["persistent_session"] is True and c["data_format"] == "json_v2"
        assert received(c, messages), f"{c['topics']}: receives none of the product's messages"
        assert c.get("topic_tag") == ""  # site and asset come from topic_parsing instead


def test_topic_parsing_takes_site_and_asset_from_the_right_levels(consumers, messages):
    for c in consumers:
        for m in received(c, messages):
            parsers = [p for p in c["topic_parsing"] if topic_matches(p["topic"], m.topic)]
            assert len(parsers) == 1, f"{m.topic}: {len(parsers)} topic_parsing sections match"
            (p,) = parsers
            assert set(p) <= {"topic", "tags"}, "this test models topic_parsing's tags only"
            levels, names = m.topic.split("/"), p["tags"].split("/")
            assert len(names) == len(levels) == len(p["topic"].split("/"))
            tags = {name: level for name, level in zip(names, levels) if name != "_"}
            assert tags["site"] == m.payload["site"]
            if m.payload["asset"] is not None:  # the asset's level has / replaced: compare the rest
                assert tags["asset"] == m.payload["asset"].replace("/", "_")
            else:
                assert "asset" not in tags
            if "event" in tags:
                assert tags["event"] == m.payload["type"]


# A model of json_v2 for the parts telegraf.conf uses

JSON_V2_KEYS = {"measurement_name", "timestamp_path", "timestamp_format", "timestamp_timezone", "field", "tag",
                "object"}
DATASET_KEYS = {"path", "rename", "type", "optional"}
OBJECT_KEYS = {"path", "tags", "fields", "disable_prepend_keys", "optional"}
GO_RFC3339 = "2006-01-02T15:04:05.999999999Z07:00"  # Go's layout: the fraction optional, Z or an offset
GO_RFC3339_TEXT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")
_MISSING = object()


def gjson(payload: Any, path: str) -> Any:
    """A GJSON path of plain keys, ``.``-separated, optionally ending in ``#`` (an array's
    length); ``_MISSING`` where the path does not exist."""
    assert re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\.#)?", path), f"{path}: not modelled here"
    value = payload
    for key in path.split("."):
        if key == "#":
            return len(value) if isinstance(value, list) else _MISSING
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def check_type(value: Any, kind: Optional[str], where: str) -> None:
    """``value`` converts to json_v2's ``kind`` (None: JSON's own type); null is skipped."""
    if value is None:
        return
    assert not isinstance(value, (dict, list)), f"{where}: an object or array, not a value"
    if kind == "float":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} not a number"
    elif kind == "int":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} not an integer"
    elif kind == "bool":
        assert isinstance(value, bool), f"{where}: {value!r} not a boolean"
    elif kind == "string":
        assert isinstance(value, str), f"{where}: {value!r} not a string"
    else:
        assert kind is None, f"{where}: type {kind!r}"


@dataclasses.dataclass
class Written:
    """What telegraf.conf writes of one measurement."""

    tags: set[str] = dataclasses.field(default_factory=set)
    fields: set[str] = dataclasses.field(default_factory=set)


def parse(consumer: dict, config: dict, message: Message, written: dict[str, Written]) -> list[str]:
    """Apply one json_v2 section to one message as Telegraf would; record what it writes;
    return the optional paths that matched."""
    assert set(config) <= JSON_V2_KEYS, f"json_v2 keys not modelled: {set(config) - JSON_V2_KEYS}"
    where = f"{config['measurement_name']} from {message.topic}"
    out = written.setdefault(config["measurement_name"], Written())
    out.tags |= {n for p in consumer["topic_parsing"] for n in p["tags"].split("/") if n != "_"}
    stamp = gjson(message.payload, config["timestamp_path"])
    assert isinstance(stamp, str), f"{where}: timestamp_path {config['timestamp_path']} is {stamp!r}"
    assert config["timestamp_format"] == GO_RFC3339 and config["timestamp_timezone"] == "UTC"
    assert GO_RFC3339_TEXT.fullmatch(stamp) and dt.datetime.fromisoformat(stamp).utcoffset() == dt.timedelta(0)
    matched, values = [], []
    for kind_, sets in (("tag", out.tags), ("field", out.fields)):
        for d in config.get(kind_, []):
            assert set(d) <= DATASET_KEYS
            value = gjson(message.payload, d["path"])
            if value is _MISSING:
                assert d.get("optional", False), f"{where}: {d['path']} is not in the payload"
                continue
            if d.get("optional", False):
                matched.append(d["path"])
            check_type(value, "string" if kind_ == "tag" else d.get("type"), f"{where}: {d['path']}")
            name = d.get("rename") or d["path"].split(".")[-1]
            assert name != "#", f"{where}: {d['path']} needs a rename"
            sets.add(name)
            if kind_ == "field" and value is not None:
                values.append(value)
    for o in config.get("object", []):
        assert set(o) <= OBJECT_KEYS and o.get("disable_prepend_keys") is True
        elements = gjson(message.payload, o["path"])
        assert isinstance(elements, list) and elements, f"{where}: {o['path']} is not a non-empty array"
        for element in elements:
            assert isinstance(element, dict)
            reads = set(o["tags"]) | set(o["fields"])
            assert reads == set(element), f"{where}: {o['path']}[] has {sorted(element)}, reads {sorted(reads)}"
            for key, kind_ in o["fields"].items():
                check_type(element[key], kind_, f"{where}: {o['path']}[].{key}")
            values += [element[key] for key in o["fields"] if element[key] is not None]
        out.tags |= set(o["tags"])
        out.fields |= set(o["fields"])
    assert values, f"{where}: no field with a value (Telegraf drops such a point)"
    return matched


@pytest.fixture(scope="module")
def written(telegraf, consumers, messages) -> dict[str, Written]:
    """Each measurement telegraf.conf writes from the product's messages, with its tags
    and fields; the enum processor's fields included."""
    result: dict[str, Written] = {}
    for c in consumers:
        for config in c["json_v2"]:
            matched = set()
            inbox = received(c, messages)
            for m in inbox:
                matched |= set(parse(c, config, m, result))
            optional = {d["path"] for k in ("field", "tag") for d in config.get(k, []) if d.get("optional")}
            assert optional <= matched, f"{config['measurement_name']}: {optional - matched} never in a payload"
    for enum in telegraf["processors"]["enum"]:
        for name in enum["namepass"]:
            assert name in result, f"processors.enum: {name} is not written"
            for mapping in enum["mapping"]:
                assert set(mapping["fields"]) <= result[name].fields
                result[name].fields.add(mapping["dest"])
    return result


def test_telegraf_reads_only_what_the_payloads_have(written):
    assert set(written) == {"signalcraft_score", "signalcraft_mic", "signalcraft_state", "signalcraft_status",
                            "signalcraft_event"}
    assert {"state", "worst_ratio"} <= written["signalcraft_score"].fields
    assert {"score", "critical"} <= written["signalcraft_mic"].fields and "mic" in written["signalcraft_mic"].tags
    assert {"site", "asset"} <= written["signalcraft_state"].tags


def test_state_levels_cover_every_state(telegraf, messages):
    (enum,) = telegraf["processors"]["enum"]
    (mapping,) = enum["mapping"]
    assert mapping["fields"] == ["state"] and set(mapping["value_mappings"]) == STATES
    assert sorted(mapping["value_mappings"], key=mapping["value_mappings"].get) == ["CALIBRATING", th.NORMAL,
                                                                                   th.WARNING, th.CRITICAL]
    seen = {m.payload["state"] for m in messages if m.payload["type"] in ("score", "state")}
    assert seen <= STATES


def test_the_outputs_write_to_influxdb_2(telegraf):
    (out,) = telegraf["outputs"]["influxdb_v2"]
    assert out["urls"] and out["bucket"] and out["organization"] and out["token"].startswith("${")
    for c in telegraf["inputs"]["mqtt_consumer"]:
        assert c["password"].startswith("${")  # never the password itself in the file


# The dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def queries(dashboard: dict) -> list[str]:
    found = [t["query"] for p in dashboard["panels"] for t in p.get("targets", [])]
    found += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return found


def test_the_dashboard_queries_what_telegraf_writes(dashboard, written):
    assert 36 <= dashboard["schemaVersion"] <= 41
    found = queries(dashboard)
    assert len(found) >= 5
    for q in found:
        measurements = set(re.findall(r'r\._measurement\s*==\s*"([^"]+)"', q))
        assert measurements, f"a query names no measurement: {q}"
        assert measurements <= set(written), f"not written by telegraf.conf: {measurements - set(written)}"
        fields = set(re.findall(r'r\._field\s*==\s*"([^"]+)"', q))
        tags = set(re.findall(r"r\.([a-z]\w*)\s*==", q)) | set(re.findall(r'tag:\s*"([^"]+)"', q))
        assert fields <= set().union(*(written[m].fields for m in measurements)), q
        assert tags <= set().union(*(written[m].tags for m in measurements)), q


def test_the_dashboard_has_a_row_per_site_and_colours_the_states(dashboard, telegraf):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["site"]["type"] == "query" and variables["site"]["includeAll"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r.get("repeat") for r in rows] == ["site"]
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["type"] == "influxdb" and all('"${site}"' in t["query"] for t in p["targets"])
    levels = telegraf["processors"]["enum"][0]["mapping"][0]["value_mappings"]
    colours = {"CALIBRATING": "blue", th.NORMAL: "green", th.WARNING: "orange", th.CRITICAL: "red"}
    coloured = [p for p in dashboard["panels"] if p.get("fieldConfig", {}).get("defaults", {}).get("mappings")]
    assert {p["type"] for p in coloured} == {"stat", "state-timeline"}
    for p in coloured:
        (mapping,) = p["fieldConfig"]["defaults"]["mappings"]
        assert mapping["type"] == "value"
        assert {o["text"]: (int(v), o["color"]) for v, o in mapping["options"].items()} == {
            s: (levels[s], colours[s]) for s in STATES}


# docs/fleet.md


def documented_fields() -> dict[str, set[str]]:
    """The fields of docs/fleet.md's tables, by section: ``common`` (every message), a
    type, or ``will``."""
    sections: dict[str, set[str]] = {}
    current = None
    text = FLEET.read_text(encoding="utf-8")
    messages = text.split("\n## Messages\n", 1)[1].split("\n## ", 1)[0]
    for line in messages.splitlines():
        if line.startswith("### "):
            title = line[4:]
            named = re.search(r"`(\w+)`", title)
            current = ("common" if title == "Every message" else "will" if "last will" in title
                       else named.group(1) if named else None)
            assert current is not None, f"docs/fleet.md: a section {title!r} of no message type"
            sections[current] = set()
        elif current is not None and (cell := re.match(r"\| `([^`]+)` \|", line)):
            sections[current].add(cell.group(1))
    return sections


def flatten(payload: dict, prefix: str = "") -> set[str]:
    """``a``, ``a.b`` for an object's keys, ``a[].b`` for an array of objects' keys;
    ``machines`` (keyed by machine name) is one field."""
    keys = set()
    for key, value in payload.items():
        name = prefix + key
        keys.add(name)
        if isinstance(value, dict) and key != "machines":
            keys |= flatten(value, name + ".")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for v in value:
                keys |= flatten(v, name + "[].")
    return keys


def test_fleet_md_lists_every_field_of_every_message(messages):
    documented = documented_fields()
    assert set(documented) == {"common", "score", "state", "ack", "maintenance", "status", "will"}
    for m in messages:
        actual = flatten(m.payload)
        assert documented["common"] <= actual, f"{m.topic}: documented for every message, missing here"
        assert documented[kind(m)] | documented["common"] == actual, (
            f"{kind(m)}: fleet.md lists {sorted(documented[kind(m)] - actual)} not in the payload; the payload "
            f"has {sorted(actual - documented[kind(m)] - documented['common'])} not in fleet.md")
