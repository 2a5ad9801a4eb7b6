import os
import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.protocol.chunking import HEADER_BYTES, Reassembler, is_chunk, split_payload, wire_size
from edge_sdk.protocol.errors import Refusal, RefusedMessage

HEADER = b"FCK1"


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


def first_frames(n: int, size: int, frame: int) -> list[bytes]:
    """The first frame of each of ``n`` messages of ``size`` bytes: partials that never complete."""
    return [split_payload(os.urandom(size), frame)[0] for _ in range(n)]


def test_a_message_declared_over_the_limit_is_refused_at_its_first_frame():
    r = Reassembler(max_message_bytes=2000)
    with pytest.raises(RefusedMessage) as e:
        r.feed("t", split_payload(os.urandom(5000), 500)[0])
    assert e.value.reason == Refusal.OVERSIZED
    assert r.reserved() == 0


def test_a_message_of_exactly_the_limit_is_accepted():
    payload = os.urandom(2000)  # 7 slices of 290 bytes reserve 2030, but the message itself fits
    r = Reassembler(max_message_bytes=2000)
    assert [o for f in split_payload(payload, HEADER_BYTES + 290) if (o := r.feed("t", f)) is not None] == [payload]


def test_a_sender_over_its_in_flight_limit_loses_its_own_least_recently_active_partial():
    r = Reassembler(max_per_sender=2)
    messages = [split_payload(os.urandom(3000), 500) for _ in range(3)]
    for frames in messages:
        r.feed("a", frames[0])
    assert r.pending() == 2 and r.refusals["oversized"] == 1
    for frames in messages[1:]:
        assert [o for f in frames[1:] if (o := r.feed("a", f)) is not None] != []


def test_a_flood_from_one_sender_never_evicts_another_senders_message():
    rnd = random.Random(0)
    r = Reassembler(max_message_bytes=4000, budget=8000)
    payload = os.urandom(3900)
    honest = split_payload(payload, 360)
    flood = [f for _ in range(len(honest)) for f in first_frames(3, 3900, 360)]
    got = []
    for f in honest:
        for g in rnd.sample(flood, 3):
            r.feed("attacker", g)
        if (out := r.feed("device", f)) is not None:
            got.append(out)
    assert got == [payload]
    assert r.refusals["oversized"] > 0  # the attacker lost its own partials
    assert r.reserved() <= r.budget


def test_a_full_budget_evicts_from_the_heaviest_sender():
    r = Reassembler(max_message_bytes=3000, budget=6000)
    light = split_payload(os.urandom(1000), 360)  # slices of 300 bytes: reservations of 3000, 1200, 2100
    r.feed("heavy", first_frames(1, 2900, 360)[0])
    r.feed("light", light[0])
    r.feed("third", first_frames(1, 2000, 360)[0])  # 6300 do not fit in 6000: the heaviest pays
    assert r.refusals["oversized"] == 1 and r.pending() == 2
    assert [o for f in light[1:] if (o := r.feed("light", f)) is not None] != []


def test_a_sender_the_accept_callback_refuses_is_asked_once_per_message():
    asked = []

    def accept(sender):
        asked.append(sender)
        return sender == "enrolled"

    r = Reassembler(accept=accept)
    with pytest.raises(RefusedMessage) as e:
        r.feed("stranger", split_payload(os.urandom(3000), 500)[0])
    assert e.value.reason == Refusal.UNKNOWN_SENDER and r.pending() == 0
    payload = os.urandom(3000)
    assert [o for f in split_payload(payload, 500) if (o := r.feed("enrolled", f)) is not None] == [payload]
    assert asked == ["stranger", "enrolled"]


def test_partials_with_no_new_chunk_expire_and_release_their_reservation():
    now = [0.0]
    r = Reassembler(timeout_s=10, clock=lambda: now[0])
    for f in first_frames(3, 3000, 500):
        r.feed("a", f)
    now[0] = 5.0
    kept = split_payload(os.urandom(3000), 500)
    r.feed("b", kept[0])
    now[0] = 11.0
    r.expire()
    assert r.pending() == 1 and r.reserved() == 7 * (500 - HEADER_BYTES)  # what b reserved, only
    assert r.refusals["incomplete"] == 3


def test_the_delivered_message_bookkeeping_is_bounded():
    r = Reassembler(max_done=500)
    frames = [split_payload(b"FCK1" + i.to_bytes(4, "big"), 1024)[0] for i in range(20_000)]
    for f in frames[:1000]:
        r.feed("a", f)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for f in frames[1000:]:
        r.feed("a", f)
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert grown < 19_000 * 50  # remembering all 19,000 more would cost hundreds of bytes each


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3), st.integers(0, 4), st.integers(1, 5),
                          st.integers(1, 400)), max_size=60))
def test_no_sequence_of_frames_holds_more_than_the_budget(frames):
    r = Reassembler(max_message_bytes=1500, budget=2400, max_per_sender=2)
    for sender, msg, index, count, length in frames:
        frame = HEADER + bytes([msg]) * 16 + index.to_bytes(4, "big") + count.to_bytes(4, "big") + b"\x00" * 32
        try:
            r.feed(sender, frame + b"x" * length)
        except RefusedMessage:
            pass
        assert r.reserved() <= r.budget
        assert all(r.reserved(s) <= r.max_sender_bytes for s in "abc")


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
