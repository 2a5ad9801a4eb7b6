"""Devices re-send an unacknowledged update on a jittered exponential backoff, before the round's deadline
(issue 20), and the aggregator takes a re-send as a duplicate, never as a replay.

The schedule's maths on a seeded generator; the re-sends against the real daemon on the real broker.
An update the broker dropped is, from the device's side, a publish that never reached the aggregator:
here that publish is simply not made, and the first re-send is what arrives.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from aggregator.simulation.lite import LiteDevice
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.retry import Resender, RetryPolicy
from edge_sdk.transport import MqttConfig
from tests.polling import wait_until
from tests.test_service import make_service, small_delta

FAST = RetryPolicy(first_s=0.05, factor=2.0, max_s=0.2, jitter=0.5, max_attempts=3, deadline_margin_s=0.0)


# ---------------------------------------------------------------- the schedule
def test_waits_double_up_to_the_cap_each_shortened_by_at_most_the_jitter_share():
    policy = RetryPolicy(first_s=10, factor=2, max_s=60, jitter=0.5)
    rng = random.Random(7)
    waits = [policy.wait(k, rng) for k in range(6)]
    caps = [10, 20, 40, 60, 60, 60]
    assert all(cap * 0.5 < w <= cap for w, cap in zip(waits, caps))


def test_the_jitter_is_seeded_so_a_device_repeats_itself_and_two_devices_differ():
    policy = RetryPolicy()
    draw = lambda seed: [policy.wait(k, random.Random(seed)) for k in range(4)]  # noqa: E731
    assert draw("dev-a/0") == draw("dev-a/0")
    assert draw("dev-a/0") != draw("dev-b/0")


def test_a_policy_that_cannot_back_off_is_refused():
    with pytest.raises(ValueError, match="factor >= 1"):
        RetryPolicy(factor=0.5)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=-1)


def test_the_mqtt_config_takes_the_policy_as_a_table():
    config = MqttConfig(update_retry={"first_s": 30, "max_attempts": 2})
    assert config.update_retry == RetryPolicy(first_s=30, max_attempts=2)


def test_no_resend_is_scheduled_within_the_margin_of_the_deadline():
    resender = Resender(RetryPolicy(first_s=10, jitter=0.0, deadline_margin_s=5))
    resender.track("round-1", lambda: None, deadline=time.time() + 12)  # in 10 s: inside the 5 s margin
    assert resender.pending() == 0
    resender.close()


def test_resends_stop_after_max_attempts_without_an_ack():
    sent = []
    resender = Resender(FAST)
    resender.track("round-1", lambda: sent.append(1))
    wait_until(lambda: resender.pending() == 0, 10, "the attempts spent")
    assert len(sent) == resender.retries == FAST.max_attempts
    resender.close()


# ---------------------------------------------------------------- against the daemon
@pytest.fixture
def one_device(tmp_path, mqtt_url):
    """A daemon with two lite devices in round 1, of which the first speaks: the round stays open (the
    second never reports) and its deadline is far away (no re-invitation can happen)."""
    service = make_service(tmp_path, mqtt_url, expected_devices=2, round_timeout_s=600)
    devices = [LiteDevice(mqtt_url).start() for _ in range(2)]
    v = np.random.default_rng(0).normal(size=384)
    for d in devices:
        d.join(v)
    start = devices[0].round_start()
    resender = Resender(FAST)
    yield service, devices[0], start, resender
    resender.close()
    for d in devices:
        d.stop()
    service.stop()


def test_an_update_that_never_reached_the_aggregator_arrives_by_a_resend_before_the_deadline(one_device):
    service, device, start, resender = one_device
    sealed = device.seal_update(start, small_delta(service))
    device.resender = resender
    resender.track((device.id, start.round), lambda: device.transport.publish(  # the first publish was "dropped"
        device.topics.update(device.id), device.writer.build(MessageType.UPDATE, sealed, start.round)), start.deadline)
    wait_until(lambda: device.acks(), 30, "an ack")
    assert device.acks()[0].accepted
    assert resender.retries >= 1 and resender.pending() == 0  # acknowledged: no more re-sends
    assert [u.device_id for u in service.store.updates(1)] == [device.id]
    assert len(device.wait_for(MessageType.ROUND_START)) == 1  # no re-invitation was needed


def test_a_resend_crossing_the_ack_is_acknowledged_duplicate_not_refused_as_a_replay(one_device):
    service, device, start, _ = one_device
    sealed = device.seal_update(start, small_delta(service))
    device.transport.wait_published(device.publish_update(start.round, sealed))
    wait_until(lambda: len(device.acks()) == 1, 30, "the first ack")
    device.transport.wait_published(device.publish_update(start.round, sealed))  # what a re-send publishes
    wait_until(lambda: len(device.acks()) == 2, 30, "the second ack")
    assert [(a.accepted, a.reason) for a in device.acks()] == [(True, ""), (True, "duplicate")]
    assert service.refusals["replayed"] == 0
    assert service.telemetry.duplicate_updates == 1
    assert len(service.store.updates(1)) == 1


def test_a_refused_update_is_not_resent(one_device):
    service, device, start, resender = one_device
    sealed = device.seal_update(start, small_delta(service))
    device.publish_update(7, sealed, resender)  # a round that is not open: refused stale_round
    wait_until(lambda: device.acks(), 30, "the refusal")
    assert not device.acks()[0].accepted
    assert resender.pending() == 0
    assert service.refusals["stale_round"] >= 1


def test_a_session_resends_while_the_aggregator_is_busy_and_each_resend_is_a_counted_duplicate(tmp_path, mqtt_url):
    """``FederatedSession`` end to end: its update waits in a busy aggregator's inbox (the handler thread
    held by a job), so no ack can come; the session re-sends its attempts, then the aggregator takes the
    original and acknowledges every re-send ``duplicate``. Gates hold the session's worker (so the aggregator
    is busy before the update arrives) and the aggregator's handler thread; nothing else is stubbed."""
    import threading
    import uuid

    import torch

    from aggregator.simulation.lite import DEMO_TOKEN
    from edge_sdk import DeviceConfig, EdgeClient, FederatedSession, LocalData

    prefix = f"rty{uuid.uuid4().hex[:8]}"
    service = make_service(tmp_path, mqtt_url, mqtt_topic_prefix=prefix, expected_devices=2, rounds=1,
                           round_timeout_s=600, local_steps=1, interaction=False, clustering="single")
    lite = LiteDevice(mqtt_url, topic_prefix=prefix).start()
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "device", device_id=f"dev-{prefix}", profile="simulator",
                                     enrolment_token=DEMO_TOKEN,
                                     aggregator_fingerprint=service.identity.public.fingerprint))
    policy = RetryPolicy(first_s=0.01, factor=1.0, max_s=0.01, jitter=0.0, max_attempts=3, deadline_margin_s=0.0)
    session = FederatedSession(client, LocalData(torch.rand(4, 1, 16, 16), ["a chunky 7"] * 4),
                               MqttConfig(url=mqtt_url, topic_prefix=prefix, update_retry=policy))
    session_gate, aggregator_gate = threading.Event(), threading.Event()
    try:
        session.start()
        wait_until(lambda: service.store.task_count() == 1, 60, "the session's task vector")
        session._work.put(session_gate.wait)  # its round start will queue behind this
        lite.join(np.random.default_rng(0).normal(size=384))
        lite.round_start()  # round 1 is open
        service.inbox.post(aggregator_gate.wait, "test: a busy aggregator")
        session_gate.set()
        wait_until(lambda: session.resender.retries == policy.max_attempts, 60, "every re-send made")
        aggregator_gate.set()
        wait_until(lambda: any(r.accepted for r in session.rounds), 30, "the ack")
        wait_until(lambda: service.telemetry.duplicate_updates == policy.max_attempts, 30, "the duplicates")
        assert service.refusals["replayed"] == 0
        assert [u.device_id for u in service.store.updates(1)] == [client.device_id]
        assert session.resender.pending() == 0
    finally:
        session_gate.set()
        aggregator_gate.set()
        session.stop()
        lite.stop()
        service.stop()
