"""Retained messages an attacker on an ACL-less broker clears or overwrites are put back (issue 17).

On the anonymous broker (each test on a topic prefix of its own), against the real daemon: an
empty retained publish on the keys topic, or a forged announcement there, is undone within a
second or two, counted as ``retained_altered``, and a device that starts afterwards still enrols.
The announcement is also published again every ``announce_interval_s``.
"""

from __future__ import annotations

import time
import uuid

import pytest

from aggregator.retained import RetainedGuard
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice
from edge_sdk.protocol.envelope import EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import RefusalCounter
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import AggregatorKeys, read_signed_keys
from edge_sdk.transport import MqttConfig, MqttTransport
from tests.polling import wait_until
from tests.test_service import make_service


class KeysWatcher:
    """An anonymous client on the keys topic: every announcement the broker delivers, in order."""

    def __init__(self, mqtt_url: str, prefix: str) -> None:
        self.transport = MqttTransport(MqttConfig(url=mqtt_url, topic_prefix=prefix, session_expiry_s=0))
        self.seen: list[bytes] = []
        self.transport.subscribe(self.transport.topics.aggregator_keys, lambda t, p: self.seen.append(p))
        self.transport.connect()
        wait_until(lambda: self.seen, 5, "the retained announcement")

    def publish(self, payload: bytes) -> None:
        t = self.transport
        assert t.wait_published(t.publish(t.topics.aggregator_keys, payload, retain=True), 5)

    def close(self) -> None:
        self.transport.close()


@pytest.fixture
def daemon(tmp_path, mqtt_url):
    prefix = f"ret{uuid.uuid4().hex[:8]}"
    service = make_service(tmp_path, mqtt_url, mqtt_topic_prefix=prefix, expected_devices=None)
    watcher = KeysWatcher(mqtt_url, prefix)
    yield service, watcher
    watcher.close()
    service.stop()
    with MqttTransport(MqttConfig(url=mqtt_url, topic_prefix=prefix)) as t:  # leave the shared broker clean
        t.clear_retained(t.topics.aggregator_keys)


def test_a_cleared_key_announcement_is_published_again_and_a_new_device_enrols(daemon, mqtt_url):
    service, watcher = daemon
    ours = read_signed_keys(watcher.seen[-1])
    watcher.publish(b"")
    wait_until(lambda: watcher.seen[-1] != b"", 2, "the announcement back")
    assert read_signed_keys(watcher.seen[-1]) == ours
    assert service.refusals["retained_altered"] == 1
    device = LiteDevice(mqtt_url, topic_prefix=service.config.mqtt_topic_prefix).start()
    try:
        device.enrol()
        device.wait_for(MessageType.ENROL_ACK, timeout=10)
        assert service.store.device(device.id) is not None
    finally:
        device.stop()


def test_a_forged_key_announcement_is_replaced_by_the_daemons(daemon):
    service, watcher = daemon
    ours = read_signed_keys(watcher.seen[-1])
    attacker = Identity.generate()
    body = AggregatorKeys(ours.aggregator_id, attacker.public.verify_key, attacker.public.box_key, ours.model,
                          ours.lora).encode()
    forged = EnvelopeWriter(attacker, ours.aggregator_id).build(MessageType.AGGREGATOR_KEYS, body)
    watcher.publish(forged)
    wait_until(lambda: watcher.seen[-1] != forged, 2, "the daemon's announcement back")
    assert read_signed_keys(watcher.seen[-1]) == ours
    assert service.refusals["retained_altered"] == 1


def test_the_daemon_announces_its_keys_again_every_interval(tmp_path, mqtt_url):
    prefix = f"ret{uuid.uuid4().hex[:8]}"
    service = make_service(tmp_path, mqtt_url, mqtt_topic_prefix=prefix, announce_interval_s=0.5)
    watcher = KeysWatcher(mqtt_url, prefix)
    try:
        wait_until(lambda: len(watcher.seen) >= 3, 5, "two more announcements")
        assert all(read_signed_keys(p) == read_signed_keys(watcher.seen[0]) for p in watcher.seen)
        assert service.refusals["retained_altered"] == 0  # its own re-announcements are not tampering
    finally:
        watcher.close()
        service.stop()
        with MqttTransport(MqttConfig(url=mqtt_url, topic_prefix=prefix)) as t:
            t.clear_retained(t.topics.aggregator_keys)


def test_a_device_does_not_enrol_again_when_the_same_keys_are_announced_again(tmp_path, mqtt_url):
    """Re-announcement keeps the retained keys in place; it is not a reason for a whole fleet to re-enrol."""
    import torch

    from edge_sdk import DeviceConfig, EdgeClient, FederatedSession, LocalData
    from edge_sdk.protocol.topics import Topics

    prefix = f"ret{uuid.uuid4().hex[:8]}"
    service = make_service(tmp_path, mqtt_url, mqtt_topic_prefix=prefix, expected_devices=None,
                           announce_interval_s=0.5)
    watcher = KeysWatcher(mqtt_url, prefix)
    enrolments: list[bytes] = []
    spy = MqttTransport(MqttConfig(url=mqtt_url, topic_prefix=prefix, session_expiry_s=0))
    spy.subscribe(Topics(prefix).enrol("dev-once"), lambda t, p: enrolments.append(p))
    spy.connect()
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "device", device_id="dev-once", profile="simulator",
                                     enrolment_token=DEMO_TOKEN,
                                     aggregator_fingerprint=service.identity.public.fingerprint))
    session = FederatedSession(client, LocalData(torch.rand(4, 1, 16, 16), ["a chunky 7"] * 4),
                               MqttConfig(url=mqtt_url, topic_prefix=prefix))
    try:
        session.start()
        assert session.enrolled.wait(30)
        seen = len(watcher.seen)
        wait_until(lambda: len(watcher.seen) >= seen + 3, 10, "three more announcements")
        assert len(enrolments) == 1
    finally:
        session.stop()
        spy.close()
        watcher.close()
        service.stop()
        with MqttTransport(MqttConfig(url=mqtt_url, topic_prefix=prefix)) as t:
            t.clear_retained(t.topics.aggregator_keys)


def test_two_guards_fighting_over_one_topic_restore_at_most_once_a_second_each(mqtt_url):
    """Two daemons with different keys on one prefix (a misconfiguration) must not flood the broker."""
    topic = f"ret{uuid.uuid4().hex[:8]}/v1/aggregator/keys"
    transports = [MqttTransport(MqttConfig(url=mqtt_url, session_expiry_s=0)).connect() for _ in range(2)]
    guards = [RetainedGuard(t, RefusalCounter()) for t in transports]
    try:
        for guard, payload in zip(guards, (b"ours", b"theirs")):
            guard.publish(topic, payload)
        time.sleep(2.0)
        assert all(1 <= g.restored <= 3 for g in guards), [g.restored for g in guards]
    finally:
        for t in transports:
            t.clear_retained(topic)
            t.close()
