"""Which senders are enrolled and not revoked, for checks that run before any signature does:
presence (``status/{id}``, plain bytes any broker client may publish) and the first frame of a
chunked message (reassembly memory is only spent on enrolled senders).

Asking the store for every such message would let a flood of invented ids cost one query each, so
the set of enrolled ids is cached: a known id costs a set lookup, an unknown one re-reads the store
at most every ``refresh_s`` (how late a device enrolled by another scale-out worker is seen), the
whole set is re-read at least every ``max_age_s`` (how late a revocation reaches these checks; the
envelope check refuses a revoked sender's messages at once anyway), and a device enrolled here is
added at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from aggregator.state import StateStore, StateUnavailable
from edge_sdk.protocol.errors import Refusal, RefusedMessage


class EnrolledIds:
    def __init__(self, store: StateStore, refresh_s: float = 1.0, max_age_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.refresh_s, self.max_age_s, self.clock = store, refresh_s, max_age_s, clock
        self._ids: set[str] = set()
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    def __contains__(self, device: str) -> bool:
        with self._lock:
            age = self.clock() - self._read_at
            if age >= self.max_age_s or (device not in self._ids and age >= self.refresh_s):
                self._ids, self._read_at = self.store.enrolled_ids(), self.clock()
            return device in self._ids

    def __call__(self, sender: str) -> bool:
        """The transport's ``accept_chunks_from``: a store that cannot answer refuses the frame (the
        sender's next frame asks again)."""
        try:
            return sender in self
        except StateUnavailable as e:
            raise RefusedMessage(Refusal.UNAVAILABLE, f"cannot tell whether {sender} is enrolled: {e}") from e

    def add(self, device: str) -> None:
        with self._lock:
            self._ids.add(device)
