"""Publishing to a real Mosquitto broker through the outbox: a CRITICAL reaching a
subscriber, a broker that is down (detect unaffected, delivery later, in order), a
SIGKILL between sending and marking, a wrong password, TLS with a certificate made
here, and the outbox's bound."""

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid

import pytest
import yaml

from signalcraft import clock
from signalcraft.config import config_from_dict, load_config
from signalcraft.detect.run import Row
from signalcraft.detect.store import Store
from signalcraft.errors import ConfigError, ExitCode
from signalcraft.publish.messages import Outbox
from signalcraft.publish.mqtt import PublishError, publish_waiting, read_password

from broker import Broker, Subscriber, make_certificates
from conftest import SCRIPT, SETTINGS, add_recordings, invoke

SITE = "room-1"


def configure(project, broker: Broker, **mqtt) -> object:
    """Point the project's config at ``broker``; returns the loaded config."""
    settings = {**SETTINGS, "publish": {"site": SITE, "mqtt": broker.settings(**mqtt)}}
    (project / "config.yaml").write_text(yaml.safe_dump(settings))
    return config_from_dict(settings, project / "config.yaml")


def cli(project, *args):
    return invoke("--config", str(project / "config.yaml"), *args)


def outbox_rows(project) -> list[tuple[str, str, str | None]]:
    """(message_id, topic, sent_utc) of every message in the outbox, in queue order."""
    with sqlite3.connect(project / "out" / "signalcraft.sqlite") as db:
        return db.execute("SELECT message_id, topic, sent_utc FROM outbox ORDER BY id").fetchall()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def test_a_critical_reaches_a_subscriber_with_the_documented_topic_and_payload(copy, broker):
    project, _ = copy
    config = configure(project, broker)
    subscriber = Subscriber(broker)
    try:
        fault = add_recordings(project, config, range(700, 704), "bearing")
        result = cli(project, "detect", str(project / "out"))
        assert result.returncode == ExitCode.CRITICAL, result.stdout + result.stderr
        queued = outbox_rows(project)
        assert queued and all(sent is not None for *_, sent in queued)  # all acknowledged and marked
        messages = subscriber.wait_for(len(queued))
    finally:
        subscriber.close()
    by_topic: dict[str, list[dict]] = {}
    for topic, payload, _ in messages:
        by_topic.setdefault(topic, []).append(payload)
    states = by_topic[f"signalcraft/{SITE}/mix/state"]
    critical = next(p for p in states if p["state"] == "CRITICAL")
    with Store(project / "out" / "signalcraft.sqlite") as store:
        starts = {s["folder"]: s["start_time_utc"] for s in store.scores(source="mix")}
    assert critical["segment"] in fault and critical["since_utc"] == starts[critical["segment"]]
    assert critical["schema"] == 1 and critical["type"] == "state" and critical["site"] == SITE
    assert critical["asset"] == "mix" and critical["previous"] in ("NORMAL", "WARNING")
    assert uuid.UUID(critical["message_id"]) and dt.datetime.fromisoformat(critical["at_utc"]).tzinfo
    assert {m["mic"] for m in critical["mics"]} == {0, 1} and critical["flagging_mics"]
    assert all(m["critical"] > 0 and m["score"] is not None for m in critical["mics"])
    assert critical["worst_ratio"] == max(m["score"] / m["critical"] for m in critical["mics"])
    assert len(by_topic[f"signalcraft/{SITE}/mix/score"]) == len(fault)  # one per scored segment
    (status,) = by_topic[f"signalcraft/{SITE}/status"]
    assert status["online"] and status["machines"] == {"mix": "CRITICAL"}
    assert status["recorder"]["newest_segment"] == fault[-1]

    late = Subscriber(broker, f"signalcraft/{SITE}/+/state")  # a dashboard that starts now gets the state
    try:
        (retained,) = late.wait_for(1)
    finally:
        late.close()
    assert retained[2] and retained[1]["state"] == "CRITICAL"


def test_with_the_broker_down_detect_is_unaffected_and_publish_delivers_later_in_order(copy, broker):
    project, _ = copy
    config = configure(project, broker)
    broker.stop()
    add_recordings(project, config, range(700, 704), "bearing")
    result = cli(project, "-q", "detect", str(project / "out"))
    assert result.returncode == ExitCode.CRITICAL  # its normal code
    assert "publish" not in result.stderr  # a short outage is no news for cron's mail ...
    log = (project / "logs" / "signalcraft.log").read_text()
    assert f"publish: MQTT broker 127.0.0.1:{broker.port}: cannot connect" in log  # ... but is in the log
    add_recordings(project, config, range(610, 612))
    assert cli(project, "-q", "detect", str(project / "out")).returncode == 0
    waiting = outbox_rows(project)
    assert len(waiting) > 8 and all(sent is None for *_, sent in waiting)
    assert sum(topic.endswith("/status") for _, topic, _ in waiting) == 1  # one heartbeat replaces the last

    listed = cli(project, "publish", "--dry-run")
    assert listed.returncode == 0 and f"{len(waiting)} messages waiting; nothing sent" in listed.stdout
    assert listed.stdout.index("/mix/state (retained)") < listed.stdout.index("/status (retained)")
    down = cli(project, "publish")
    assert down.returncode == ExitCode.FAILURE and "messages waiting in the outbox" in down.stderr

    broker.start()
    subscriber = Subscriber(broker)
    try:
        sent = cli(project, "publish")
        assert sent.returncode == 0, sent.stderr
        expected = [mid for mid, *_ in outbox_rows(project)]  # the heartbeat of this run included
        messages = subscriber.wait_for(len(expected))
    finally:
        subscriber.close()
    assert all(sent is not None for *_, sent in outbox_rows(project))
    received = [payload["message_id"] for _, payload, _ in messages]
    assert received == expected  # each once, oldest first
    states = [p["state"] for t, p, _ in messages if t.endswith("/mix/state")]
    assert states[-1] == "NORMAL" and "CRITICAL" in states


def fill_outbox(project, config, n: int, start: dt.datetime | None = None) -> None:
    """Queue ``n`` score messages through the product's outbox, as detect would, for
    segments every 10 s from ``start`` (default: a day ago)."""
    outbox = Outbox(config)
    start = start or clock.now() - dt.timedelta(days=1)
    with Store(project / "out" / "signalcraft.sqlite") as store, store.transaction():
        for k in range(n):
            at = (start + dt.timedelta(seconds=10 * k)).isoformat()
            rows = [Row(f"seg{k}", at, mic, "mix", 1.0 + k % 7, 5.0, 9.0, "NORMAL") for mic in (0, 1)]
            outbox.scored(store, "mix", f"seg{k}", at, "NORMAL", "NORMAL", rows, acknowledged=False)


def test_a_sigkill_between_sending_and_marking_loses_nothing(copy, broker):
    project, _ = copy
    config = configure(project, broker)
    fill_outbox(project, config, 6000)
    subscriber = Subscriber(broker)
    try:
        deadline = time.monotonic() + 120
        delivered_unmarked: set = set()
        kills = 0
        # Kill the sender while a batch is in flight (the broker has passed on more than is
        # marked sent). The kill can still land just after a batch is marked and before the
        # next leaves; then the sender is started and killed again, further on.
        for target in (1000, 2000, 3000, 4000, 5000):
            publisher = subprocess.Popen([SCRIPT, "--config", str(project / "config.yaml"), "publish"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            while publisher.poll() is None and time.monotonic() < deadline:
                marked = sum(sent is not None for *_, sent in outbox_rows(project))
                if marked >= target and len(subscriber.ids()) >= marked + 50:
                    break
                time.sleep(0.005)
            os.kill(publisher.pid, signal.SIGKILL)
            publisher.wait(10)
            assert publisher.returncode == -signal.SIGKILL, publisher.stderr.read()
            kills += 1
            before = {mid for mid, _, sent in outbox_rows(project) if sent is None}
            settled, count = time.monotonic(), len(subscriber.ids())
            while time.monotonic() - settled < 1.0 and time.monotonic() < deadline:  # what was in flight arrives
                time.sleep(0.05)
                if len(subscriber.ids()) != count:
                    settled, count = time.monotonic(), len(subscriber.ids())
            delivered_unmarked = set(subscriber.ids()) & before
            if delivered_unmarked:
                break
        assert delivered_unmarked, "the kill did not fall between sending and marking"

        again = invoke("--config", str(project / "config.yaml"), "publish")
        assert again.returncode == 0, again.stderr
        everything = [mid for mid, *_ in outbox_rows(project)]
        subscriber.wait_for(len(everything), timeout=60)
        received = [payload["message_id"] for _, payload, _ in subscriber.messages if payload["type"] != "status"
                    or payload["online"]]
        wills = [payload for _, payload, _ in subscriber.messages if payload["type"] == "status"
                 and not payload["online"]]
    finally:
        subscriber.close()
    # The broker marked the site offline (its last will) once for every sender killed.
    assert [w["site"] for w in wills] == [SITE] * kills
    assert set(received) == set(everything)  # nothing lost ...
    assert all(sent is not None for *_, sent in outbox_rows(project))
    repeats = len(received) - len(set(received))
    assert repeats >= len(delivered_unmarked)  # ... and what was sent twice is recognised by its id
    assert list(dict.fromkeys(received)) == everything  # first arrivals in queue order


def test_a_wrong_password_fails_doctor_and_is_a_log_line_not_a_failed_detect(copy, broker, tmp_path):
    project, _ = copy
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not it\n")
    wrong.chmod(0o600)
    config = configure(project, broker, password_file=str(wrong))
    add_recordings(project, config, range(610, 612))
    result = cli(project, "-q", "detect", str(project / "out"))
    assert result.returncode == 0  # detect's own result
    assert f"MQTT broker 127.0.0.1:{broker.port} refused the connection: Not authorized" in result.stderr
    assert str(wrong) in result.stderr  # where to look
    doctor = cli(project, "doctor", "--output", str(project / "out"))
    line = next(line for line in doctor.stdout.splitlines() if line.split()[1:2] == ["publish"])
    assert line.startswith("FAIL") and "Not authorized" in line and "messages waiting in the outbox" in line
    assert doctor.returncode == ExitCode.FAILURE

    configure(project, broker)  # the right password: doctor says so, publish sends
    assert cli(project, "publish").returncode == 0
    doctor = cli(project, "doctor", "--output", str(project / "out"))
    line = next(line for line in doctor.stdout.splitlines() if line.split()[1:2] == ["publish"])
    assert line.startswith("OK") and "accepts this site" in line and "0 messages waiting" in line


def test_tls_with_a_certificate_made_here(copy, tmp_path):
    project, _ = copy
    broker = Broker(tmp_path / "tls-broker", tls=make_certificates(tmp_path / "certs")).start()
    try:
        configure(project, broker)
        subscriber = Subscriber(broker)
        try:
            assert cli(project, "ack", "mix").returncode != 0  # NORMAL: nothing to acknowledge, nothing queued
            note = cli(project, "maintenance", "mix", "-m", "new impeller")
            assert note.returncode == 0, note.stderr
            assert cli(project, "publish").returncode == 0
            (maintenance,) = [p for t, p, _ in subscriber.wait_for(2) if t.endswith("/mix/maintenance")]
        finally:
            subscriber.close()
        assert maintenance["note"] == "new impeller" and maintenance["serviced_utc"]

        other_ca = make_certificates(tmp_path / "other")["ca"]  # a CA that did not sign the broker's certificate
        configure(project, broker, ca_file=str(other_ca))
        doctor = cli(project, "doctor", "--output", str(project / "out"))
        line = next(line for line in doctor.stdout.splitlines() if line.split()[1:2] == ["publish"])
        assert line.startswith("FAIL") and "TLS certificate is not trusted" in line and "ca_file" in line
        plain = configure(project, broker, tls=False, ca_file=None)  # a plain client on a TLS port
        from signalcraft.publish.mqtt import Sender

        with pytest.raises(PublishError, match="no answer to the MQTT handshake .* not a TLS port with "
                                               "publish.mqtt.tls false") as refused:
            Sender(plain).connect()
        assert refused.value.refused  # a configuration to mend, not an outage to wait out
    finally:
        broker.stop()


def test_the_outbox_is_bounded_and_a_repeated_event_is_queued_once(copy, broker):
    project, _ = copy
    config = configure(project, broker)
    broker.stop()
    old = clock.now() - dt.timedelta(days=config.publish.max_outbox_days + 1)
    events = old - dt.timedelta(hours=1)  # the segments' times
    with clock.frozen(old):
        fill_outbox(project, config, 5, events)
    queued = len(outbox_rows(project))  # 5 scores, and the machine's state once
    assert queued == 6
    fill_outbox(project, config, 5, events)  # the same events again: the same message ids
    assert len(outbox_rows(project)) == queued
    with clock.frozen(old):
        fill_outbox(project, config, 8, events)  # 3 more
    result = publish_waiting(config, project / "out", heartbeat=False)
    assert result.dropped == queued + 3 and result.waiting == 0 and result.error is None  # nothing left to send


def test_passwords_never_come_from_config_yaml(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"publish": {"mqtt": {"host": "b", "username": "u", "password": "x"}}}))
    with pytest.raises(ConfigError, match="publish.mqtt.password: a password is never kept in config.yaml"):
        load_config(path)
    path.write_text(yaml.safe_dump({"publish": {"site": "a/b", "mqtt": {"host": "", "password_env": "P"}}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert {line.split(": ")[1] for line in str(e.value).splitlines()} == {
        "publish.site", "publish.mqtt.host", "publish.mqtt.username"}

    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    config = config_from_dict({"publish": {"mqtt": {"host": "b", "username": "u", "password_file": str(secret)}}})
    with pytest.raises(PublishError, match=f"{secret}: the MQTT password file is readable by other users"):
        read_password(config.publish.mqtt)
    secret.chmod(0o600)
    assert read_password(config.publish.mqtt) == "pw"
    config = config_from_dict({"publish": {"mqtt": {"host": "b", "username": "u", "password_env": "SC_PW"}}})
    monkeypatch.delenv("SC_PW", raising=False)
    with pytest.raises(PublishError, match="SC_PW is unset"):
        read_password(config.publish.mqtt)
    monkeypatch.setenv("SC_PW", "from env")
    assert read_password(config.publish.mqtt) == "from env"


def test_publish_says_when_publishing_is_off(copy):
    project, _ = copy
    result = cli(project, "publish")
    assert result.returncode == ExitCode.USAGE and "publish.mqtt is null" in result.stderr
    with Store(project / "out" / "signalcraft.sqlite") as store:
        assert store.outbox_status()["waiting"] == 0  # detect queued nothing while publishing was off


def test_a_machine_is_announced_with_its_state_and_since_when_once_publishing_is_turned_on(tmp_path):
    config = config_from_dict({"publish": {"site": SITE, "mqtt": {"host": "b"}}})
    outbox = Outbox(config)
    start = clock.now() - dt.timedelta(minutes=5)
    with Store(tmp_path / "state.sqlite") as store, store.transaction():
        for k, status in enumerate(["NORMAL", "WARNING", "WARNING", "NORMAL", "NORMAL", "NORMAL"]):
            at = (start + dt.timedelta(seconds=10 * k)).isoformat()
            seg = store.record_segment(f"seg{k}", at, at, 1, 0, phase="scored")
            store.add_score(seg, 0, "pump", 1.0, 2.0, 3.0, status)
        rows = [Row("seg5", at, 0, "pump", 1.0, 2.0, 3.0, "NORMAL")]
        outbox.scored(store, "pump", "seg5", at, "NORMAL", "NORMAL", rows, acknowledged=False)
        outbox.scored(store, "pump", "seg5", at, "NORMAL", "NORMAL", rows, acknowledged=False)  # once is enough
        messages = [json.loads(m["payload"]) for m in store.waiting_messages()]
    assert [m["type"] for m in messages] == ["score", "state"]
    assert messages[1]["since_utc"] == (start + dt.timedelta(seconds=30)).isoformat()  # the NORMAL run from seg3
    assert messages[1]["state"] == messages[1]["previous"] == "NORMAL"


def test_a_message_the_broker_refuses_stays_in_the_outbox(copy, tmp_path):
    project, _ = copy
    # This site's user may publish only under another site's topics.
    broker = Broker(tmp_path / "acl-broker", acl="user pump-room\ntopic readwrite signalcraft/other-room/#").start()
    try:
        config = configure(project, broker)
        fill_outbox(project, config, 3)
        result = cli(project, "publish")
        assert result.returncode == ExitCode.FAILURE
        assert f"refused to take signalcraft/{SITE}/mix/" in result.stderr and "ACL" in result.stderr
        assert all(sent is None for *_, sent in outbox_rows(project))  # nothing marked sent: nothing lost
        with Store(project / "out" / "signalcraft.sqlite") as store:  # next time it is tried alone first
            assert store.get_meta("publish_refused_id") == outbox_rows(project)[0][0]
        again = cli(project, "publish")
        assert again.returncode == ExitCode.FAILURE and "refused to take" in again.stderr
    finally:
        broker.stop()


def test_a_machine_in_recalibration_is_published_as_calibrating_once(copy, broker):
    project, _ = copy
    config = configure(project, broker)
    broker.stop()  # the messages wait: read them from the outbox
    from signalcraft.segments import list_segments

    back = list_segments(project / "out")[-1].start_time + dt.timedelta(seconds=1)  # after the newest segment
    assert cli(project, "maintenance", "mix", "-m", "new bearings", "--at", back.isoformat()).returncode == 0
    for k, seeds in enumerate((range(620, 622), range(622, 624))):  # two runs of detect while it recalibrates
        add_recordings(project, config, seeds, ending=back + dt.timedelta(seconds=20 + 30 * k))
        assert cli(project, "-q", "detect", str(project / "out")).returncode == 0
    with Store(project / "out" / "signalcraft.sqlite") as store:
        payloads = [json.loads(m["payload"]) for m in store.waiting_messages()]
    states = [p for p in payloads if p["type"] == "state"]
    assert [p["state"] for p in states] == ["CALIBRATING"]  # once, though two runs collected segments
    assert [p["type"] for p in payloads].count("maintenance") == 1
