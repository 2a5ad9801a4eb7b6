import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.protocol.chunking import HEADER_BYTES, Reassembler, is_chunk, split_payload, wire_size
from edge_sdk.protocol.errors import Refusal, RefusedMessage


def test_small_payload_is_not_chunked():
    assert split_payload(b"\x95hello", 1024) == [b"\x95hello"]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=5000), st.integers(HEADER_BYTES + 1, 700), st.randoms())
def test_any_order_and_duplicates_reassemble_exactly_once(payload, frame, rnd):
    frames = split_payload(payload, frame)
    if len(frames) == 1 and not is_chunk(frames[0]):
        return
    shuffled = frames + rnd.sample(frames, k=min(3, len(frames)))
    rnd.shuffle(shuffled)
    r = Reassembler()
    outputs = [out for f in shuffled if (out := r.feed("t", f)) is not None]
    assert outputs == [payload]


def test_corrupted_chunk_fails_the_checksum():
    frames = split_payload(os.urandom(3000), 1000)
    bad = bytearray(frames[1])
    bad[-1] ^= 0xFF
    frames[1] = bytes(bad)
    r = Reassembler()
    with pytest.raises(RefusedMessage) as e:
        for f in frames:
            r.feed("t", f)
    assert e.value.reason == Refusal.CHECKSUM


def test_reassembly_is_bounded_in_size_and_count():
    with pytest.raises(RefusedMessage) as e:
        r = Reassembler(max_message_bytes=2000)
        for f in split_payload(os.urandom(5000), 500):
            r.feed("t", f)
    assert e.value.reason == Refusal.OVERSIZED
    r = Reassembler(max_pending=2)
    r.feed("t", split_payload(os.urandom(3000), 500)[0])
    r.feed("t", split_payload(os.urandom(3000), 500)[0])
    with pytest.raises(RefusedMessage):
        r.feed("t", split_payload(os.urandom(3000), 500)[0])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_frames_are_refused_with_a_reason(data):
    try:
        Reassembler().feed("t", b"FCK1" + data)
    except RefusedMessage:
        pass


def test_twenty_megabytes_split_and_rejoin():
    payload = random.Random(0).randbytes(20 * 1024 * 1024)
    r = Reassembler()
    out = [o for f in split_payload(payload, 256 * 1024) if (o := r.feed("t", f)) is not None]
    assert out == [payload]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 20_000), frame=st.integers(HEADER_BYTES + 1, 4096))
def test_wire_size_is_what_the_frames_weigh(n, frame):
    payload = b"\x01" * n
    assert wire_size(n, frame) == sum(len(f) for f in split_payload(payload, frame))
