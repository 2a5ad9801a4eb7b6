"""The wire envelope every fedaigc message travels in, and the checks that open it.

An envelope is a msgpack array::

    [version, type, sender, round, seq, nonce(16 B), timestamp_ms, payload, signature(64 B)]

The Ed25519 signature covers the msgpack encoding of the first eight fields, so the
header (who, what, which round, when) is bound to the ciphertext it carries. Only the
canonical (shortest) msgpack spelling is accepted: re-encoding a parsed envelope must
give back the received bytes, so no one can re-spell a signed envelope into new bytes. Payload
confidentiality is the caller's: a ``SealedBox`` for task vectors, a ``Box`` for
adapters, plain bytes only for public announcements.

``EnvelopeVerifier`` is the one place a received envelope is judged: parse, version,
sender, signature, clock window, replay. Anything that fails raises ``RefusedMessage``
with a reason; nothing else escapes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import msgpack

from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.identity import Identity, verify_signature
from edge_sdk.protocol.topics import MAX_DEVICE_ID, check_device_id, check_sender

PROTOCOL_VERSION = 1
NONCE_BYTES = 16
SIGNATURE_BYTES = 64
DEFAULT_MAX_ENVELOPE_BYTES = 64 * 1024 * 1024


class MessageType(str, Enum):
    AGGREGATOR_KEYS = "aggregator_keys"    # aggregator -> all (retained): its public keys
    KEY_HANDOVER = "key_handover"          # aggregator -> all (retained): its keys after a rotation, handed over
    ENROL = "enrol"                        # device -> aggregator: public keys + token (sealed)
    ENROL_ACK = "enrol_ack"                # aggregator -> device: accepted or refused
    TASK = "task"                          # device -> aggregator: sealed task vector
    CLUSTER_ASSIGN = "cluster_assign"      # aggregator -> device: your cluster
    ROUND_START = "round_start"            # aggregator -> device: adapter to start from
    UPDATE = "update"                      # device -> aggregator: shared adapter delta
    UPDATE_ACK = "update_ack"              # aggregator -> device: update accepted (or refused)
    GENERATE_REQUEST = "generate_request"  # weak device -> aggregator: sealed encoding + mix
    GENERATE_RESULT = "generate_result"    # aggregator -> device: encrypted images
    STATUS = "status"                      # device -> aggregator: online / version report
    ROLLOUT_MANIFEST = "rollout_manifest"  # aggregator -> devices: signed export manifest
    ROLLOUT_ARTIFACT = "rollout_artifact"  # aggregator -> devices: one chunk frame of an export file
    EDGE_REPORT = "edge_report"            # edge aggregator -> cloud: a round's cluster adapters
    CLOUD_MIX = "cloud_mix"                # cloud -> edge aggregator: its clusters after interaction


@dataclass(frozen=True)
class Envelope:
    version: int
    type: MessageType
    sender: str
    round: int
    seq: int
    nonce: bytes
    timestamp_ms: int
    payload: bytes
    signature: bytes = b""

    def signed_part(self) -> bytes:
        return msgpack.packb(
            [self.version, self.type.value, self.sender, self.round, self.seq, self.nonce,
             self.timestamp_ms, self.payload],
            use_bin_type=True,
        )

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            [self.version, self.type.value, self.sender, self.round, self.seq, self.nonce,
             self.timestamp_ms, self.payload, self.signature],
            use_bin_type=True,
        )


class EnvelopeWriter:
    """Builds signed envelopes for one sender, with a monotonic sequence number."""

    def __init__(self, identity: Identity, sender: str) -> None:
        check_device_id(sender)  # a sender id is a level of its topics
        self.identity = identity
        self.sender = sender
        self._seq = int(time.time() * 1000)  # monotonic across restarts without persisting a counter
        self._lock = threading.Lock()

    def build(self, type: MessageType, payload: bytes, round: int = 0) -> bytes:
        with self._lock:
            self._seq += 1
            seq = self._seq
        env = Envelope(PROTOCOL_VERSION, MessageType(type), self.sender, int(round), seq,
                       os.urandom(NONCE_BYTES), int(time.time() * 1000), bytes(payload))
        signed = Envelope(**{**env.__dict__, "signature": self.identity.sign(env.signed_part())})
        return signed.to_bytes()


def parse_envelope(data: bytes, max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Envelope:
    """Structural decoding only (no signature check); refuses anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RefusedMessage(Refusal.MALFORMED, f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise RefusedMessage(Refusal.OVERSIZED, f"{len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        fields = msgpack.unpackb(bytes(data), raw=False, use_list=True, strict_map_key=True,
                                 max_bin_len=max_bytes, max_str_len=4096, max_array_len=16, max_map_len=0)
    except Exception as e:  # msgpack raises a zoo of types on garbage; all mean the same here
        raise RefusedMessage(Refusal.MALFORMED, f"not a msgpack envelope ({type(e).__name__})") from None
    if not isinstance(fields, list) or len(fields) != 9:
        raise RefusedMessage(Refusal.MALFORMED, "an envelope is a 9-element array")
    version, mtype, sender, rnd, seq, nonce, ts, payload, sig = fields
    if not isinstance(version, int) or isinstance(version, bool):
        raise RefusedMessage(Refusal.MALFORMED, "protocol version is not an integer")
    if version != PROTOCOL_VERSION:
        raise RefusedMessage(Refusal.WRONG_VERSION, f"protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    checks = [
        (isinstance(mtype, str), "message type is not a string"),
        (isinstance(sender, str) and 0 < len(sender) <= MAX_DEVICE_ID, "sender id is not a short string"),
        (_is_uint(rnd), "round is not a non-negative integer"),
        (_is_uint(seq), "sequence is not a non-negative integer"),
        (isinstance(nonce, bytes) and len(nonce) == NONCE_BYTES, "nonce is not 16 bytes"),
        (_is_uint(ts), "timestamp is not a non-negative integer"),
        (isinstance(payload, bytes), "payload is not bytes"),
        (isinstance(sig, bytes) and len(sig) == SIGNATURE_BYTES, "signature is not 64 bytes"),
    ]
    for ok, why in checks:
        if not ok:
            raise RefusedMessage(Refusal.MALFORMED, why)
    try:
        mtype = MessageType(mtype)
    except ValueError:
        raise RefusedMessage(Refusal.WRONG_TYPE, f"unknown message type {mtype[:40]!r}") from None
    env = Envelope(version, mtype, sender, rnd, seq, nonce, ts, payload, sig)
    if env.to_bytes() != bytes(data):
        # msgpack can spell one value several ways (uint64 vs int64, str8 vs fixstr); only the
        # canonical spelling is accepted, so a signed envelope has exactly one valid byte form
        raise RefusedMessage(Refusal.MALFORMED, "envelope is not canonically encoded")
    return env


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


class ReplayGuard:
    """Remembers (sender, nonce) pairs inside the clock window; older messages are stale anyway."""

    def __init__(self, window_ms: int, capacity: int = 1_000_000) -> None:
        self.window_ms = window_ms
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._lock = threading.Lock()

    def check_and_remember(self, sender: str, nonce: bytes, timestamp_ms: int, now_ms: int) -> None:
        with self._lock:
            horizon = now_ms - self.window_ms
            while self._seen and (next(iter(self._seen.values())) < horizon or len(self._seen) >= self.capacity):
                self._seen.popitem(last=False)
            key = (sender, nonce)
            if key in self._seen:
                raise RefusedMessage(Refusal.REPLAYED, f"nonce {nonce.hex()[:12]} from {sender} was already seen")
            self._seen[key] = max(timestamp_ms, now_ms)

    def forget(self, sender: str, nonce: bytes) -> None:
        """The receiver could not keep the message (e.g. its store is unwritable): let a re-send in."""
        with self._lock:
            self._seen.pop((sender, nonce), None)


KeyLookup = Callable[[str], bytes]
"""Returns the sender's Ed25519 verify key, or raises RefusedMessage(UNKNOWN_SENDER / REVOKED)."""


class EnvelopeVerifier:
    """Parse, authenticate and de-duplicate received envelopes (one instance per receiver)."""

    def __init__(self, lookup: KeyLookup, *, window_ms: int = 10 * 60 * 1000,
                 max_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES, clock: Callable[[], float] = time.time) -> None:
        self.lookup = lookup
        self.window_ms = window_ms
        self.max_bytes = max_bytes
        self.clock = clock
        self.replays = ReplayGuard(window_ms)

    def open(self, data: bytes, expect: set[MessageType] | None = None, topic: str | None = None) -> Envelope:
        """Parse and authenticate with the sender's enrolled key. On a per-device ``topic`` the sender must
        be that device, checked first: a copy of a device's envelope on another topic must not spend the
        original's nonce (the original would then be refused as a replay)."""
        env = self.parse(data, expect)
        if topic is not None:
            check_sender(topic, env.sender)
        self.authenticate(env, self.lookup(env.sender))
        return env

    def parse(self, data: bytes, expect: set[MessageType] | None = None) -> Envelope:
        env = parse_envelope(data, self.max_bytes)
        if expect is not None and env.type not in expect:
            raise RefusedMessage(Refusal.WRONG_TYPE, f"{env.type.value} is not accepted here")
        return env

    def authenticate(self, env: Envelope, verify_key: bytes) -> None:
        """Signature, clock window, then replay (in that order: forgeries never touch the nonce cache)."""
        verify_signature(verify_key, env.signed_part(), env.signature)
        now_ms = int(self.clock() * 1000)
        if abs(now_ms - env.timestamp_ms) > self.window_ms:
            raise RefusedMessage(Refusal.STALE_TIMESTAMP, f"timestamp is {abs(now_ms - env.timestamp_ms) / 1000:.0f} s off")
        self.replays.check_and_remember(env.sender, env.nonce, env.timestamp_ms, now_ms)
