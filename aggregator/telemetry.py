"""What operators read about a running aggregator: bytes per round, device and direction, the DP
budgets devices report, who is online, and refusals by reason.

Kept in memory (the generation thread counts its replies too, hence the lock) and written to
the state store at most every ``interval_s`` and after every committed round, where
``fedaigc status`` and a restarted daemon find it. Scale-out workers each see only some
devices' updates, so the privacy record is merged into the stored one, never overwritten, and
each worker keeps its refusal counts in a row of its own (``refusals/{worker}``), which a
restarted worker continues and ``merged_refusals`` sums.

Nothing here grows with what an unauthenticated sender says: the online map takes only enrolled
devices (``StatusIntake``), and traffic is counted under a round only once the round is known to
be open, everything else under round 0.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from aggregator.state import StateStore, StateUnavailable
from edge_sdk.protocol.errors import RefusalCounter

log = logging.getLogger("fedaigc.aggregator")

REFUSALS = "refusals/"  # + the worker's name: its refusal counts


def merged_refusals(store: StateStore) -> dict[str, int]:
    """Refusals by reason over every worker that shares ``store``."""
    total: dict[str, int] = {}
    for counts in store.get_prefixed(REFUSALS).values():
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return total


class Telemetry:
    def __init__(self, store: StateStore, refusals: RefusalCounter, worker: str, interval_s: float = 2.0) -> None:
        self.store = store
        self.refusals = refusals
        self.refusals_key = REFUSALS + worker
        self.interval_s = interval_s
        self.wire_bytes: Callable[[int], int] = lambda n: n  # the transport's, once connected
        self.traffic: dict[int, dict[str, dict[str, int]]] = {}  # round -> device -> {"up", "down"}
        self.privacy: dict[int, dict[str, dict]] = {}  # round -> device -> {"epsilon", "delta"} as reported
        self.online: dict[str, bool] = {}
        self.duplicate_updates = 0  # updates stored already (a device's re-send, a QoS-1 redelivery): re-acknowledged
        self._lock = threading.Lock()
        self._persisted_at = 0.0

    def count(self, rnd: int, device: str, direction: str, n: int) -> None:
        """Account ``n`` message bytes as the MQTT payload bytes they cost (envelope and chunk headers)."""
        n = self.wire_bytes(n)
        with self._lock:
            per = self.traffic.setdefault(rnd, {}).setdefault(device, {"up": 0, "down": 0})
            per[direction] += n

    def totals(self) -> dict[str, int]:
        """MQTT payload bytes so far, per direction, over every round and device."""
        with self._lock:
            per_device = [v for per in self.traffic.values() for v in per.values()]
        return {d: sum(v.get(d, 0) for v in per_device) for d in ("up", "down")}

    def record_privacy(self, rnd: int, device: str, epsilon: float, delta: float) -> None:
        """The DP budget a device says it has spent (its own accounting: the aggregator cannot verify noise)."""
        eps = None if math.isinf(epsilon) else float(epsilon)  # None: no finite bound (JSON has no inf)
        self.privacy.setdefault(rnd, {})[device] = {"epsilon": eps, "delta": float(delta)}

    def set_online(self, device: str, online: bool) -> None:
        self.online[device] = online

    def restore_refusals(self) -> None:
        """Once, at start: this worker's counts continue from what it persisted before it stopped."""
        self.refusals.restore(self.store.get(self.refusals_key, {}))

    def restore(self) -> None:
        self.traffic = {int(r): v for r, v in self.store.get("traffic", {}).items()}
        self.privacy = {int(r): v for r, v in self.store.get("privacy", {}).items()}

    def persist(self) -> None:
        self._persisted_at = time.monotonic()
        try:
            self.store.put(self.refusals_key, self.refusals.counts())
            with self._lock:
                traffic = {str(r): v for r, v in self.traffic.items()}
            self.store.put("traffic", traffic)
            self.store.put("privacy", self.merged_privacy())
            self.store.put("online", self.online)
        except StateUnavailable as e:
            log.error("cannot persist metrics: %s", e)

    def persist_if_due(self) -> None:
        if time.monotonic() - self._persisted_at > self.interval_s:
            self.persist()

    def merged_privacy(self) -> dict[str, dict[str, dict]]:
        merged = self.store.get("privacy", {})
        for rnd, reports in self.privacy.items():
            merged.setdefault(str(rnd), {}).update(reports)
        return merged
