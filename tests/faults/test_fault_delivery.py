"""Duplicate and out-of-order delivery, and a device that comes back believing in a round that closed.

- the same update bytes twice (a QoS-1 redelivery): refused ``replayed``, counted once;
- a second, different update for the same round (the device re-trained after a re-invite):
  acknowledged as ``duplicate``, the first one stays the one in the aggregate;
- a round-1 update delivered after the device's round-2 update (held up in the network):
  refused ``stale_round`` and the device is told; neither round is touched;
- a device that disconnects, misses the close of round 1, reconnects and sends for round 1:
  refused ``stale_round``; its persistent MQTT session held round 2's start for it, and
  re-enrolling (what a restarted device does) sends it again; its round-2 update counts.
"""

import numpy as np
import torch
from faultkit import FaultDevice, delta_for, wait_until

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN
from edge_sdk.protocol.tensors import unpack_tensors


def close_to(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-6) for k in b)


def test_duplicate_out_of_order_and_stale_round_deliveries(tmp_path, own_broker, aggregator_id):
    cfg = AggregatorConfig(aggregator_id=aggregator_id, mqtt_url=own_broker.url, state_dir=tmp_path / "agg",
                           tokens=(DEMO_TOKEN,),
                           expected_devices=4, clustering="single", rounds=3, round_timeout_s=2.5, quorum=0.7,
                           max_extensions=0, refine_after_round=0, interaction=False)
    service = AggregatorService(cfg).start()
    a, b, c, d = devices = [FaultDevice(own_broker.url).start() for _ in range(4)]
    try:
        for dev in devices:
            dev.join(np.random.default_rng(4).normal(size=384))
        s1 = {dev.id: dev.start_of(1) for dev in devices}
        delta = {(dev.id, r): delta_for(service.shapes, seed=10 * r + i) for i, dev in enumerate(devices) for r in (1, 2)}

        # A: a redelivery of the same bytes, then a different second answer for the same round
        first = a.answer(s1[a.id], delta[a.id, 1], wait=True)
        wait_until(lambda: a.accepted(1), 15, "A's update acknowledged")
        a.send(a.topics.update(a.id), first)
        wait_until(lambda: service.refusals["replayed"] >= 1, 15, "redelivery refused")
        a.send(a.topics.update(a.id), a.update_envelope(s1[a.id], delta_for(service.shapes, seed=99)))
        wait_until(lambda: len(a.acks_for(1)) == 2, 15, "second answer acknowledged")
        assert [(x.accepted, x.reason) for x in a.acks_for(1)] == [(True, ""), (True, "duplicate")]

        held_back = b.update_envelope(s1[b.id], delta[b.id, 1])  # B's round-1 update, stuck in the network
        for dev in (c, d):
            dev.answer(s1[dev.id], delta[dev.id, 1])
        wait_until(lambda: service.current_round() == 2 and d.accepted(1), 15, "round 1 closed at its deadline with 3/4")
        d.transport.close()  # D drops off while round 2 starts

        # B: round 2 first, then the held-back round-1 update arrives
        b.answer(b.start_of(2), delta[b.id, 2], wait=True)
        wait_until(lambda: b.accepted(2), 15, "B's round-2 update acknowledged")
        b.send(b.topics.update(b.id), held_back)
        wait_until(lambda: [(x.accepted, x.reason) for x in b.acks_for(1)] == [(False, "stale_round")], 15,
                   "late round-1 update refused")

        # D comes back still in round 1; its persistent session kept what was sent to it meanwhile
        d.reconnect()
        d.start_of(2, timeout=15)
        d.send(d.topics.update(d.id), d.update_envelope(s1[d.id], delta_for(service.shapes, seed=98)))
        wait_until(lambda: [(x.accepted, x.reason) for x in d.acks_for(1)] == [(True, ""), (False, "stale_round")], 15,
                   "stale round-1 update from the reconnected device refused")
        before = len(d.starts())
        d.enrol()  # what a restarted device does first: the aggregator answers with the round it is in
        wait_until(lambda: len(d.starts()) > before, 15, "round start re-sent on re-enrolment")
        d.answer(d.start_of(2), delta[d.id, 2])
        for dev in (a, c):
            dev.answer(dev.start_of(2), delta[dev.id, 2])
        wait_until(lambda: service.current_round() == 3, 15, "round 2 complete")

        (_, _, r1), (_, _, r2) = service.store.round_summaries()
        assert sorted(r1["accepted"]) == sorted([a.id, c.id, d.id])
        assert sorted(r2["accepted"]) == sorted(dev.id for dev in devices)
        stored = {(u.device_id, u.round): unpack_tensors(u.delta) for r in (1, 2) for u in service.store.updates(r)}
        assert len(stored) == 7
        assert close_to(stored[a.id, 1], delta[a.id, 1])  # the first answer is the one that counts
        assert close_to(stored[b.id, 2], delta[b.id, 2]) and (b.id, 1) not in stored
        assert close_to(stored[d.id, 1], delta[d.id, 1]) and close_to(stored[d.id, 2], delta[d.id, 2])
        assert service.refusals["stale_round"] >= 2
    finally:
        for dev in devices:
            dev.stop()
        service.stop()
