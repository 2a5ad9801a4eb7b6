"""The broker goes away mid-round and comes back: nothing accepted is lost, the round completes.

The test owns a mosquitto process. Half the devices report, the broker is stopped (SIGTERM,
so it writes its persistence file) or killed (SIGKILL, it keeps only what it autosaved),
the other half publish while it is down (paho holds QoS-1 messages until it reconnects),
the broker restarts on the same port, and every client reconnects with backoff
(v5 sessions with ``clean_start=False`` keep their subscriptions).
"""

import pytest
from faultkit import FaultDevice, delta_for, open_round_one, wait_until

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN

N = 6


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_broker_restart_mid_round_loses_no_update(tmp_path, own_broker, aggregator_id, how):
    cfg = AggregatorConfig(aggregator_id=aggregator_id, mqtt_url=own_broker.url, state_dir=tmp_path / "agg",
                           tokens=(DEMO_TOKEN,),
                           expected_devices=N, clustering="single", rounds=2, round_timeout_s=20, quorum=1.0,
                           max_extensions=20, refine_after_round=0, interaction=False)
    service = AggregatorService(cfg).start()
    devices = [FaultDevice(own_broker.url).start() for _ in range(N)]
    try:
        starts, _ = open_round_one(devices, seed=1)
        first, second = devices[: N // 2], devices[N // 2:]
        for i, d in enumerate(first):
            d.answer(starts[i], delta_for(service.shapes, seed=i), wait=True)
        wait_until(lambda: all(d.accepted(1) for d in first), 30, "first half acknowledged")

        own_broker.stop(kill=how == "kill")  # the fault: no broker
        for i, d in enumerate(second, start=N // 2):
            d.answer(starts[i], delta_for(service.shapes, seed=i))  # queued in paho while the broker is down
        own_broker.start()

        # a killed broker forgets the aggregator's subscriptions; updates the devices' paho flushes before
        # the aggregator has re-subscribed are dropped by the broker and come back when the deadline
        # re-invites their devices (the round stays open: quorum 1.0, extensions to spare)
        wait_until(lambda: service.current_round() == 2, 120, "round 1 closed after the broker came back")
        wait_until(lambda: all(d.accepted(1) for d in devices), 30, "every device acknowledged")
        summary = service.store.round_summaries()[0][2]
        assert sorted(summary["accepted"]) == sorted(d.id for d in devices)  # all of them, each once
        assert len(service.store.updates(1)) == N
        assert all(d.start_of(2, timeout=30).round == 2 for d in devices)  # the downlink works again too
    finally:
        for d in devices:
            d.stop()
        service.stop()
