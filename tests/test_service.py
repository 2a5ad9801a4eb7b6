"""The aggregator daemon over a real broker, driven by protocol-level test devices."""

import time
import uuid

import msgpack
import numpy as np
import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN, LiteDevice
from edge_sdk.protocol.digest import short, tensor_digest
from edge_sdk.protocol.envelope import MessageType, parse_envelope
from edge_sdk.protocol.messages import SEEDED_CODEC, SeededAdapter
from tests.polling import wait_until


def make_service(tmp_path, mqtt_url, **kwargs):
    cfg = AggregatorConfig(**({"aggregator_id": f"agg-{uuid.uuid4().hex[:6]}", "mqtt_url": mqtt_url,
                               "state_dir": tmp_path / "agg", "expected_devices": 2, "rounds": 2,
                               "round_timeout_s": 60, "refine_after_round": 0, "tokens": (DEMO_TOKEN,)} | kwargs))
    return AggregatorService(cfg).start()


@pytest.fixture
def fleet(tmp_path, mqtt_url):
    """An aggregator with two raw devices in one cluster, round 1 open."""
    service = make_service(tmp_path, mqtt_url)
    devices = [LiteDevice(mqtt_url).start() for _ in range(2)]
    v = np.random.default_rng(0).normal(size=384)
    for d in devices:
        d.join(v)
    starts = [d.round_start() for d in devices]
    yield service, devices, starts
    for d in devices:
        d.stop()
    service.stop()


def small_delta(service, scale=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in service.shapes.items()}


def test_round_start_carries_the_cluster_adapter_as_its_seed(fleet):
    service, devices, starts = fleet
    seeded = SeededAdapter.decode(starts[0].adapter)
    assert starts[0].codec == SEEDED_CODEC and seeded.seed == service.config.seed
    assert starts[0].round == 1 and starts[0].local_steps == service.config.local_steps
    assert seeded.digest == short(tensor_digest(service.initial))


def test_a_duplicate_update_is_applied_once(fleet):
    service, devices, starts = fleet
    env = devices[0].update_envelope(starts[0], small_delta(service))
    devices[0].send(devices[0].topics.update(devices[0].id), env)
    devices[0].send(devices[0].topics.update(devices[0].id), env)  # QoS-1 style redelivery of the same bytes
    wait_until(lambda: len(service.store.updates(1)) == 1)
    time.sleep(0.5)
    assert len(service.store.updates(1)) == 1
    assert service.refusals["replayed"] == 1


def test_the_round_closes_when_every_member_reported_and_the_next_opens(fleet):
    service, devices, starts = fleet
    for i, (d, s) in enumerate(zip(devices, starts)):
        d.send(d.topics.update(d.id), d.update_envelope(s, small_delta(service, seed=i)))
    wait_until(lambda: service.current_round() == 2)
    assert {u.device_id for u in service.store.updates(1)} == {d.id for d in devices}
    devices[0].wait_for(MessageType.ROUND_START, count=2)
    nxt = devices[0].round_start(index=-1)
    assert nxt.round == 2 and nxt.version == 1


def refused(service, reason, action, timeout=15):
    before = service.refusals[reason]
    action()
    wait_until(lambda: service.refusals[reason] > before, timeout)


def test_each_refusal_reason_is_provoked_and_counted(fleet, mqtt_url):
    service, (dev, other), starts = fleet
    start = starts[0]
    up = dev.topics.update(dev.id)
    good = dev.update_envelope(start, small_delta(service))

    stranger = LiteDevice(mqtt_url).start()
    refused(service, "unknown_sender", lambda: stranger.send(stranger.topics.update(stranger.id), stranger.update_envelope(start, small_delta(service))))

    env = parse_envelope(good)
    forged = msgpack.packb([env.version, env.type.value, env.sender, env.round, env.seq, env.nonce, env.timestamp_ms,
                            env.payload, bytes(64)])
    refused(service, "bad_signature", lambda: dev.send(up, forged))

    tampered_body = bytearray(env.payload)
    tampered_body[40] ^= 1
    tampered = dev.writer.build(MessageType.UPDATE, bytes(tampered_body), start.round)  # signed, but the box fails
    refused(service, "tampered", lambda: dev.send(up, tampered))

    wrong_version = msgpack.packb([99, env.type.value, env.sender, env.round, env.seq, env.nonce, env.timestamp_ms,
                                   env.payload, env.signature])
    refused(service, "wrong_version", lambda: dev.send(up, wrong_version))
    refused(service, "malformed", lambda: dev.send(up, b"\x93garbage"))
    refused(service, "stale_round", lambda: dev.send(up, dev.update_envelope(start, small_delta(service), round=7)))

    nan = {k: torch.full_like(v, float("nan")) for k, v in small_delta(service).items()}
    refused(service, "non_finite", lambda: dev.send(up, dev.update_envelope(start, nan)))
    wrong = {k + "x": v for k, v in small_delta(service).items()}
    refused(service, "bad_tensors", lambda: dev.send(up, dev.update_envelope(start, wrong)))

    service.verifier.max_bytes = 1000
    refused(service, "oversized", lambda: dev.send(up, good))
    service.verifier.max_bytes = service.config.max_message_bytes

    intruder = LiteDevice(mqtt_url, token="not-a-token").start()
    refused(service, "bad_token", intruder.enrol)

    dev.send(up, good)
    refused(service, "replayed", lambda: dev.send(up, good))

    service.store.revoke_device(other.id)
    refused(service, "revoked", lambda: other.send(other.topics.update(other.id), other.update_envelope(starts[1], small_delta(service))))
    for d in (stranger, intruder):
        d.stop()
    # every refusal was also reported back to the device where it could be authenticated
    assert {a.reason for a in dev.acks() if not a.accepted} >= {"stale_round", "non_finite", "bad_tensors"}


def test_a_restarted_daemon_resumes_the_round_and_loses_nothing(tmp_path, mqtt_url):
    service = make_service(tmp_path, mqtt_url, expected_devices=3, aggregator_id="agg-restart")
    devices = [LiteDevice(mqtt_url).start() for _ in range(3)]
    v = np.random.default_rng(0).normal(size=384)
    for d in devices:
        d.join(v)
    starts = [d.round_start() for d in devices]
    for i in range(2):
        devices[i].send(devices[i].topics.update(devices[i].id), devices[i].update_envelope(starts[i], small_delta(service, seed=i)))
    wait_until(lambda: len(service.store.updates(1)) == 2)
    service.stop()  # the daemon goes away mid-round with two accepted updates

    again = make_service(tmp_path, mqtt_url, expected_devices=3, aggregator_id="agg-restart")
    try:
        assert again.identity.public == service.identity.public  # same keys: devices keep trusting it
        assert again.current_round() == 1 and len(again.store.updates(1)) == 2
        devices[2].send(devices[2].topics.update(devices[2].id), devices[2].update_envelope(starts[2], small_delta(service, seed=2)))
        wait_until(lambda: again.current_round() == 2)
        summary = again.store.round_summaries()[0][2]
        assert sorted(summary["accepted"]) == sorted(d.id for d in devices)  # all three, each once
    finally:
        for d in devices:
            d.stop()
        again.stop()


def test_a_device_starting_after_the_daemon_gets_its_keys_not_the_last_daemons(tmp_path, mqtt_url):
    """The broker retains the previous aggregator's announcement until the new one is acknowledged."""
    for i in range(3):
        service = make_service(tmp_path / str(i), mqtt_url)
        device = LiteDevice(mqtt_url).start()
        try:
            assert device.aggregator.box_key == service.identity.public.box_key
        finally:
            device.stop()
            service.stop()


def test_fleets_under_different_prefixes_share_a_broker_without_seeing_each_other(tmp_path, mqtt_url):
    run = uuid.uuid4().hex[:6]
    services = [make_service(tmp_path / name, mqtt_url, mqtt_topic_prefix=f"fleet-{name}-{run}") for name in "ab"]
    devices = [LiteDevice(mqtt_url, topic_prefix=s.config.mqtt_topic_prefix).start() for s in services]
    try:
        for s, d in zip(services, devices):
            assert d.aggregator.box_key == s.identity.public.box_key
            d.enrol()
            d.wait_for(MessageType.ENROL_ACK)
        for s, d, other in zip(services, devices, devices[::-1]):
            assert s.store.device(d.id) is not None
            assert s.store.device(other.id) is None
    finally:
        for s, d in zip(services, devices):
            s.stop()  # first: a running daemon puts its cleared announcement back
            d.transport.clear_retained(d.topics.aggregator_keys)  # a fresh prefix per run: leave the broker clean
            d.stop()
