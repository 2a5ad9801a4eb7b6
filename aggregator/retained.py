"""Retained messages this process published, kept as it published them.

Anyone the broker lets publish on a retained topic can replace or clear what a late subscriber
gets: a cleared key announcement stops new devices from enrolling, a cleared artifact part
makes every device's fetch time out. Signatures make a replacement refused, not undone. The
guard subscribes to what it publishes and, when the broker delivers something else there, counts
it (``retained_altered``), logs it and publishes its own message again. It also re-publishes
everything it holds on ``refresh_if_due``, for a broker that lost its retained store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.transport import MqttTransport

Same = Callable[[bytes, bytes], bool]  # (held, delivered) -> whether the delivered one is as good as held
RESTORE_GAP_S = 1.0  # two publishers fighting over a topic (two daemons, one prefix) get one restore a second


class RetainedGuard:
    def __init__(self, transport: MqttTransport, refusals: RefusalCounter, interval_s: float | None = None) -> None:
        self.transport, self.refusals, self.interval_s = transport, refusals, interval_s
        self.restored = 0  # altered or cleared messages published again
        self._held: dict[str, tuple[bytes, Same]] = {}
        self._watched: set[str] = set()
        self._lock = threading.Lock()
        self._refreshed = time.monotonic()
        self._last_restore: dict[str, float] = {}
        self._pending: set[str] = set()  # altered again within RESTORE_GAP_S: put back by refresh_if_due

    def publish(self, topic: str, payload: bytes, watch: str | None = None,
                same: Same = bytes.__eq__) -> list[mqtt.MQTTMessageInfo]:
        """Publish ``payload`` retained on ``topic`` and keep it there. ``watch``: the filter to subscribe
        (one per file's parts rather than one per part); ``same``: when another message counts as this one
        (e.g. a re-signed announcement of the same keys by another worker)."""
        watch = watch or topic
        with self._lock:
            self._held[topic] = (payload, same)
            new = watch not in self._watched
            self._watched.add(watch)
        infos = self.transport.publish(topic, payload, retain=True)
        if new:  # after the publish: the broker then answers the subscription with ours, not its predecessor
            self.transport.subscribe(watch, self._on_message)
        return infos

    def release(self, topic: str) -> None:
        """Stop keeping ``topic`` (before withdrawing it on purpose)."""
        with self._lock:
            self._held.pop(topic, None)
            self._pending.discard(topic)

    def refresh_if_due(self) -> None:
        """Put back what was altered too soon after a restore; every ``interval_s``, publish everything
        held again (without waiting for the broker)."""
        with self._lock:
            due = [t for t in self._pending if time.monotonic() - self._last_restore[t] >= RESTORE_GAP_S]
        for topic in due:
            self._restore(topic)
        if self.interval_s is None or time.monotonic() - self._refreshed < self.interval_s:
            return
        self._refreshed = time.monotonic()
        self._last_restore: dict[str, float] = {}
        self._pending: set[str] = set()  # altered again within RESTORE_GAP_S: put back by refresh_if_due
        with self._lock:
            held = [(topic, payload) for topic, (payload, _) in self._held.items()]
        for topic, payload in held:
            self.transport.publish(topic, payload, retain=True)

    def _on_message(self, topic: str, payload: bytes) -> None:
        """On paho's thread: publishing from here only queues."""
        with self._lock:
            held = self._held.get(topic)
        if held is None or held[1](held[0], payload):
            return
        what = "cleared" if not payload else f"replaced ({len(payload)} bytes)"
        self.refusals.record(RefusedMessage(Refusal.RETAINED_ALTERED, f"the retained message was {what}"), topic)
        with self._lock:
            if time.monotonic() - self._last_restore.get(topic, -RESTORE_GAP_S) < RESTORE_GAP_S:
                self._pending.add(topic)
                return
        self._restore(topic)

    def _restore(self, topic: str) -> None:
        with self._lock:
            self._pending.discard(topic)
            held = self._held.get(topic)
            if held is None:
                return
            self._last_restore[topic] = time.monotonic()
            self.restored += 1
        self.transport.publish(topic, held[0], retain=True)
