"""Which device ids are enrolled, for handlers that take an id nobody signed (presence topics).

A retained ``status/{id}`` is plain bytes on a topic any broker client may publish, so the id in
it is only believed when it names an enrolled device. Asking the store for every such message
would let a flood of invented ids cost one query each; the set is cached instead: a known id costs
a set lookup, an unknown one re-reads the store at most every ``refresh_s`` (how late a device
enrolled by another scale-out worker is seen), and a device enrolled here is added at once.
"""

from __future__ import annotations

import threading
import time

from aggregator.state import StateStore


class EnrolledIds:
    def __init__(self, store: StateStore, refresh_s: float = 1.0) -> None:
        self.store, self.refresh_s = store, refresh_s
        self._ids: set[str] = set()
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    def __contains__(self, device: str) -> bool:
        with self._lock:
            if device in self._ids:
                return True
            if time.monotonic() - self._read_at >= self.refresh_s:
                self._ids, self._read_at = self.store.enrolled_ids(), time.monotonic()
            return device in self._ids

    def add(self, device: str) -> None:
        with self._lock:
            self._ids.add(device)
