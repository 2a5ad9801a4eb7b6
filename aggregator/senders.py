"""Who may have chunked messages reassembled: enrolled, unrevoked senders, as the state store says.

The transport asks at the first frame of every chunked message, on paho's network thread, and a
flood asks at every frame of messages it refuses, so answers are cached: a yes for ``ttl_s`` (a
revocation reaches reassembly within that, and the envelope check refuses the message anyway), a
no for ``negative_ttl_s`` only (a device that just enrolled is not kept waiting), at most
``max_entries`` senders (least recently asked dropped first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from aggregator.enrolment import verify_key_of
from aggregator.state import StateStore, StateUnavailable
from edge_sdk.protocol.errors import Refusal, RefusedMessage


class EnrolledSenders:
    def __init__(self, store: StateStore, kind: str = "device", ttl_s: float = 10.0, negative_ttl_s: float = 1.0,
                 max_entries: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.kind = store, kind
        self.ttl_s, self.negative_ttl_s, self.max_entries = ttl_s, negative_ttl_s, max_entries
        self.clock = clock
        self._answers: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, sender: str) -> bool:
        now = self.clock()
        with self._lock:
            cached = self._answers.get(sender)
            if cached is not None and now - cached[1] < (self.ttl_s if cached[0] else self.negative_ttl_s):
                self._answers.move_to_end(sender)
                return cached[0]
        try:
            verify_key_of(self.store, sender, self.kind)
            accepted = True
        except RefusedMessage:
            accepted = False
        except StateUnavailable as e:  # not cached: the next frame asks again
            raise RefusedMessage(Refusal.UNAVAILABLE, f"cannot tell whether {sender} is enrolled: {e}") from e
        with self._lock:
            self._answers[sender] = (accepted, now)
            self._answers.move_to_end(sender)
            if len(self._answers) > self.max_entries:
                self._answers.popitem(last=False)
        return accepted
