"""Re-sending an update the aggregator has not acknowledged, on a jittered exponential backoff.

QoS 1 covers one hop: a PUBACK says the broker has the update, not that the aggregator committed
it. A broker that drops messages for a subscriber that falls behind, or a worker killed between
taking a message and committing it, loses the update on the second hop; the aggregator's
``UPDATE_ACK`` (sent only after the commit) is the end-to-end receipt. Without it the device
re-sends ``first_s`` after publishing, then after ``factor`` times as long, up to ``max_s`` apart,
each wait shortened by a random share up to ``jitter`` so a fleet that sent together does not
re-send together. It stops at an ack (accepted, duplicate or refused), after ``max_attempts``,
or when the next attempt would come within ``deadline_margin_s`` of the round's deadline: from
then on the aggregator's re-invitation at the deadline asks for the update again.

Each attempt is a fresh envelope (new nonce and timestamp) around the same sealed update, so an
attempt that crosses a late original is stored once and acknowledged ``duplicate``, never
refused as a replay. Attempts that find the original merely queued cost the aggregator a
duplicate each: ``first_s`` should exceed the time it needs to take a round's burst.

One ``Resender`` thread serves any number of devices (a load generator runs hundreds per process).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

log = logging.getLogger("fedaigc.retry")


@dataclass(frozen=True)
class RetryPolicy:
    """When an unacknowledged update is sent again (``MqttConfig.update_retry``)."""

    first_s: float = 20.0            # the first re-send, this long after the update was published
    factor: float = 2.0              # each wait this many times the previous one ...
    max_s: float = 120.0             # ... and never longer than this
    jitter: float = 0.5              # each wait shortened by a uniform random share in [0, jitter)
    max_attempts: int = 4            # re-sends per round (0: only the aggregator's re-invitation re-sends)
    deadline_margin_s: float = 5.0   # no attempt this close to the round's deadline

    def __post_init__(self) -> None:
        if not (self.first_s > 0 and self.factor >= 1 and self.max_s >= self.first_s and 0 <= self.jitter < 1
                and self.deadline_margin_s >= 0):
            raise ValueError(f"a retry policy needs first_s > 0, factor >= 1, max_s >= first_s, 0 <= jitter < 1 "
                             f"and deadline_margin_s >= 0, got {self}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 0:
            raise ValueError(f"max_attempts must be an integer >= 0, got {self.max_attempts!r}")

    @classmethod
    def of(cls, value: "RetryPolicy | Mapping") -> "RetryPolicy":
        """A policy, or one from a table of its fields (a TOML ``[update_retry]``)."""
        return value if isinstance(value, RetryPolicy) else cls(**value)

    def wait(self, attempt: int, rng: random.Random) -> float:
        """Seconds before re-send number ``attempt`` (0: the first), counted from the previous send."""
        return min(self.max_s, self.first_s * self.factor ** attempt) * (1 - self.jitter * rng.random())


@dataclass
class _Pending:
    send: Callable[[], None]
    deadline: float | None
    rng: random.Random
    attempt: int = 0
    generation: int = 0


class Resender:
    """Calls ``send`` again on ``policy``'s schedule for every tracked key until it is acknowledged."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.clock = clock  # wall clock: round deadlines are the aggregator's time.time()
        self.retries = 0    # re-sends made, all keys
        self._pending: dict[Hashable, _Pending] = {}
        self._due: list[tuple[float, int, Hashable, int]] = []  # (when, tie-break, key, generation)
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def track(self, key: Hashable, send: Callable[[], None], deadline: float | None = None,
              rng: random.Random | None = None) -> None:
        """``send`` has just published ``key``'s update: schedule its re-sends (replacing any earlier
        schedule for ``key``, e.g. after a re-invitation with a later deadline). ``rng`` draws the
        jitter (seed it per device so a fleet decorrelates and a test repeats)."""
        if self.policy.max_attempts == 0:
            return
        with self._cond:
            if self._closed:
                return
            # a generation no earlier schedule of any key had: their queued attempts no longer match
            entry = _Pending(send, deadline, rng or random.Random(), generation=next(self._order))
            self._pending[key] = entry
            self._schedule(key, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedaigc-resender", daemon=True)
                self._thread.start()
            self._cond.notify()

    def acknowledged(self, key: Hashable) -> bool:
        """The aggregator answered ``key``'s update: no more re-sends. False if none were pending."""
        with self._cond:
            return self._pending.pop(key, None) is not None

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(5)

    def _schedule(self, key: Hashable, entry: _Pending) -> None:
        """Queue ``entry``'s next attempt, or drop it when attempts are spent or the deadline is near."""
        when = self.clock() + self.policy.wait(entry.attempt, entry.rng)
        if entry.attempt >= self.policy.max_attempts or (
                entry.deadline is not None and when > entry.deadline - self.policy.deadline_margin_s):
            self._pending.pop(key, None)
            return
        heapq.heappush(self._due, (when, next(self._order), key, entry.generation))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._due and self._due[0][0] <= self.clock():
                        break
                    self._cond.wait(None if not self._due else max(0.0, self._due[0][0] - self.clock()))
                if self._closed:
                    return
                _, _, key, generation = heapq.heappop(self._due)
                entry = self._pending.get(key)
                if entry is None or entry.generation != generation:
                    continue  # acknowledged, or rescheduled since
                entry.attempt += 1
                self.retries += 1
            try:
                entry.send()
            except Exception:  # a broken link: paho queues QoS-1 publishes, so this is a bug, not an outage
                log.exception("re-sending %s failed", key)
            with self._cond:
                if self._pending.get(key) is entry:
                    self._schedule(key, entry)
