"""What the fault tests share: an own broker, devices that behave like the real session, daemons as processes.

Faults are injected for real: broker and aggregator are separate processes that the tests
stop, SIGKILL and restart; devices are ``LiteDevice`` s (real keys and envelopes, no model)
that, like ``edge_sdk.session``, re-send their stored answer when re-invited to a round.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from aggregator.global_model import adapter_shapes
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice, start_adapter
from edge_sdk.protocol.envelope import EnvelopeVerifier, EnvelopeWriter, MessageType
from edge_sdk.protocol.identity import PublicIdentity
from edge_sdk.protocol.messages import RoundStart, UpdateAck, read_signed_keys
from edge_sdk.transport import MqttConfig, MqttTransport
from models.lora import lora_from_dict
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]


def delta_for(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in sorted(shapes.items())}


class FaultDevice(LiteDevice):
    """A LiteDevice that, like the real session, answers a repeated round start with its stored
    answer; optionally pinned to one aggregator's keys (on a shared broker)."""

    def __init__(self, mqtt_url: str, device_id: str | None = None, keys: PublicIdentity | None = None,
                 aggregator_id: str | None = None) -> None:
        super().__init__(mqtt_url, device_id)
        self.mqtt_url = mqtt_url
        self.answers: dict[int, bytes] = {}
        self.pinned = keys is not None
        if keys is not None:
            self.aggregator, self.aggregator_id = keys, aggregator_id
            self.verifier = EnvelopeVerifier(lambda sender: keys.verify_key)

    def _on_keys(self, topic, data):
        if not self.pinned:
            super()._on_keys(topic, data)
        elif data and read_signed_keys(data).verify_key == self.aggregator.verify_key:
            self.fleet_model = read_signed_keys(data).model  # the pinned aggregator's announcement

    def _on_down(self, topic, data):
        super()._on_down(topic, data)
        env, body = self.inbox[-1]
        if env.type == MessageType.ROUND_START:
            start = RoundStart.decode(body)
            if start.round in self.answers and start.local_steps > 0:  # re-invited: our update was not counted
                self.transport.publish(self.topics.update(self.id), self.answers[start.round])

    def starts(self) -> list[RoundStart]:
        with self.cond:
            return [RoundStart.decode(b) for e, b in self.inbox if e.type == MessageType.ROUND_START]

    def start_of(self, rnd: int, timeout: float = 30.0) -> RoundStart:
        found: list[RoundStart] = []
        wait_until(lambda: bool(found.extend(s for s in self.starts() if s.round == rnd) or found), timeout,
                   f"{self.id}: round start {rnd}")
        return found[0]

    def answer(self, start: RoundStart, delta: dict[str, torch.Tensor], wait: bool = False, **kwargs) -> bytes:
        """Build, remember and publish this device's update for ``start`` (QoS 1, queued while offline)."""
        env = self.update_envelope(start, delta, **kwargs)
        self.answers[start.round] = env
        infos = self.transport.publish(self.topics.update(self.id), env)
        if wait:
            self.transport.wait_published(infos)
        return env

    def acks_for(self, rnd: int) -> list[UpdateAck]:
        with self.cond:
            return [a for a in self.acks() if a.round == rnd]

    def accepted(self, rnd: int) -> bool:
        return any(a.accepted for a in self.acks_for(rnd))

    def reconnect(self) -> None:
        """Drop the connection and come back with a new one (same id and keys, so the same MQTT session).

        Handlers go in before the connection: what the broker kept for the session arrives right
        after CONNACK, and a transport with no handler yet would drop it."""
        self.transport.close()
        self.transport = MqttTransport(MqttConfig(url=self.mqtt_url, client_id=f"fedaigc-{self.id}",
                                                  topic_prefix=self.topics.prefix))
        self.transport.subscribe(self.topics.aggregator_keys, self._on_keys)
        self.transport.subscribe(self.topics.down(self.id), self._on_down, chunked=True)
        self.transport.connect()

    def rewrite(self) -> None:
        """A new envelope writer (fresh sequence), as after a device restart."""
        self.writer = EnvelopeWriter(self.identity, self.id)


def open_round_one(devices: list, seed: int) -> tuple[list[RoundStart], dict[str, torch.Tensor]]:
    """Enrol ``devices`` with one task vector; their round-1 starts and the adapter those carry."""
    vector = np.random.default_rng(seed).normal(size=384)
    for d in devices:
        d.join(vector)
    starts = [d.start_of(1) for d in devices]
    return starts, adapter_of(starts[0])


def adapter_of(start: RoundStart) -> dict[str, torch.Tensor]:
    """The adapter a first round start carries, in full or as the seed a device draws it from."""
    return start_adapter(start, adapter_shapes(lora_from_dict(start.lora)))


def write_config(path: Path, **settings) -> Path:
    """An aggregator.toml admitting the fault devices (the demo fleet token) with ``settings``."""
    lines = ["[aggregator]", f'tokens = ["{DEMO_TOKEN}"]']
    for k, v in settings.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v}")
        else:
            lines.append(f'{k} = "{v}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """``python -m aggregator.cli aggregator --config ...`` (or another module) as a child process.

    Output goes through a pipe (not a file: a file-size limit on the child must not hit its log).
    """

    def __init__(self, config: Path, runner: tuple[str, ...] = ("-m", "aggregator.cli", "aggregator"),
                 extra: tuple[str, ...] = ()) -> None:
        self.cmd = [sys.executable, *runner, "--config", str(config), *extra]
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None

    def start(self, ready: str = "running", timeout: float = 90.0) -> "DaemonProcess":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     text=True, errors="replace")
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        wait_until(lambda: any(ready in line for line in self.lines) or self.proc.poll() is not None, timeout,
                   f"daemon start ({' '.join(self.cmd[1:4])})")
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def sqlite_rows(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the daemon's SQLite state from outside (read-only; WAL lets us read while it writes)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
        return c.execute(sql, params).fetchall()


