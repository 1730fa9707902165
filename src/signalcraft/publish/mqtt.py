"""Sending the outbox to the plant's MQTT broker with paho-mqtt.

``publish_waiting`` is what `detect` (after each run) and `signalcraft publish` call:
it forgets messages older than ``publish.max_outbox_days``, queues the heartbeat, and
sends what waits, oldest first, in batches of ``BATCH``. A message is marked sent only
after the broker's acknowledgement (PUBACK at QoS 1, PUBCOMP at QoS 2), and only the
unbroken run of acknowledged messages from the oldest on, so the order holds. A crash
between the acknowledgement and the mark sends that message again on the next run:
subscribers drop repeats by ``message_id``.

A broker that is down, slow or refusing (wrong password, TLS failure) is a
``PublishError`` that names the broker and says what to do; the messages stay in the
outbox. The result of the last attempt is kept in the state (``meta`` keys
``publish_last_error``, ``publish_last_error_utc``, ``publish_last_sent_utc``) for
`doctor`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Optional

from .. import clock
from ..config import Config, MqttConfig
from ..errors import SignalcraftError
from .messages import site_name, status_topic, topic_level, will_payload

log = logging.getLogger(__name__)

BATCH = 200  # messages published before their acknowledgements are awaited and marked together
MAX_PASSWORD_BYTES = 4096
REFUSED_KEY = "publish_refused_id"  # meta: the message the broker refused last
SENT_KEPT = dt.timedelta(days=1)  # sent messages are remembered this long (what a crash may resend)


class PublishError(SignalcraftError):
    """The broker could not be reached or refused; the messages wait in the outbox.

    ``refused``: retrying cannot help until the configuration changes (wrong password,
    certificate not trusted, a bad password file), as against a broker out of reach.
    """

    def __init__(self, message: str, refused: bool = True):
        super().__init__(message)
        self.refused = refused


@dataclasses.dataclass
class PublishResult:
    sent: int = 0  # messages the broker acknowledged in this run
    waiting: int = 0  # still in the outbox afterwards
    dropped: int = 0  # older than publish.max_outbox_days, never delivered
    error: Optional[str] = None  # why some are still waiting (None: all sent)
    refused: bool = False  # the broker refused (PublishError.refused), as against out of reach
    oldest_age_s: float = 0.0  # age of the oldest message still waiting, s


def read_password(m: MqttConfig) -> Optional[str]:
    """The broker password from ``password_file`` or ``password_env`` (None: neither).

    Raises
    ------
    PublishError
        The file is missing, unreadable, empty, too large, or readable by other users;
        the environment variable is unset or empty.
    """
    if m.password_env is not None:
        value = os.environ.get(m.password_env)
        if not value:
            raise PublishError(f"publish.mqtt.password_env: the environment variable {m.password_env} is unset or "
                               "empty. Set it for this user's cron and services, or use password_file.")
        return value
    if m.password_file is None:
        return None
    path = Path(m.password_file)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise PublishError(f"{path}: publish.mqtt.password_file is not a regular file.")
        if info.st_size > MAX_PASSWORD_BYTES:
            raise PublishError(f"{path}: {info.st_size} bytes is too large for a password file; is it the right "
                               "file?")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PublishError(f"{path}: the MQTT password file is readable by other users; make it this user's "
                               f"only: chmod 600 {path}")
        text = path.read_text(encoding="utf-8").strip("\r\n")
    except FileNotFoundError:
        raise PublishError(f"{path}: publish.mqtt.password_file not found. Write the broker password into it "
                           f"(one line) and chmod 600 it.") from None
    except UnicodeDecodeError:
        raise PublishError(f"{path}: the MQTT password file is not UTF-8 text.") from None
    except OSError as e:
        raise PublishError(f"{path}: cannot read publish.mqtt.password_file: {e.strerror}.") from None
    if not text:
        raise PublishError(f"{path}: the MQTT password file is empty.")
    return text


class Sender:
    """One connection to the broker, as a context manager: connects on entry (or on the
    first ``send``), disconnects cleanly on exit. After a failed ``send`` the connection
    is dropped (with paho's own queue, so nothing is sent twice from it) and the next
    ``send`` connects again.

    ``probe``: connect without a last will, under a client id of its own (``doctor``:
    the broker would otherwise cut off a publisher of the same id).
    """

    def __init__(self, config: Config, probe: bool = False):
        if config.publish.mqtt is None:
            raise PublishError("publishing is off: set publish.mqtt in the config (see docs/fleet.md).")
        self.config = config
        self.m = config.publish.mqtt
        self.probe = probe
        self.broker = f"MQTT broker {self.m.host}:{self.m.port}"
        self.site = site_name(config)
        self.client_id = (self.m.client_id or f"signalcraft-{topic_level(self.site)}") + ("-doctor" if probe else "")
        self._client = None
        self._refused: dict[int, str] = {}  # MQTT message id -> the reason the broker refused it
        self._password = read_password(self.m)

    def __enter__(self) -> "Sender":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

    def connect(self) -> None:
        """Connect and wait for the broker's answer (at most ``timeout_s``).

        Raises
        ------
        PublishError
            The broker cannot be reached, its TLS certificate is not trusted, or it
            refused the connection (the reason it gave, e.g. a wrong password).
        """
        import paho.mqtt.client as mqtt

        self.close()
        self._refused.clear()  # paho numbers a new client's messages from 1 again
        m = self.m
        # MQTT 5: a broker that refuses a message (its ACL) says so in the acknowledgement;
        # under 3.1.1 it acknowledges and drops it.
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        client.connect_timeout = m.timeout_s
        client.max_inflight_messages_set(50)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        if m.username is not None:
            client.username_pw_set(m.username, self._password)
        if m.tls:
            try:
                client.tls_set(ca_certs=str(m.ca_file) if m.ca_file is not None else None)
            except (OSError, ssl.SSLError) as e:
                raise PublishError(f"{m.ca_file}: publish.mqtt.ca_file cannot be used as a CA certificate: "
                                   f"{getattr(e, 'strerror', None) or e}.") from None
        if not self.probe:
            client.will_set(f"{m.topic_prefix}/{status_topic(self.config)}", will_payload(self.config, clock.now_iso()),
                            qos=m.qos, retain=True)
        answered = threading.Event()
        answer: list = []

        def on_connect(client, userdata, flags, reason_code, properties):
            answer[:] = [reason_code]
            answered.set()

        def on_publish(client, userdata, mid, reason_code, properties):
            if reason_code.is_failure:
                self._refused[mid] = str(reason_code)

        client.on_connect, client.on_publish = on_connect, on_publish
        try:
            client.connect(m.host, m.port, keepalive=m.keepalive_s, clean_start=True)
        except ssl.SSLCertVerificationError as e:
            if "mismatch" in (e.verify_message or ""):  # signed by a trusted CA, for another name
                raise PublishError(f"{self.broker}: its TLS certificate is not for this name ({e.verify_message}). "
                                   "Set publish.mqtt.host to the name the certificate was made for.") from None
            raise PublishError(f"{self.broker}: its TLS certificate is not trusted ({e.verify_message}). Set "
                               "publish.mqtt.ca_file to the CA that signed it.") from None
        except ssl.SSLError as e:
            raise PublishError(f"{self.broker}: TLS failed ({e.reason or e}). Is the port a TLS listener "
                               "(publish.mqtt.tls, port)?") from None
        except socket.gaierror as e:
            raise PublishError(f"{self.broker}: unknown host ({e.strerror}); check publish.mqtt.host and the "
                               "network.", refused=False) from None
        except (socket.timeout, TimeoutError):
            raise PublishError(f"{self.broker}: no answer within {m.timeout_s:g} s (publish.mqtt.timeout_s); is "
                               "the network down?", refused=False) from None
        except ConnectionResetError as e:
            if m.tls:  # a plain MQTT listener drops a TLS hello
                raise PublishError(f"{self.broker}: the connection was cut during the TLS handshake ({e.strerror or e})"
                                   "; is the port a TLS listener (publish.mqtt.tls, port)?") from None
            raise PublishError(f"{self.broker}: cannot connect ({e.strerror or e}); is the broker running and the "
                               "network up?", refused=False) from None
        except OSError as e:
            raise PublishError(f"{self.broker}: cannot connect ({e.strerror or e}); is the broker running and the "
                               "network up?", refused=False) from None
        client.loop_start()
        if not answered.wait(m.timeout_s) or not answer:
            self._stop(client)
            expects = "a plain MQTT port with publish.mqtt.tls true" if m.tls else \
                "a TLS port with publish.mqtt.tls false"
            raise PublishError(f"{self.broker}: connected, but no answer to the MQTT handshake within "
                               f"{m.timeout_s:g} s; is it an MQTT port, and not {expects}?")
        reason = answer[0]
        if reason.is_failure:
            self._stop(client)
            where = (f"the password in {m.password_file}" if m.password_file else f"the password in ${m.password_env}"
                     if m.password_env else "that a password is needed (none is set: publish.mqtt.password_file or "
                     "password_env)")
            hint = f" Check publish.mqtt.username and {where}." if int(reason.value) in (4, 5, 134, 135) else ""
            raise PublishError(f"{self.broker} refused the connection: {reason}.{hint}")
        self._client = client

    def send(self, store) -> int:
        """Send what waits in ``store``'s outbox, oldest first; returns how many the
        broker acknowledged. Raises PublishError (after marking those acknowledged) when
        the connection fails or the broker does not acknowledge within ``timeout_s``."""
        if not self.connected:
            self.connect()
        prefix, qos = self.m.topic_prefix, self.m.qos
        sent = 0
        # The oldest waiting message was refused last time: it goes alone first, so that a
        # broker still refusing it is not sent the batch behind it again and again.
        refused_before = store.get_meta(REFUSED_KEY) or None
        while rows := store.waiting_messages(limit=BATCH):
            if refused_before is not None and rows[0]["message_id"] == refused_before:
                rows, refused_before = rows[:1], None
            infos = [self._client.publish(f"{prefix}/{row['topic']}", row["payload"], qos=qos,
                                          retain=bool(row["retain"])) for row in rows]
            acknowledged, failure, refused = [], None, False
            for row, info in zip(rows, infos):
                try:
                    info.wait_for_publish(self.m.timeout_s)
                    if not info.is_published():
                        failure = (f"{self.broker}: no acknowledgement within {self.m.timeout_s:g} s "
                                   "(publish.mqtt.timeout_s); the rest is sent next time")
                except (RuntimeError, ValueError) as e:
                    failure = f"{self.broker}: the connection was lost ({e}); the rest is sent next time"
                if info.mid in self._refused:  # not taken: it stays in the outbox, and so does what follows
                    failure = (f"{self.broker} refused to take {prefix}/{row['topic']}: "
                               f"{self._refused.pop(info.mid)}. Allow this site's user to publish under "
                               f"{prefix}/{topic_level(self.site)}/# (the broker's ACL), or check publish.site")
                    refused = True
                    with store.transaction():
                        store.set_meta(REFUSED_KEY, row["message_id"])
                if failure:
                    break
                acknowledged.append(row["id"])
            if acknowledged:
                with store.transaction():
                    store.mark_sent(acknowledged, clock.now_iso())
                sent += len(acknowledged)
            if failure:
                self.close()
                raise PublishError(failure, refused=refused)
        if store.get_meta(REFUSED_KEY):  # everything taken: the refusal is over
            with store.transaction():
                store.set_meta(REFUSED_KEY, "")
        return sent

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._stop(client)

    @staticmethod
    def _stop(client) -> None:
        try:
            client.disconnect()
        finally:
            client.loop_stop()


def publish_waiting(config: Config, output_dir: Path, heartbeat: bool = True) -> PublishResult:
    """What `detect` and `signalcraft publish` do: forget old messages, queue the
    heartbeat, send what waits. Never raises for the broker: the result says what
    happened (``error``). Raises StoreError for a state file that cannot be used, and
    LockBusy when another process is sending this outbox."""
    from ..detect.run import state_path
    from ..detect.store import Store
    from ..locks import RunLock
    from .messages import queue_heartbeat

    path = state_path(config, output_dir)
    result = PublishResult()
    if config.publish.mqtt is None or not path.is_file():
        return result
    with Store(path) as store:
        now = clock.now()
        cutoff = now - dt.timedelta(days=config.publish.max_outbox_days)
        sent_cutoff = max(cutoff, now - SENT_KEPT)
        with store.transaction():
            result.dropped = store.prune_outbox(cutoff.isoformat(), sent_cutoff.isoformat())
        if result.dropped:
            log.warning("outbox: %d messages older than publish.max_outbox_days (%g days) were never delivered and "
                        "are dropped", result.dropped, config.publish.max_outbox_days)
        if heartbeat:
            queue_heartbeat(config, output_dir, store)
        if store.outbox_status()["waiting"] == 0:
            return result
        with RunLock(Path(str(path) + ".publish.lock"), f"the outbox of {path}", "publish"):
            try:
                with Sender(config) as sender:
                    result.sent = sender.send(store)
            except PublishError as e:
                result.error, result.refused = str(e), e.refused
        box = store.outbox_status()
        result.waiting = box["waiting"]
        if box["oldest_utc"] is not None:
            result.oldest_age_s = (clock.now() - dt.datetime.fromisoformat(box["oldest_utc"])).total_seconds()
        with store.transaction():
            if result.error is None:
                store.set_meta("publish_last_sent_utc", clock.now_iso())
            store.set_meta("publish_last_error", result.error or "")
            store.set_meta("publish_last_error_utc", clock.now_iso() if result.error else "")
    return result


def waiting_messages(config: Config, output_dir: Path) -> list[dict]:
    """The messages waiting in the outbox of ``output_dir``'s state, oldest first (see
    ``Store.waiting_messages``); none when there is no state file yet."""
    from ..detect.run import state_path
    from ..detect.store import Store

    path = state_path(config, output_dir)
    if not path.is_file():
        return []
    with Store(path, create=False) as store:
        return store.waiting_messages()
