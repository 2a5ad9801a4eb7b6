"""The embedded default broker: used when nothing listens at ``--mqtt-url``.

Preference order: the ``mosquitto`` binary when installed (full MQTT v5, persistence),
else amqtt, a maintained pure-Python broker that speaks MQTT 3.1.1 only. Under amqtt
the transport falls back to 3.1.1 and v5 extras degrade: no message or session expiry
(retained state and queued messages live until the broker stops), no shared
subscriptions (one aggregator worker per broker), no broker-advertised packet limit
(chunking uses its 256 KiB default). Either broker runs as a child process so its
event loop and crashes stay out of ours.

``python -m aggregator.broker --port 1883`` runs the amqtt broker in the foreground.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("fedaigc.broker")


def broker_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a broker of one's own: tests, benchmarks)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """A broker child process on ``host:port``: ``kind`` is "mosquitto", "amqtt" or "auto".

    ``config``: run this Mosquitto config (e.g. ``fedaigc broker-config``'s, with accounts, ACLs and
    TLS) instead of an anonymous one; ``host``/``port`` then say where it listens, and ``tls`` whether
    clients reach it as ``mqtts://``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, kind: str = "auto",
                 state_dir: str | Path | None = None, config: str | Path | None = None, tls: bool = False) -> None:
        if config is not None and kind == "amqtt":
            raise ValueError("a broker config is a Mosquitto config; amqtt cannot run it")
        kind = "mosquitto" if config is not None else kind
        if kind not in ("auto", "mosquitto", "amqtt"):
            raise ValueError(f"broker kind must be auto, mosquitto or amqtt, got {kind!r}")
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") else "amqtt"
        if kind == "mosquitto" and not shutil.which("mosquitto"):
            raise FileNotFoundError("the mosquitto binary is not installed")
        self.host, self.port, self.kind, self.tls = host, port, kind, tls
        self.config = Path(config) if config is not None else None
        self._tmp = tempfile.TemporaryDirectory(prefix="fedaigc-broker-") if state_dir is None else None
        self.state_dir = Path(state_dir or self._tmp.name)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def speaks_v5(self) -> bool:
        return self.kind == "mosquitto"

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        if broker_listening(self.host, self.port):
            raise RuntimeError(f"something already listens on {self.host}:{self.port}")
        log_file = open(self.state_dir / "broker.log", "ab")
        if self.config is not None:
            cmd = ["mosquitto", "-c", str(self.config)]
        elif self.kind == "mosquitto":
            conf = self.state_dir / "mosquitto.conf"
            conf.write_text(
                f"listener {self.port} {self.host}\nallow_anonymous true\n"
                f"persistence true\npersistence_location {self.state_dir}/\nautosave_interval 1\n"
                "max_queued_messages 100000\nmessage_size_limit 0\n"
                # run as whoever we are: mosquitto started as root would otherwise switch to a
                # 'mosquitto' user that cannot write our state directory
                f"user {getpass.getuser()}\n"
            )
            cmd = ["mosquitto", "-c", str(conf)]
        else:
            cmd = [sys.executable, "-m", "aggregator.broker", "--host", self.host, "--port", str(self.port)]
        self.process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not broker_listening(self.host, self.port, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.state_dir / "broker.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded {self.kind} broker did not start on {self.host}:{self.port}:\n{tail}")
            time.sleep(0.1)
        log.info("started embedded %s broker at %s", self.kind, self.url)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()  # mosquitto writes its persistence file on SIGTERM
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def ensure_broker(url: str, kind: str = "auto") -> EmbeddedBroker | None:
    """``None`` if a broker already answers at ``url``; else a started embedded one (announced)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 1883
    if broker_listening(host, port):
        return None
    broker = EmbeddedBroker(host, port, kind).start()
    print(f"fedaigc: no broker answered at {url}; started an embedded {broker.kind} broker there"
          + ("" if broker.speaks_v5 else " (MQTT 3.1.1 only: v5 extras disabled)"), file=sys.stderr)
    return broker


def _run_amqtt(host: str, port: int) -> None:
    import asyncio

    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 10000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }

    async def main() -> None:
        broker = Broker(config)
        await broker.start()
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the embedded amqtt broker in the foreground.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _run_amqtt(args.host, args.port)
