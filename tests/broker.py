"""A real Mosquitto broker for the publisher's tests, on a free loopback port, with a
password file and optionally TLS with a certificate made for the test; and a subscriber
that collects what arrives."""

from __future__ import annotations

import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

USER, PASSWORD = "pump-room", "s3cret pass"


def mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        raise RuntimeError("mosquitto is not installed: run `bash scripts/setup.sh --test`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", "/CN=signalcraft test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out",
            str(cert), "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "cert": cert, "key": key}


class Broker:
    """``start()``, ``stop()``, ``start()`` again on the same port."""

    def __init__(self, folder: Path, tls: dict[str, Path] | None = None, acl: str | None = None):
        self.folder = folder
        self.port = free_port()
        self.tls = tls
        self.process: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        passwords = folder / "passwords"
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), USER, PASSWORD], check=True,
                       capture_output=True)
        passwords.chmod(0o600)
        # Run as root (as in CI), mosquitto would switch to its own user, who cannot read
        # the test's files: it stays this user.
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1", "allow_anonymous false",
                 f"password_file {passwords}",
                 "persistence false", "log_dest stderr", "max_queued_messages 100000", "max_inflight_messages 100"]
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}"]
        if acl is not None:  # e.g. "user pump-room\ntopic readwrite signalcraft/room-1/#"
            (folder / "acl").write_text(acl + "\n")
            lines.append(f"acl_file {folder / 'acl'}")
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> "Broker":
        self.log = open(self.folder / "broker.log", "ab")
        self.process = subprocess.Popen([mosquitto(), "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {(self.folder / 'broker.log').read_text()[-2000:]}")
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not open its port within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None
        self.log.close()

    def settings(self, **overrides) -> dict:
        """publish.mqtt settings for this broker (the password from a file next to it)."""
        password_file = self.folder / "client-password"
        password_file.write_text(PASSWORD + "\n")
        password_file.chmod(0o600)
        mqtt = {"host": "127.0.0.1", "port": self.port, "username": USER, "password_file": str(password_file),
                "timeout_s": 3.0}
        if self.tls:
            mqtt.update(tls=True, ca_file=str(self.tls["ca"]))
        return {**mqtt, **overrides}


class Subscriber:
    """A paho client subscribed to ``topic``: ``messages`` collects (topic, payload
    dict, retain) as they arrive."""

    def __init__(self, broker: Broker, topic: str = "signalcraft/#"):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-subscriber-{broker.port}")
        self.client.username_pw_set(USER, PASSWORD)
        if broker.tls:
            self.client.tls_set(ca_certs=str(broker.tls["ca"]))
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)

        def on_connect(client, userdata, flags, reason_code, properties):
            client.subscribe(topic, qos=1)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            self.subscribed.set()

        def on_message(client, userdata, message):
            with self.lock:
                self.messages.append((message.topic, json.loads(message.payload), bool(message.retain)))

        self.client.on_connect, self.client.on_subscribe, self.client.on_message = on_connect, on_subscribe, on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the test subscriber did not subscribe within 10 s")

    def wait_for(self, count: int, timeout: float = 20) -> list[tuple[str, dict, bool]]:
        """The messages once at least ``count`` distinct message ids arrived (or the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.ids()) >= count:
                break
            time.sleep(0.05)
        with self.lock:
            return list(self.messages)

    def ids(self) -> list[str]:
        with self.lock:
            return list(dict.fromkeys(payload["message_id"] for _, payload, _ in self.messages))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
