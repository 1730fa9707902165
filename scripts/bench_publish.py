"""Publishing machine states to a real MQTT broker through the outbox, for a fleet of
simulated sites, through a broker outage: what arrives, how late, how large the outbox
grows and how fast it drains; against bare paho-mqtt clients without an outbox.

One local Mosquitto (its own config in a temp folder, a password file, no persistence)
on a free loopback port. Each simulated site has its own state file
(`detect.store.Store`), its own config (`config_from_dict`, the password in a chmod 600
file), its own `publish.messages.Outbox` and one persistent `publish.mqtt.Sender`, and
runs in a thread of its own (SQLite connections stay in the thread that opened them).
Every `period` seconds, site k at offset k * period / sites: in one `store.transaction()`
`Outbox.scored(...)` for each asset (4 microphones, a state that differs from the
previous one, so a score and a state message each), then `sender.send(store)`; a
PublishError (broker down) is counted and the site carries on.

One subscriber (paho-mqtt, QoS 1, `signalcraft/#`, resubscribing in on_connect, in a
process of its own) records each message's receive time; latency = receive time - the
payload's `at_utc` (its queue time). After the restart the sites hold their sends until
it has resubscribed (the broker keeps no sessions). CPU is counted per process, and the
machine's (/proc/stat), so that other load on the machine shows.

Phases: the reference (bare paho clients, one per site, publishing payloads of the same
sizes at QoS 1 with no outbox, on the same schedule), then signalcraft for `--minutes`
with the broker stopped at `--outage-start` for `--outage-minutes` and restarted on the
same port, then the outboxes drained.

    python scripts/bench_publish.py [--quick] [--sites 100] [--minutes 5] [--outage-minutes 2] [--no-write]

About 6.5 minutes with the defaults (1 min reference, 5 min publishing, the drain); `--quick`
(10 sites, 1 minute, a 20 s outage) about 1.5 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt

from benchlib import ROOT, write_section
from signalcraft import clock
from signalcraft.config import config_from_dict
from signalcraft.detect.run import Row
from signalcraft.detect.store import Store
from signalcraft.publish.messages import Outbox
from signalcraft.publish.mqtt import PublishError, Sender

USER, PASSWORD = "fleet-bench", "bench pass 1"
MICS = 4
PREFIX = "signalcraft"
TIMEOUT_S = 5.0  # publish.mqtt.timeout_s of every site
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ms(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x * 1000:.0f} ms" if x >= 0.1 else f"{x * 1000:.1f} ms"


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a running process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS_PER_S
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy() -> float:
    """CPU seconds this machine has been busy (all cores, all processes), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_S


class Broker:
    """One Mosquitto of its own; ``start()``, ``stop()`` and ``start()`` again on the same
    port; ``cpu_s`` adds up the CPU time of every run of it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.process: Optional[subprocess.Popen] = None
        self.cpu_s = 0.0
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        passwords = folder / "passwords"
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), USER, PASSWORD], check=True,
                       capture_output=True)
        passwords.chmod(0o600)
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous false", f"password_file {passwords}",
                 "persistence false", "log_dest stderr", "log_type error", "log_type warning",
                 "connection_messages false", "max_queued_messages 1000000", "max_inflight_messages 1000",
                 "max_connections -1"]
        if os.geteuid() == 0:  # as root mosquitto would switch to its own user, who cannot read these files
            lines.insert(0, f"user {getpass.getuser()}")
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = folder / "broker.log"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
                time.sleep(0.01)
        raise RuntimeError("mosquitto did not open its port within 10 s")

    def cpu_now(self) -> float:
        """CPU seconds of every run so far, the current one included."""
        return self.cpu_s + self._running_cpu()

    def _running_cpu(self) -> float:
        if self.process is None or self.process.poll() is not None:
            return 0.0
        return proc_cpu(self.process.pid)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.cpu_s += self._running_cpu()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def mqtt_settings(self, password_file: Path) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "username": USER, "password_file": str(password_file),
                "timeout_s": TIMEOUT_S}


class Subscriber:
    """paho, QoS 1, ``signalcraft/#``, in a process of its own (so that the sites' threads
    do not delay it); keeps (receive time, topic, payload, retain) of each message.
    ``ready`` (an Event shared with the sites) is set while it is subscribed."""

    def __init__(self, broker: Broker, root: Path):
        ctx = multiprocessing.get_context("spawn")
        self.ready = ctx.Event()
        self.stop = ctx.Event()
        self.out = root / "subscriber.pickle"
        self.process = ctx.Process(target=subscriber_main, args=(broker.port, self.ready, self.stop, str(self.out)),
                                   name="bench-subscriber", daemon=True)
        self.process.start()
        if not self.ready.wait(30):
            self.close()
            raise RuntimeError("the subscriber did not subscribe within 30 s")

    def collect(self) -> dict:
        """Stop it; what it received, its connects and its CPU seconds."""
        self.close()
        with open(self.out, "rb") as f:
            return pickle.load(f)

    def close(self) -> None:
        self.stop.set()
        self.process.join(60)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


def subscriber_main(port: int, ready, stop, out: str) -> None:
    got: list[tuple[float, str, bytes, bool]] = []
    connects = [0]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-subscriber-{port}", clean_session=True,
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(USER, PASSWORD)
    client.reconnect_delay_set(min_delay=0.05, max_delay=0.2)

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        connects[0] += 1
        if not reason_code.is_failure:
            client.subscribe(f"{PREFIX}/#", qos=1)  # again after each reconnect: the broker keeps no sessions

    def on_message(client, userdata, message) -> None:
        got.append((time.time(), message.topic, message.payload, bool(message.retain)))

    client.on_connect, client.on_message = on_connect, on_message
    client.on_subscribe = lambda *a: ready.set()
    client.on_disconnect = lambda *a: ready.clear()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    with open(out, "wb") as f:
        pickle.dump({"got": got, "connects": connects[0], "cpu_s": time.process_time()}, f)


class Control:
    """What the site threads share with the main thread."""

    def __init__(self, subscriber_ready):
        self.stop = threading.Event()
        self.hold_sends = threading.Event()  # set from just before the restart until the subscriber is back
        self.subscriber_ready = subscriber_ready
        self.restarted_at: Optional[float] = None
        self.publish_end = float("inf")  # no ticks are due from then on
        self.drain_deadline = float("inf")


class Site:
    """One simulated site: its folder, config, state file, outbox and sender."""

    def __init__(self, k: int, root: Path, broker: Broker, assets: list[str]):
        self.k = k
        self.name = f"site-{k:03d}"
        self.folder = root / self.name
        self.folder.mkdir(parents=True)  # (root / "templates" for the reference's payloads)
        password_file = self.folder / "mqtt-password"
        password_file.write_text(PASSWORD + "\n")
        password_file.chmod(0o600)
        self.config = config_from_dict({"publish": {"site": self.name,
                                                    "mqtt": broker.mqtt_settings(password_file)}})
        self.state = self.folder / "signalcraft.sqlite"
        self.assets = assets
        self.ready = threading.Event()
        self.lags: list[tuple[float, float]] = []  # (due time, tick start - due time), s
        self.queue_s: list[float] = []  # the queueing transaction, s
        self.sends: list[tuple[str, float]] = []  # (steady, backlog or failed, seconds) of each sender.send
        self.queued = 0
        self.sent = 0
        self.failures = 0
        self.errors: dict[str, int] = {}
        self.drained_at: Optional[float] = None  # first empty outbox after the restart
        self.waiting = 0
        self.thread: Optional[threading.Thread] = None

    def run(self, dues: list[float], control: Control) -> None:
        store = Store(self.state)
        outbox = Outbox(self.config)
        sender = Sender(self.config)
        self.ready.set()
        base = dt.datetime(2027, 1, 4, 6, 0, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=0.1 * self.k)
        try:
            for i, due in enumerate(dues):
                if control.stop.wait(max(0.0, due - time.time())):
                    return
                began = time.time()
                self.lags.append((due, began - due))
                start = base + dt.timedelta(seconds=10 * i)
                start_utc, segment = start.isoformat(), start.strftime(clock.FOLDER_TIME)
                state, previous = ("WARNING", "NORMAL") if i % 2 else ("NORMAL", "WARNING")
                with store.transaction():
                    for a, asset in enumerate(self.assets):
                        rows = [Row(folder=segment, start_time=start_utc, mic=m, source=asset,
                                    score=0.8 + 0.01 * ((i * 7 + a * 3 + m) % 50), warning=1.0, critical=1.5,
                                    status=state if m == 0 else "NORMAL") for m in range(MICS)]
                        outbox.scored(store, asset, segment, start_utc, state, previous, rows, acknowledged=False)
                self.queued += 2 * len(self.assets)
                self.queue_s.append(time.time() - began)
                self._send(store, sender, control)
            # Publishing over: send until the outbox is empty (or the deadline).
            while self.waiting and time.time() < control.drain_deadline and not control.stop.wait(1.0):
                self._send(store, sender, control)
        finally:
            sender.close()
            store.close()

    def _send(self, store: Store, sender: Sender, control: Control) -> None:
        if control.hold_sends.is_set():  # the broker is coming back: not before the subscriber is
            control.subscriber_ready.wait(30)
        began = time.time()
        try:
            n = sender.send(store)
            self.sent += n
            self.sends.append(("steady" if n <= 2 * len(self.assets) else "backlog", time.time() - began))
        except PublishError as e:
            self.sends.append(("failed", time.time() - began))
            self.failures += 1
            kind = str(e).split(": ", 1)[-1].split(" (")[0].split(";")[0]
            self.errors[kind] = self.errors.get(kind, 0) + 1
        self.waiting = store.outbox_status()["waiting"]
        if self.waiting == 0 and self.drained_at is None and control.restarted_at is not None:
            self.drained_at = time.time()


def payload_templates(root: Path, broker: Broker, assets: list[str]) -> list[tuple[str, dict]]:
    """(topic, payload) of one tick of one site, as Outbox.scored writes them: the
    reference publishes payloads of these sizes."""
    site = Site(0, root / "templates", broker, assets)
    with Store(site.state) as store, store.transaction():
        start = dt.datetime(2027, 1, 4, 6, 0, tzinfo=dt.timezone.utc)
        outbox = Outbox(site.config)
        for a, asset in enumerate(assets):
            rows = [Row(folder="x", start_time=start.isoformat(), mic=m, source=asset, score=0.8 + 0.01 * m,
                        warning=1.0, critical=1.5, status="WARNING" if m == 0 else "NORMAL") for m in range(MICS)]
            outbox.scored(store, asset, start.strftime(clock.FOLDER_TIME), start.isoformat(), "WARNING", "NORMAL",
                          rows, acknowledged=False)
    with Store(site.state) as store:
        return [(row["topic"], json.loads(row["payload"])) for row in store.waiting_messages()]


def solo_backlog(root: Path, broker: Broker, assets: list[str], ticks: int) -> dict:
    """One site alone, the others done: ``ticks`` ticks queued while it cannot send (an
    outage's backlog), then one ``sender.send``: its wall and CPU time. Under a topic
    prefix of its own, outside the subscriber's."""
    site = Site(0, root / "solo", broker, assets)
    mqtt_settings = {**broker.mqtt_settings(site.folder / "mqtt-password"), "topic_prefix": "bench-solo"}
    config = config_from_dict({"publish": {"site": "solo", "mqtt": mqtt_settings}})
    start = dt.datetime(2027, 2, 1, tzinfo=dt.timezone.utc)
    with Store(site.state) as store:
        outbox = Outbox(config)
        for i in range(ticks):
            t = start + dt.timedelta(seconds=10 * i)
            state, previous = ("WARNING", "NORMAL") if i % 2 else ("NORMAL", "WARNING")
            with store.transaction():
                for asset in assets:
                    rows = [Row(folder="x", start_time=t.isoformat(), mic=m, source=asset, score=0.9, warning=1.0,
                                critical=1.5, status=state if m == 0 else "NORMAL") for m in range(MICS)]
                    outbox.scored(store, asset, t.strftime(clock.FOLDER_TIME), t.isoformat(), state, previous, rows,
                                  acknowledged=False)
        waiting = store.outbox_status()["waiting"]
        with Sender(config) as sender:
            wall, cpu = time.perf_counter(), time.process_time()
            sent = sender.send(store)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"waiting": waiting, "sent": sent, "wall_s": wall, "cpu_s": cpu}


def bare_site(k: int, broker: Broker, templates: list[tuple[str, dict]], dues: list[float],
              control: Control, lags: list[float], failures: list[int]) -> None:
    """The reference: a bare paho client publishing the same payloads at QoS 1 and waiting
    for their acknowledgements, no outbox."""
    name = f"site-{k:03d}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bare-{name}", clean_session=True,
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(USER, PASSWORD)
    client.max_inflight_messages_set(50)  # as Sender
    client.connect("127.0.0.1", broker.port, keepalive=60)
    client.loop_start()
    messages = [(f"{PREFIX}/bare/{topic.replace('site-000', name)}", {**payload, "site": name})
                for topic, payload in templates]
    try:
        for due in dues:
            if control.stop.wait(max(0.0, due - time.time())):
                return
            lags.append(time.time() - due)
            infos = []
            for topic, payload in messages:
                body = json.dumps({**payload, "message_id": str(uuid.uuid4()), "at_utc": clock.now_iso()},
                                  separators=(",", ":"))
                infos.append(client.publish(topic, body, qos=1))
            for info in infos:
                info.wait_for_publish(TIMEOUT_S)
                if not info.is_published():
                    failures.append(1)
    finally:
        client.disconnect()
        client.loop_stop()


def received(got: list, since: float = 0.0) -> dict[str, list]:
    """Messages by kind of topic: 'bare', 'main' (score and state), 'other' (status, wills)."""
    out: dict[str, list] = {"bare": [], "main": [], "other": []}
    for at, topic, payload, retain in got:
        if at < since:
            continue
        body = json.loads(payload)
        kind = "bare" if topic.startswith(f"{PREFIX}/bare/") else \
            "main" if body.get("type") in ("score", "state") else "other"
        out[kind].append((at, body["message_id"], dt.datetime.fromisoformat(body["at_utc"]).timestamp(), retain))
    return out


def main() -> None:
    try:
        run()
    except KeyboardInterrupt:
        log("interrupted; the broker is stopped")
        raise SystemExit(130)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a fast check: 10 sites, 1 minute, a 20 s outage from 15 s, a 20 s reference")
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--assets", type=int, default=16, help="machines per site")
    parser.add_argument("--period", type=float, default=10.0, help="seconds between a site's ticks")
    parser.add_argument("--minutes", type=float, default=5.0, help="minutes of publishing")
    parser.add_argument("--outage-start", type=float, default=1.5, help="minute of publishing the broker stops at")
    parser.add_argument("--outage-minutes", type=float, default=2.0)
    parser.add_argument("--reference-seconds", type=float, default=60.0,
                        help="seconds of the bare paho reference before the main run")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for the outboxes to empty after publishing")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (state files, broker log)")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.minutes, args.outage_start, args.outage_minutes = 10, 1.0, 0.25, 1 / 3
        args.reference_seconds = 20.0
    if not 0 < args.outage_start and args.outage_minutes > 0 and args.outage_start + args.outage_minutes < args.minutes:
        parser.error("the outage must start and end within the minutes of publishing")

    began_wall = time.time()
    dirty = uncommitted("src/signalcraft/publish", "src/signalcraft/detect/store.py", "src/signalcraft/detect/run.py")
    signal.signal(signal.SIGTERM, interrupted)
    root = Path(tempfile.mkdtemp(prefix="signalcraft-bench-publish-"))
    broker = Broker(root)
    assets = [f"asset-{a:02d}" for a in range(args.assets)]
    subscriber: Optional[Subscriber] = None
    sites: list[Site] = []
    control: Optional[Control] = None
    threads: list[threading.Thread] = []
    failed = False
    try:
        broker.start()
        log(f"mosquitto on 127.0.0.1:{broker.port}, work folder {root}")
        subscriber = Subscriber(broker, root)
        control = Control(subscriber.ready)
        templates = payload_templates(root, broker, assets)
        sizes = [len(json.dumps(p, separators=(",", ":"))) for _, p in templates]

        # Phase 1: the reference, bare paho clients.
        ref_ticks = max(1, round(args.reference_seconds / args.period))
        t0 = time.time() + 2.0
        ref_lags: list[float] = []
        ref_failures: list[int] = []
        cpu0, broker_cpu0, sub_cpu0 = time.process_time(), broker.cpu_now(), proc_cpu(subscriber.process.pid)
        for k in range(args.sites):
            dues = [t0 + i * args.period + k * args.period / args.sites for i in range(ref_ticks)]
            threads.append(threading.Thread(target=bare_site, daemon=True, name=f"bare-{k}",
                                            args=(k, broker, templates, dues, control, ref_lags, ref_failures)))
        log(f"reference: {args.sites} bare paho clients, {ref_ticks} ticks of {len(templates)} messages each")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        threads.clear()
        ref_cpu, ref_broker_cpu = time.process_time() - cpu0, broker.cpu_now() - broker_cpu0
        ref_sub_cpu = proc_cpu(subscriber.process.pid) - sub_cpu0
        time.sleep(2.0)

        # Phase 2: signalcraft, with the outage.
        sites = [Site(k, root, broker, assets) for k in range(args.sites)]
        ticks = max(1, round(args.minutes * 60 / args.period))
        main_since = time.time()
        t0 = time.time() + 3.0
        control.publish_end = t0 + ticks * args.period
        control.drain_deadline = control.publish_end + args.drain_timeout
        for site in sites:
            dues = [t0 + i * args.period + site.k * args.period / args.sites for i in range(ticks)]
            site.thread = threading.Thread(target=site.run, args=(dues, control), daemon=True, name=site.name)
        cpu0, broker_cpu0, sub_cpu0 = time.process_time(), broker.cpu_now(), proc_cpu(subscriber.process.pid)

        def snapshot() -> tuple[float, ...]:
            """(time, machine busy, this process, subscriber, broker) CPU seconds."""
            return (time.time(), machine_busy(), time.process_time(), proc_cpu(subscriber.process.pid),
                    broker.cpu_now())

        snaps = {"start": snapshot()}
        for site in sites:
            site.thread.start()
        for site in sites:
            if not site.ready.wait(30):
                raise RuntimeError(f"{site.name} did not open its state within 30 s")
        monitors = [Store(site.state) for site in sites]  # the main thread's own connections

        def waiting_now() -> int:
            return sum(m.outbox_status()["waiting"] for m in monitors)

        log(f"signalcraft: {args.sites} sites x {args.assets} assets, {ticks} ticks of {args.period:g} s; "
            f"outage from {args.outage_start:g} min for {args.outage_minutes:.3g} min")
        stop_at = t0 + args.outage_start * 60
        restart_at = stop_at + args.outage_minutes * 60
        stopped_t = restarted_t = None
        at_restart = peak = 0
        gate_s = float("nan")
        samples: list[tuple[float, int]] = []
        while any(site.thread.is_alive() for site in sites):
            now = time.time()
            if stopped_t is None and now >= stop_at:
                broker.stop()
                stopped_t = time.time()
                snaps["stop"] = snapshot()
                log(f"broker stopped; {waiting_now()} waiting")
            elif stopped_t is not None and restarted_t is None and now >= restart_at:
                control.hold_sends.set()
                broker.start()
                restarted_t = time.time()
                at_restart = waiting_now()
                control.restarted_at = restarted_t
                subscriber.ready.wait(30)
                gate_s = time.time() - restarted_t
                control.hold_sends.clear()
                log(f"broker restarted; {at_restart} waiting; subscriber back after {gate_s * 1000:.0f} ms")
                snaps["restart"] = snapshot()
            if "restart" in snaps and "drained" not in snaps and all(s.drained_at for s in sites):
                snaps["drained"] = snapshot()
            total = waiting_now()
            samples.append((time.time(), total))
            peak = max(peak, total, at_restart)
            time.sleep(0.5)
        main_cpu, main_broker_cpu = time.process_time() - cpu0, broker.cpu_now() - broker_cpu0
        main_sub_cpu = proc_cpu(subscriber.process.pid) - sub_cpu0
        snaps["end"] = snapshot()
        main_wall = time.time() - main_since
        left = waiting_now()
        for m in monitors:
            m.close()
        drain_end = max((s.drained_at or float("nan") for s in sites), default=float("nan"))
        undrained = [s.name for s in sites if s.drained_at is None]
        solo = solo_backlog(root, broker, assets, ticks=round(args.outage_minutes * 60 / args.period) + 1)
        time.sleep(2.0)  # the subscriber settles
        collected = subscriber.collect()
        got, reconnects = collected["got"], collected["connects"] - 1
        subscriber = None
    except BaseException:
        failed = True
        raise
    finally:
        if control is not None:
            control.stop.set()
        for t in threads:
            t.join(5)
        for site in sites:
            if site.thread is not None:
                site.thread.join(TIMEOUT_S + 5)
        if subscriber is not None:
            subscriber.close()
        broker.stop()
        if failed and not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    wall = time.time() - began_wall
    # What was queued: the outboxes themselves (read only, for the check).
    queued: dict[str, float] = {}
    unsent = 0
    for site in sites:
        db = sqlite3.connect(f"file:{site.state}?mode=ro", uri=True)
        for mid, created, sent in db.execute("SELECT message_id, created_utc, sent_utc FROM outbox"):
            queued[mid] = dt.datetime.fromisoformat(created).timestamp()
            unsent += sent is None
        db.close()
    kinds = received(got)
    main_msgs, bare_msgs = kinds["main"], kinds["bare"]
    ids = {mid for _, mid, _, _ in main_msgs}
    missing = len(set(queued) - ids)
    strangers = len(ids - set(queued))
    first: dict[str, tuple[float, float]] = {}
    for at, mid, at_utc, _ in main_msgs:
        if mid not in first or at < first[mid][0]:
            first[mid] = (at, at_utc)
    in_outage = [at - q for at, q in first.values() if stopped_t <= q < restarted_t]
    normal = [at - q for at, q in first.values() if not stopped_t <= q < restarted_t]
    before = [at - q for at, q in first.values() if q < stopped_t]
    after = [at - q for at, q in first.values() if q >= restarted_t]
    bare_lat = [at - q for at, _, q, _ in bare_msgs]
    bare_ids = {mid for _, mid, _, _ in bare_msgs}
    bare_sent = ref_ticks * len(templates) * args.sites
    lags = [x for s in sites for _, x in s.lags]
    lags_before = [x for s in sites for due, x in s.lags if due < stopped_t]
    lags_outage = [x for s in sites for due, x in s.lags if stopped_t <= due < restarted_t]
    lags_after = [x for s in sites for due, x in s.lags if due >= restarted_t]
    queue_s = [x for s in sites for x in s.queue_s]
    send_s = {kind: [x for s in sites for k, x in s.sends if k == kind] for kind in ("steady", "backlog", "failed")}
    failures = sum(s.failures for s in sites)
    errors: dict[str, int] = {}
    for s in sites:
        for kind, n in s.errors.items():
            errors[kind] = errors.get(kind, 0) + n
    p50, p99 = pct(normal, 50), pct(normal, 99)
    s50, s99 = pct(before, 50), pct(before, 99)
    b50, b99 = pct(bare_lat, 50), pct(bare_lat, 99)
    late = sum(x > 1.0 for x in lags)
    rate = args.sites * len(templates) / args.period
    n = max(1, len(queued))
    per_msg = lambda cpu, count: f"{cpu / max(1, count) * 1e6:.0f}"  # noqa: E731
    site_drain = [s.drained_at - restarted_t for s in sites if s.drained_at]
    total_cpu = time.process_time()

    def others(a: str, b: str) -> tuple[float, float, float, float]:
        """(seconds, machine busy, the sites' process, processes not the benchmark's) between two
        snapshots, CPU in core-seconds."""
        if a not in snaps or b not in snaps:
            return (float("nan"),) * 4
        d = [y - x for x, y in zip(snaps[a], snaps[b])]
        return d[0], d[1], d[2], max(0.0, d[1] - d[2] - d[3] - d[4])

    drain_window, drain_busy, drain_sites, drain_others = others("restart", "drained")
    drain_share = drain_busy / max(1e-9, drain_window) / (os.cpu_count() or 1)

    def cpu_window(a: str, b: str) -> str:
        if a not in snaps or b not in snaps:
            return "n/a"
        d = [y - x for x, y in zip(snaps[a], snaps[b])]
        others = max(0.0, d[1] - d[2] - d[3] - d[4])
        share = d[1] / d[0] / os.cpu_count()
        return (f"{d[0]:.0f} s x {os.cpu_count()} cores: machine busy {d[1]:.1f} core-s ({share:.0%}); "
                f"sites' process {d[2]:.1f}, subscriber {d[3]:.1f}, mosquitto {d[4]:.1f}, **other processes "
                f"{others:.1f}**")

    def row3(v: list[float]) -> str:
        return f"{ms(pct(v, 50))} / {ms(pct(v, 99))} / {ms(max(v, default=float('nan')))}"

    lines = [
        "## Publishing to an MQTT broker (scripts/bench_publish.py)",
        "",
        f"{args.sites} simulated sites x {args.assets} machines, one tick every {args.period:g} s per site (site k at "
        f"offset k x {args.period / args.sites * 1000:.0f} ms), each site with its own state file (`Store`), config "
        "(`config_from_dict`, password file), `Outbox` and persistent `Sender`, in a thread of its own. A tick is "
        f"one `store.transaction()` with `Outbox.scored(...)` for each machine ({MICS} microphones; the state "
        f"changes every tick, so a score and a state message each: {len(templates)} messages of {min(sizes)}-"
        f"{max(sizes)} bytes), then `sender.send(store)` (QoS 1, `timeout_s` {TIMEOUT_S:g}). That is {rate:.0f} "
        f"messages/s for {args.minutes:g} min into one local Mosquitto {mosquitto_version(broker.exe)} (loopback, "
        "password file, `persistence false`), stopped at minute "
        f"{args.outage_start:g} for {args.outage_minutes:.3g} min and restarted on the same port; after the last "
        "tick the outboxes are drained. One paho subscriber (QoS 1, `signalcraft/#`, in its own process) timestamps "
        "every message: latency = receive time - the payload's `at_utc` (its queue time), first delivery of each "
        "`message_id`. All of it in this one machine: the sites share one Python process (one GIL) and "
        f"{os.cpu_count()} cores with the subscriber and the broker.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| messages queued (the outboxes) / received, unique `message_id` | {len(queued)} / {len(ids)}: "
        f"**{len(ids) / n:.2%}**, {missing} missing |",
        f"| duplicates received | {len(main_msgs) - len(ids)} |",
        f"| latency p50 / p99 / max, all not queued during the outage | **{ms(p50)} / {ms(p99)}** / "
        f"{ms(max(normal, default=float('nan')))} ({len(normal)} messages) |",
        f"| of those: queued before the outage | {row3(before)} ({len(before)}) |",
        f"| of those: queued after the restart | {row3(after)} ({len(after)}) |",
        f"| delivery delay of the messages queued during the outage, p50 / p99 / max | {pct(in_outage, 50):.1f} s / "
        f"{pct(in_outage, 99):.1f} s / {max(in_outage, default=float('nan')):.1f} s ({len(in_outage)}) |",
        f"| peak outbox, all sites (sampled every 0.5 s) | {peak} messages |",
        f"| outbox at the restart, all sites (sum of `outbox_status()['waiting']`) | {at_restart} messages |",
        f"| drain time: restart to every outbox empty | **{drain_end - restarted_t:.1f} s** (median site "
        f"{statistics.median(site_drain) if site_drain else float('nan'):.1f} s"
        + (f"; {len(undrained)} sites never empty" if undrained else "") + ") |",
        f"| subscriber resubscribed after the restart | {ms(gate_s)} |",
        f"| failed sends (`PublishError`) | {failures}: " + ", ".join(f"{v} {k}" for k, v in sorted(errors.items()))
        + " |",
        f"| tick lag behind schedule p50 / p99 / max, all ticks | {row3(lags)}; {late} of {len(lags)} over 1 s |",
        f"| tick lag, ticks due before the outage / in it / after the restart, p99 | {ms(pct(lags_before, 99))} / "
        f"{ms(pct(lags_outage, 99))} / {ms(pct(lags_after, 99))} |",
        f"| queueing transaction of a tick, p50 / p99 / max | {row3(queue_s)} |",
        f"| `sender.send` of one tick's messages, p50 / p99 / max | {row3(send_s['steady'])} "
        f"({len(send_s['steady'])}) |",
        f"| `sender.send` of a backlog, after the restart, p50 / p99 / max | {row3(send_s['backlog'])} "
        f"({len(send_s['backlog'])}) |",
        f"| `sender.send` failing (broker down), p50 / p99 / max | {row3(send_s['failed'])} "
        f"({len(send_s['failed'])}) |",
        f"| one site alone afterwards: a backlog of {solo['waiting']} messages, one `send` | "
        f"{solo['wall_s'] * 1000:.0f} ms, {solo['cpu_s']:.2f} CPU s ({per_msg(solo['cpu_s'], solo['sent'])} µs per "
        "message) |",
        f"| CPU, signalcraft phase ({main_wall:.0f} s): sites' process / subscriber / mosquitto | {main_cpu:.1f} s "
        f"/ {main_sub_cpu:.1f} s / {main_broker_cpu:.1f} s ({per_msg(main_cpu, n)} / {per_msg(main_sub_cpu, n)} / "
        f"{per_msg(main_broker_cpu, n)} µs per message; sites {main_cpu / main_wall:.0%} of one core) |",
        f"| CPU of the sites' process, whole run (reference, setup and checks too) | {total_cpu:.1f} s |",
        f"| this machine's CPU, signalcraft phase | {cpu_window('start', 'end')} |",
        f"| this machine's CPU, before the outage | {cpu_window('start', 'stop')} |",
        f"| this machine's CPU, restart to every outbox empty | {cpu_window('restart', 'drained')} |",
        f"| left in the outboxes at the end | {left} |",
        "",
        f"Reference, the same run: before the signalcraft phase, {args.sites} bare paho-mqtt clients (one per site, "
        f"in the same process, on the same schedule) for {ref_ticks} ticks, each publishing payloads of the same "
        "sizes at QoS 1 and waiting for the acknowledgements: no outbox, no state file; `at_utc` set just before "
        "`publish`. The steady rows compare like with like (signalcraft: messages queued before the outage).",
        "",
        "| | bare paho, no outbox | signalcraft outbox | ratio signalcraft / bare |",
        "|---|---|---|---|",
        f"| messages | {bare_sent} sent, {len(bare_ids)} received | {len(queued)} queued, {len(ids)} received | |",
        f"| latency p50, steady | {ms(b50)} | {ms(s50)} | **{s50 / b50:.1f}x** |",
        f"| latency p99, steady | {ms(b99)} | {ms(s99)} | **{s99 / b99:.1f}x** |",
        f"| latency p50 / p99, all not queued during the outage | | {ms(p50)} / {ms(p99)} | {p50 / b50:.1f}x / "
        f"{p99 / b99:.1f}x |",
        f"| CPU per message: publishers' process / subscriber / mosquitto | {per_msg(ref_cpu, bare_sent)} / "
        f"{per_msg(ref_sub_cpu, bare_sent)} / {per_msg(ref_broker_cpu, bare_sent)} µs | "
        f"{per_msg(main_cpu, n)} / {per_msg(main_sub_cpu, n)} / {per_msg(main_broker_cpu, n)} µs | "
        f"{(main_cpu / n) / (ref_cpu / max(1, bare_sent)):.1f}x (publishers) |",
        f"| tick lag p99 | {ms(pct(ref_lags, 99))} | {ms(pct(lags, 99))} | |",
        "",
        (f"Before the outage the ticks kept to their schedule (p99 lag {ms(pct(lags_before, 99))}, max "
         f"{ms(max(lags_before, default=float('nan')))}). "
         + (f"**After the restart they fell behind**: p99 lag {ms(pct(lags_after, 99))}, max "
            f"{ms(max(lags_after, default=float('nan')))}, {late} of {len(lags)} ticks over 1 s late. Every site "
            f"sends its backlog at its first tick after the restart, all {at_restart} messages within one period, "
            f"and the one Python process that runs all {args.sites} sites (one interpreter lock: at most about one "
            f"core) is then saturated: {drain_sites / max(1e-9, drain_window):.0%} of a core from the restart until "
            f"every outbox was empty, while one site alone sends such a backlog in {solo['wall_s'] * 1000:.0f} ms. "
            f"The machine was {drain_share:.0%} busy then, {drain_others:.0f} of its {drain_busy:.0f} busy "
            "core-seconds taken by other processes, not the benchmark's. The drain time and these late ticks "
            "measure this machine running the whole fleet in one process, not one site's publisher."
            if max(lags_after, default=0.0) > 1.0 else
            f"After the restart too (p99 lag {ms(pct(lags_after, 99))}, max "
            f"{ms(max(lags_after, default=float('nan')))})."))
        + " A site sends only on its ticks, as `detect` sends after each run: its backlog leaves at its first tick "
        "after the restart, so the drain time is at least about one period, and an outage message waits for the "
        "rest of the outage plus that. Outbox sizes are read through a `Store` of each state file in the main "
        "thread; the drain time runs from the restarted broker's open port to the last site's first empty outbox "
        "after it. The sites hold their sends after the restart until the subscriber has resubscribed (the "
        "broker keeps no sessions), so that nothing is sent past it. "
        + (f"The {len(main_msgs) - len(ids)} duplicates are messages the broker had forwarded when it stopped but "
           "whose acknowledgement the site never got: sent again after the restart, and dropped by `message_id`. "
           if len(main_msgs) > len(ids) else "")
        + f"Subscriber reconnects: {reconnects}; other messages received: {len(kinds['other'])} (sites' last wills, "
        f"`online: false`, that Mosquitto publishes as it stops). The whole run took {wall / 60:.1f} min.",
    ]
    if dirty:
        lines += ["", "Run on the working tree, with uncommitted changes to " + ", ".join(f"`{d}`" for d in dirty)
                  + " at the time."]
    body = "\n".join(lines) + "\n"
    print(body)
    if strangers:
        log(f"{strangers} received message ids were never queued")
    if not args.no_write:
        print(f"written to {write_section('publish', body)}", file=sys.stderr)
    if args.keep:
        log(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def uncommitted(*paths: str) -> list[str]:
    """The files among ``paths`` that differ from the commit (what this run imported)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.splitlines() if line.strip()]


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def mosquitto_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5).stdout
        return out.split("version", 1)[1].split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    main()
