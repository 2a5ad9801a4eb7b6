"""Per-device token buckets: how much work one authenticated device may ask for per minute.

A device's bucket fills at ``per_minute`` units and holds at most ``burst``, so an idle device can
ask for a burst at once and a flooding one gets ``per_minute`` over any minute, never more. Buckets
are kept only for senders that authenticated, so there are at most as many as enrolled devices.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBuckets:
    def __init__(self, per_minute: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not per_minute > 0 or not burst >= 1:
            raise ValueError(f"a rate needs per_minute > 0 and burst >= 1, got {per_minute} and {burst}")
        self.per_second, self.burst, self.clock = per_minute / 60.0, float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, when counted)
        self._lock = threading.Lock()

    def _tokens(self, device: str, now: float) -> float:
        tokens, then = self._buckets.get(device, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.per_second)

    def take(self, device: str, n: float) -> bool:
        """Spend ``n`` of ``device``'s tokens if it has them; False (nothing spent) if not."""
        with self._lock:
            now = self.clock()
            tokens = self._tokens(device, now)
            if tokens < n:
                return False
            self._buckets[device] = (tokens - n, now)
            return True
