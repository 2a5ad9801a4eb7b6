"""Chunking of payloads larger than the broker accepts, with bounded, checksummed reassembly.

A chunk frame is a fixed 60-byte header and a slice of the payload::

    b"FCK1" | message id (16 B) | index (u32) | count (u32) | sha256 of whole payload (32 B) | data

Unchunked payloads are envelopes, msgpack arrays whose first byte is never ``F``, so a
receiver tells the two apart from the first four bytes.

Reassembly runs before anything is authenticated, so it is bounded against senders who start
messages and never finish them:

* Every partial message belongs to a *sender*: the device id its topic ends with (the broker's
  ACL makes the topic prove it). An ``accept`` callback may refuse a sender outright; the
  aggregator reassembles only for enrolled, unrevoked devices.
* A message declares its size with its first frame: ``count`` times that frame's slice (every
  slice but the last has one length, and later frames must agree). It is refused there if it cannot
  be within ``max_message_bytes`` or is above half the ``budget``, and is otherwise reserved.
* When full, the sender who caused it pays. A sender with ``max_per_sender`` messages in flight,
  or half the budget reserved, loses its own least recently active partial to its new one; a
  budget that still cannot take the new message evicts from the heaviest sender (bytes reserved,
  the new message counted with its sender), its least recently active partial first, and refuses
  the newcomer when that heaviest sender is the newcomer with nothing else in flight. As no sender
  holds more than half the budget, a flood from one sender never evicts another sender's message.
* A partial that receives no frame for ``timeout_s`` expires. Slices are written into one anonymous
  ``mmap`` per message, so expiry, eviction and completion hand the memory back to the operating
  system at once (the allocator's free lists would keep it), and pages never sent are never resident.
* Delivered messages are remembered, so a QoS-1 duplicate of one of their chunks is dropped, in
  arrival order for ``timeout_s`` and at most ``max_done`` of them: both maps expire from the
  front, so a frame costs the same after a million messages as after the first.

Every partial lost to eviction or expiry is recorded in ``refusals`` (``oversized``, ``incomplete``).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage

MAGIC = b"FCK1"
_HEADER = struct.Struct("!4s16sII32s")
HEADER_BYTES = _HEADER.size
MAX_CHUNKS = 1 << 16
DEFAULT_TIMEOUT_S = 120.0  # since a message's last frame: well above a slow link's gap between frames


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


@dataclass(frozen=True)
class ChunkHeader:
    msg_id: bytes
    index: int
    count: int
    digest: bytes

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def parse_frame(frame: bytes) -> tuple[ChunkHeader, bytes]:
    """The header and slice of a chunk frame; ``malformed`` for anything ``split_payload`` cannot have made."""
    if len(frame) <= HEADER_BYTES:
        raise RefusedMessage(Refusal.MALFORMED, f"chunk frame of {len(frame)} bytes has no data after its header")
    magic, msg_id, index, count, digest = _HEADER.unpack_from(frame)
    if magic != MAGIC or count == 0 or count > MAX_CHUNKS or index >= count:
        raise RefusedMessage(Refusal.MALFORMED, f"bad chunk header (index {index}, count {count})")
    return ChunkHeader(msg_id, index, count, digest), frame[HEADER_BYTES:]


Key = tuple[str, str, bytes]  # (sender, topic, message id)


@dataclass
class _Partial:
    sender: str
    count: int
    digest: bytes
    reserved: int                  # bytes held against the budget: count x slice once the slice is known
    seen: float                    # when its latest frame arrived
    slice: int | None = None       # length of every slice but the last; None while only the last one came
    buffer: mmap.mmap | None = None
    tail: bytes | None = None      # the last slice, until the slice length is known
    last_len: int = 0
    have: set[int] = field(default_factory=set)

    def free(self) -> None:
        if self.buffer is not None:
            self.buffer.close()
        self.buffer = self.tail = None


class Reassembler:
    """Collects chunk frames per (sender, topic, message id); returns each payload once, when whole."""

    def __init__(self, max_message_bytes: int = 256 * 1024 * 1024, budget: int | None = None,
                 max_per_sender: int = 4, timeout_s: float = DEFAULT_TIMEOUT_S, max_done: int = 4096,
                 accept: Callable[[str], bool] | None = None, refusals: RefusalCounter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``budget``: bytes all partial messages may reserve together (default four times ``max_message_bytes``:
        a sender may hold two).
        ``accept(sender)``: whether that sender's chunks are reassembled at all; it may also raise
        ``RefusedMessage`` (e.g. ``unavailable`` when it cannot tell)."""
        self.max_message_bytes = max_message_bytes
        self.budget = 4 * max_message_bytes if budget is None else budget
        if self.budget < 2:
            raise ValueError(f"the reassembly budget must be at least 2 bytes (a sender holds half), got {self.budget}")
        self.max_per_sender = max_per_sender
        self.timeout_s = timeout_s
        self.max_done = max_done
        self.accept = accept
        self.refusals = refusals if refusals is not None else RefusalCounter()
        self.clock = clock
        self._pending: OrderedDict[Key, _Partial] = OrderedDict()  # least recently active first
        self._by_sender: dict[str, OrderedDict[Key, _Partial]] = {}
        self._sender_bytes: dict[str, int] = {}
        self._reserved = 0
        self._done: OrderedDict[Key, float] = OrderedDict()  # delivered, oldest first
        self._lock = threading.Lock()

    @property
    def max_sender_bytes(self) -> int:
        return self.budget // 2

    def feed(self, sender: str, frame: bytes, topic: str = "") -> bytes | None:
        """The full payload when this frame completes one; ``None`` while incomplete or duplicate."""
        header, data = parse_frame(frame)
        key = (sender, topic, header.msg_id)
        now = self.clock()
        with self._lock:
            self._expire(now)
            if key in self._done:
                return None  # a duplicate of a message already delivered
            partial = self._pending.get(key)
            if partial is None:
                partial = self._admit(key, header, len(data), now)
            elif partial.count != header.count or partial.digest != header.digest:
                raise RefusedMessage(Refusal.MALFORMED, "chunk disagrees with earlier chunks of its message")
            else:
                partial.seen = now
                self._pending.move_to_end(key)
                self._by_sender[sender].move_to_end(key)
            if header.index in partial.have:
                return None
            try:
                self._place(partial, header, data)
            except RefusedMessage:
                self._drop(key)
                raise
            if len(partial.have) < partial.count:
                return None
            size = (partial.count - 1) * partial.slice + partial.last_len
            payload = partial.buffer[:size] if size <= self.max_message_bytes else None
            self._drop(key)
            self._done[key] = now
            if len(self._done) > self.max_done:
                self._done.popitem(last=False)
        if payload is None:
            raise RefusedMessage(Refusal.OVERSIZED, f"chunked message of {size} bytes exceeds "
                                                    f"{self.max_message_bytes} bytes")
        if hashlib.sha256(payload).digest() != header.digest:
            raise RefusedMessage(Refusal.CHECKSUM, f"reassembled {len(payload)} bytes fail their sha256")
        return payload

    def expire(self) -> None:
        """Drop what timed out now, not only when the next frame arrives."""
        with self._lock:
            self._expire(self.clock())

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def reserved(self, sender: str | None = None) -> int:
        """Bytes the partial messages (of ``sender``, or all) hold against the budget; their resident memory
        is at most this."""
        with self._lock:
            return self._reserved if sender is None else self._sender_bytes.get(sender, 0)

    # ------------------------------------------------------------ under the lock
    def _admit(self, key: Key, header: ChunkHeader, length: int, now: float) -> _Partial:
        sender = key[0]
        declared = header.count * length
        self._check_size(sender, header.count, length)
        if declared > self.max_sender_bytes:
            raise RefusedMessage(Refusal.OVERSIZED, f"chunked message of {header.count} x {length} bytes from "
                                                    f"{sender} is over a sender's {self.max_sender_bytes} bytes")
        if self.accept is not None and not self.accept(sender):
            raise RefusedMessage(Refusal.UNKNOWN_SENDER, f"chunks from {sender}, not an enrolled, unrevoked sender")
        self._make_room(sender, declared)
        partial = _Partial(sender, header.count, header.digest, declared, now)
        if not header.last or header.count == 1:
            partial.slice = length
        self._pending[key] = partial
        self._by_sender.setdefault(sender, OrderedDict())[key] = partial
        self._sender_bytes[sender] = self._sender_bytes.get(sender, 0) + declared
        self._reserved += declared
        return partial

    def _check_size(self, sender: str, count: int, slice_len: int) -> None:
        """Refuse a message whose smallest possible size (a one-byte last slice) is over the limit."""
        if (count - 1) * slice_len + 1 > self.max_message_bytes:
            raise RefusedMessage(Refusal.OVERSIZED, f"chunked message of {count} x {slice_len} bytes from "
                                                    f"{sender} is over the {self.max_message_bytes}-byte limit")

    def _make_room(self, sender: str, declared: int) -> None:
        own = self._by_sender.get(sender, {})
        while own and (len(own) >= self.max_per_sender
                       or self._sender_bytes[sender] + declared > self.max_sender_bytes):
            self._evict(next(iter(own)), f"{sender} started another while at its limit "
                                         f"({self.max_per_sender} messages, {self.max_sender_bytes} bytes)")
        while self._reserved + declared > self.budget:
            heaviest = max(self._sender_bytes | {sender: self._sender_bytes.get(sender, 0)},
                           key=lambda s: self._sender_bytes.get(s, 0) + (declared if s == sender else 0))
            if heaviest == sender and not own:
                raise RefusedMessage(Refusal.OVERSIZED, f"reassembly budget of {self.budget} bytes is full and "
                                                        f"{sender}'s message of {declared} bytes is the heaviest")
            self._evict(next(iter(self._by_sender[heaviest])), f"reassembly budget of {self.budget} bytes is full; "
                                                                f"{heaviest} holds the most")

    def _place(self, partial: _Partial, header: ChunkHeader, data: bytes) -> None:
        if not header.last:
            if partial.slice is None:  # the last slice came first: now the message's size is known
                self._resize(partial, len(data))
            elif len(data) != partial.slice:
                raise RefusedMessage(Refusal.MALFORMED, f"chunk of {len(data)} bytes where its message's are "
                                                        f"{partial.slice}")
        elif partial.slice is not None and len(data) > partial.slice:
            raise RefusedMessage(Refusal.MALFORMED, f"last chunk of {len(data)} bytes is longer than the others "
                                                    f"({partial.slice})")
        if header.last:
            partial.last_len = len(data)
        if partial.slice is None:
            partial.tail = data
        else:
            if partial.buffer is None:
                partial.buffer = mmap.mmap(-1, partial.count * partial.slice)
                if partial.tail is not None:
                    self._write(partial, partial.count - 1, partial.tail)
                    partial.tail = None
            self._write(partial, header.index, data)
        partial.have.add(header.index)

    @staticmethod
    def _write(partial: _Partial, index: int, data: bytes) -> None:
        start = index * partial.slice
        partial.buffer[start:start + len(data)] = data

    def _resize(self, partial: _Partial, slice_len: int) -> None:
        """Reserve the size a message declared late (its last slice arrived first), or refuse it."""
        if partial.last_len > slice_len:
            raise RefusedMessage(Refusal.MALFORMED, f"last chunk of {partial.last_len} bytes is longer than the "
                                                    f"others ({slice_len})")
        self._check_size(partial.sender, partial.count, slice_len)
        declared = partial.count * slice_len
        grow, others = declared - partial.reserved, self._sender_bytes[partial.sender] - partial.reserved
        if self._reserved + grow > self.budget or others + declared > self.max_sender_bytes:
            raise RefusedMessage(Refusal.OVERSIZED, f"chunked message of {declared} bytes from {partial.sender} "
                                                    f"does not fit the reassembly budget")
        partial.slice, partial.reserved = slice_len, declared
        self._sender_bytes[partial.sender] += grow
        self._reserved += grow

    def _evict(self, key: Key, why: str) -> None:
        self._drop(key)
        self.refusals.record(RefusedMessage(Refusal.OVERSIZED, f"dropped a partial chunked message: {why}"), key[0])

    def _drop(self, key: Key) -> None:
        partial = self._pending.pop(key)
        own = self._by_sender[partial.sender]
        del own[key]
        self._sender_bytes[partial.sender] -= partial.reserved
        if not own:
            del self._by_sender[partial.sender], self._sender_bytes[partial.sender]
        self._reserved -= partial.reserved
        partial.free()

    def _expire(self, now: float) -> None:
        while self._pending:
            key, partial = next(iter(self._pending.items()))
            if now - partial.seen <= self.timeout_s:
                break
            self._drop(key)
            self.refusals.record(RefusedMessage(Refusal.INCOMPLETE, f"{len(partial.have)} of {partial.count} chunks "
                                                                     f"came, then none for {self.timeout_s:.0f} s"),
                                 key[0])
        while self._done:
            key, at = next(iter(self._done.items()))
            if now - at <= self.timeout_s:
                break
            del self._done[key]
