import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_sdk.protocol.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    EnvelopeVerifier,
    EnvelopeWriter,
    MessageType,
    parse_envelope,
)
from edge_sdk.protocol.errors import Refusal, RefusalCounter, RefusedMessage
from edge_sdk.protocol.identity import Identity

ALICE = Identity.generate()
MALLORY = Identity.generate()


def verifier(clock=time.time, max_bytes=1 << 20):
    keys = {"alice": ALICE.public.verify_key}

    def lookup(sender):
        if sender == "revoked-bob":
            raise RefusedMessage(Refusal.REVOKED, "bob was revoked")
        if sender not in keys:
            raise RefusedMessage(Refusal.UNKNOWN_SENDER, sender)
        return keys[sender]

    return EnvelopeVerifier(lookup, clock=clock, max_bytes=max_bytes)


def refusal_of(fn) -> Refusal:
    with pytest.raises(RefusedMessage) as e:
        fn()
    return e.value.reason


@pytest.mark.parametrize("mtype", list(MessageType))
def test_every_message_type_round_trips(mtype):
    data = EnvelopeWriter(ALICE, "alice").build(mtype, b"payload-bytes", round=7)
    env = verifier().open(data)
    assert (env.type, env.sender, env.round, env.payload) == (mtype, "alice", 7, b"payload-bytes")


def test_sequence_numbers_increase():
    w = EnvelopeWriter(ALICE, "alice")
    seqs = [parse_envelope(w.build(MessageType.TASK, b"")).seq for _ in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


def test_unknown_sender_is_refused():
    data = EnvelopeWriter(MALLORY, "mallory").build(MessageType.TASK, b"x")
    assert refusal_of(lambda: verifier().open(data)) == Refusal.UNKNOWN_SENDER


def test_revoked_sender_is_refused():
    data = EnvelopeWriter(ALICE, "revoked-bob").build(MessageType.TASK, b"x")
    assert refusal_of(lambda: verifier().open(data)) == Refusal.REVOKED


def test_forged_signature_is_refused():
    data = EnvelopeWriter(MALLORY, "alice").build(MessageType.TASK, b"x")
    assert refusal_of(lambda: verifier().open(data)) == Refusal.BAD_SIGNATURE


def test_tampered_header_breaks_the_signature():
    env = parse_envelope(EnvelopeWriter(ALICE, "alice").build(MessageType.UPDATE, b"x", round=3))
    forged = Envelope(**{**env.__dict__, "round": 4}).to_bytes()
    assert refusal_of(lambda: verifier().open(forged)) == Refusal.BAD_SIGNATURE


def test_replayed_envelope_is_refused_once_seen():
    v = verifier()
    data = EnvelopeWriter(ALICE, "alice").build(MessageType.TASK, b"x")
    v.open(data)
    assert refusal_of(lambda: v.open(data)) == Refusal.REPLAYED


def test_old_timestamp_is_refused():
    data = EnvelopeWriter(ALICE, "alice").build(MessageType.TASK, b"x")
    late = verifier(clock=lambda: time.time() + 3600)
    assert refusal_of(lambda: late.open(data)) == Refusal.STALE_TIMESTAMP


def test_wrong_protocol_version_is_refused():
    env = parse_envelope(EnvelopeWriter(ALICE, "alice").build(MessageType.TASK, b"x"))
    fields = [PROTOCOL_VERSION + 1, env.type.value, env.sender, env.round, env.seq, env.nonce, env.timestamp_ms,
              env.payload, env.signature]
    assert refusal_of(lambda: verifier().open(msgpack.packb(fields))) == Refusal.WRONG_VERSION


def test_oversized_envelope_is_refused():
    data = EnvelopeWriter(ALICE, "alice").build(MessageType.UPDATE, b"x" * 5000)
    assert refusal_of(lambda: verifier(max_bytes=1000).open(data)) == Refusal.OVERSIZED


def test_unexpected_type_is_refused():
    data = EnvelopeWriter(ALICE, "alice").build(MessageType.TASK, b"x")
    assert refusal_of(lambda: verifier().open(data, {MessageType.UPDATE})) == Refusal.WRONG_TYPE


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"not msgpack at all", msgpack.packb([1, 2, 3]),
                                     msgpack.packb({"a": 1}), msgpack.packb([1] * 9)])
def test_malformed_bytes_are_refused(garbage):
    assert refusal_of(lambda: verifier().open(garbage)) in (Refusal.MALFORMED, Refusal.WRONG_VERSION)


def test_refusal_counter_counts_per_reason():
    counter = RefusalCounter()
    counter.record(RefusedMessage(Refusal.REPLAYED, "x"))
    counter.record(RefusedMessage(Refusal.REPLAYED, "y"))
    counter.record(RefusedMessage(Refusal.MALFORMED, "z"))
    assert counter.counts() == {"replayed": 2, "malformed": 1} and counter.total() == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_ever_produce_typed_refusals(data):
    try:
        verifier().open(data)
    except RefusedMessage:
        pass


VALID = EnvelopeWriter(ALICE, "alice").build(MessageType.UPDATE, b"some payload " * 4, round=2)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_mutated_envelopes_are_refused_or_identical(mutations, cut):
    data = bytearray(VALID)
    for pos, value in mutations:
        data[pos] = value
    data = bytes(data[:cut]) if cut < len(VALID) else bytes(data)
    try:
        verifier().open(data)
    except RefusedMessage:
        return
    assert data == VALID  # the only way through is to be the untouched original


def test_a_re_spelled_but_equal_envelope_is_refused():
    data = EnvelopeWriter(ALICE, "alice").build(MessageType.TASK, b"x")
    seq_marker = data.index(b"\xcf")  # the 64-bit sequence number is spelled as uint64 ...
    respelled = data[:seq_marker] + b"\xd3" + data[seq_marker + 1:]  # ... int64 means the same value
    assert msgpack.unpackb(respelled) == msgpack.unpackb(data)
    assert refusal_of(lambda: verifier().open(respelled)) == Refusal.MALFORMED
