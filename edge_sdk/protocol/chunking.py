"""Chunking of payloads larger than the broker accepts, with checksummed reassembly.

A chunk frame is a fixed 60-byte header and a slice of the payload::

    b"FCK1" | message id (16 B) | index (u32) | count (u32) | sha256 of whole payload (32 B) | data

Unchunked payloads are envelopes, msgpack arrays whose first byte is never ``F``, so a
receiver tells the two apart from the first four bytes. Reassembly is bounded (total
size, number of partial messages, age) so a flood of first chunks cannot exhaust memory;
duplicated chunks are harmless, and a payload whose checksum fails is refused.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass, field

from edge_sdk.protocol.errors import Refusal, RefusedMessage

MAGIC = b"FCK1"
_HEADER = struct.Struct("!4s16sII32s")
HEADER_BYTES = _HEADER.size
MAX_CHUNKS = 1 << 16


def is_chunk(frame: bytes) -> bool:
    return frame[:4] == MAGIC


def split_payload(payload: bytes, max_frame: int) -> list[bytes]:
    """Frames of at most ``max_frame`` bytes (header included); one frame if it already fits."""
    if max_frame <= HEADER_BYTES:
        raise ValueError(f"max_frame must exceed the {HEADER_BYTES}-byte chunk header")
    if len(payload) <= max_frame and not is_chunk(payload):
        return [payload]
    size = max_frame - HEADER_BYTES
    count = max(1, -(-len(payload) // size))
    if count > MAX_CHUNKS:
        raise ValueError(f"payload of {len(payload)} bytes needs {count} chunks, more than {MAX_CHUNKS}")
    msg_id = os.urandom(16)
    digest = hashlib.sha256(payload).digest()
    return [_HEADER.pack(MAGIC, msg_id, i, count, digest) + payload[i * size:(i + 1) * size] for i in range(count)]


def wire_size(payload_len: int, max_frame: int) -> int:
    """Bytes ``split_payload`` puts on the wire for a payload of this length (chunk headers included)."""
    if payload_len <= max_frame:
        return payload_len
    return payload_len + HEADER_BYTES * -(-payload_len // (max_frame - HEADER_BYTES))


@dataclass
class _Partial:
    count: int
    digest: bytes
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects chunk frames per (source, message id) and returns each payload once, when whole."""

    def __init__(self, max_message_bytes: int = 256 * 1024 * 1024, max_pending: int = 256,
                 timeout_s: float = 600.0, clock=time.monotonic) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.clock = clock
        self._pending: dict[tuple[str, bytes], _Partial] = {}
        self._done: dict[tuple[str, bytes], float] = {}
        self._lock = threading.Lock()

    def feed(self, source: str, frame: bytes) -> bytes | None:
        """The full payload when this frame completes one; ``None`` while incomplete or duplicate."""
        if len(frame) < HEADER_BYTES:
            raise RefusedMessage(Refusal.MALFORMED, "chunk frame shorter than its header")
        magic, msg_id, index, count, digest = _HEADER.unpack_from(frame)
        if magic != MAGIC or count == 0 or count > MAX_CHUNKS or index >= count:
            raise RefusedMessage(Refusal.MALFORMED, f"bad chunk header (index {index}, count {count})")
        data = frame[HEADER_BYTES:]
        key = (source, msg_id)
        now = self.clock()
        with self._lock:
            self._expire(now)
            if key in self._done:
                return None  # a duplicate of a message already delivered
            partial = self._pending.get(key)
            if partial is None:
                if len(self._pending) >= self.max_pending:
                    raise RefusedMessage(Refusal.OVERSIZED, f"more than {self.max_pending} chunked messages in flight")
                partial = self._pending[key] = _Partial(count, digest, now)
            if partial.count != count or partial.digest != digest:
                raise RefusedMessage(Refusal.MALFORMED, "chunk disagrees with earlier chunks of its message")
            if index in partial.parts:
                return None
            partial.size += len(data)
            if partial.size > self.max_message_bytes:
                del self._pending[key]
                raise RefusedMessage(Refusal.OVERSIZED, f"chunked message exceeds {self.max_message_bytes} bytes")
            partial.parts[index] = data
            if len(partial.parts) < count:
                return None
            del self._pending[key]
            payload = b"".join(partial.parts[i] for i in range(count))
            if hashlib.sha256(payload).digest() != digest:
                raise RefusedMessage(Refusal.CHECKSUM, f"reassembled {len(payload)} bytes fail their sha256")
            self._done[key] = now
            return payload

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if now - p.started > self.timeout_s]:
            del self._pending[key]
        for key in [k for k, t in self._done.items() if now - t > self.timeout_s]:
            del self._done[key]
