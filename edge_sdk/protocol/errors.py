"""Typed refusals: every message fedaigc does not accept is refused for a named reason.

A refusal is never an unhandled exception and never silent: the receiver raises
``RefusedMessage``, and whoever catches it records it in a ``RefusalCounter`` that logs
the reason and keeps a per-reason count for ``fedaigc status`` and the metrics endpoint.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from enum import Enum

log = logging.getLogger("fedaigc.refusals")


class Refusal(str, Enum):
    MALFORMED = "malformed"            # bytes that do not parse as what they claim to be
    OVERSIZED = "oversized"            # larger than the configured limit
    WRONG_VERSION = "wrong_version"    # protocol version this side does not speak
    WRONG_TYPE = "wrong_type"          # a message type not expected on this topic or in this state
    UNKNOWN_SENDER = "unknown_sender"  # sender id with no enrolled key
    REVOKED = "revoked"                # sender whose enrolment was revoked
    BAD_SIGNATURE = "bad_signature"    # Ed25519 signature does not verify
    TAMPERED = "tampered"              # ciphertext fails authentication
    REPLAYED = "replayed"              # nonce already seen from this sender (also QoS-1 duplicates)
    STALE_TIMESTAMP = "stale_timestamp"  # outside the accepted clock window
    STALE_ROUND = "stale_round"        # for a round that is not open
    NON_FINITE = "non_finite"          # NaN or Inf in a tensor
    BAD_TENSORS = "bad_tensors"        # wrong tensor names, shapes or dtypes
    BAD_TOKEN = "bad_token"            # enrolment token unknown, revoked, another device's or already used
    UNTRUSTED_KEY = "untrusted_key"    # aggregator keys neither pinned nor handed over from the pinned ones
    CHECKSUM = "checksum"              # reassembled chunks do not match their checksum
    INCOMPLETE = "incomplete"          # a chunked message whose remaining chunks stopped coming (expired)
    POISONED = "poisoned"              # update rejected by the robust aggregation screen
    QUARANTINED = "quarantined"        # accepted update set aside because aggregating it failed
    UNAVAILABLE = "unavailable"        # receiver cannot take it now (e.g. state store unwritable)
    MODEL_MISMATCH = "model_mismatch"  # the sender runs another base model than the fleet
    RANK_ABOVE_FLEET = "rank_above_fleet"  # the sender would train a LoRA rank above the fleet's maximum
    RETAINED_ALTERED = "retained_altered"  # someone else replaced or cleared a retained message this side publishes
    BUSY = "busy"                      # over the receiver's queue bound or the sender's rate: retry later


class RefusedMessage(Exception):
    """A message was refused; ``reason`` is machine-readable, ``detail`` is for people."""

    def __init__(self, reason: Refusal, detail: str = "") -> None:
        self.reason = Refusal(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)


class RequestRefused(RefusedMessage):
    """The other side refused a request of ours and answered why (e.g. a generation request).

    Its reply carries ``str(RefusedMessage)``, ``"reason: detail"``; ``reason`` says what the caller can
    do (``BUSY``: the same request later), ``detail`` is the other side's sentence for people.
    """

    @classmethod
    def from_reply(cls, text: str) -> "RequestRefused":
        reason, _, detail = text.partition(": ")
        try:
            return cls(Refusal(reason), detail)
        except ValueError:  # a peer speaking reasons this side does not know
            return cls(Refusal.MALFORMED, f"unrecognised refusal {text[:200]!r}")


class RefusalCounter:
    """Thread-safe per-reason counts, with one log line per refusal."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._log = logger

    def record(self, error: RefusedMessage, context: str = "") -> None:
        with self._lock:
            self._counts[error.reason.value] += 1
        self._log.warning("refused %s%s: %s", error.reason.value, f" ({context})" if context else "", error.detail)

    def restore(self, counts: dict[str, int]) -> None:
        """Continue from counts kept before a restart (added, so refusals meanwhile are not lost)."""
        with self._lock:
            self._counts.update({str(k): int(v) for k, v in counts.items()})

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def __getitem__(self, reason: Refusal | str) -> int:
        with self._lock:
            return self._counts[Refusal(reason).value]
