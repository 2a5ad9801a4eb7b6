"""30% of the devices drop out mid-round and a fifth are 5x slower than the rest.

Straggler handling as documented (README, "Reliability"): at a round's deadline the cluster
closes if a quorum of its members reported; otherwise the deadline moves by
``round_timeout_s`` (at most ``max_extensions`` times) and members that have not reported get
their round start again. After the last extension the round closes with whatever arrived. An
update for a closed round is refused ``stale_round`` (and the device is told so); every live
member gets the next round's start.

Here 10 fast devices (1 s) are below the 60% quorum at the first deadline (3 s), so the round
is extended once; the 4 slow devices (5 s) arrive inside the extension; the 6 that dropped out
never do, and the round closes at the extended deadline with 14/20.
"""

import threading
import time

from faultkit import FaultDevice, delta_for, open_round_one, wait_until

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN

N, DROPPED, SLOW = 20, 6, 4
TIMEOUT_S, FAST_S = 3.0, 1.0


def test_dropouts_and_slow_devices_close_the_round_at_its_deadline_with_quorum(tmp_path, own_broker, aggregator_id):
    cfg = AggregatorConfig(aggregator_id=aggregator_id, mqtt_url=own_broker.url, state_dir=tmp_path / "agg",
                           tokens=(DEMO_TOKEN,),
                           expected_devices=N, clustering="single", rounds=2, round_timeout_s=TIMEOUT_S, quorum=0.6,
                           max_extensions=2, refine_after_round=0, interaction=False)
    service = AggregatorService(cfg).start()
    devices = [FaultDevice(own_broker.url).start() for _ in range(N)]
    timers = []
    try:
        starts, _ = open_round_one(devices, seed=3)
        opened = time.time()
        dropped, slow, fast = devices[:DROPPED], devices[DROPPED:DROPPED + SLOW], devices[DROPPED + SLOW:]
        for d in dropped:
            d.stop()  # gone mid-round: connection closed, never answers
        for group, delay in ((fast, FAST_S), (slow, 5 * FAST_S)):
            for d in group:
                i = devices.index(d)
                t = threading.Timer(delay, d.answer, args=(starts[i], delta_for(service.shapes, seed=i)))
                t.start()
                timers.append(t)

        wait_until(lambda: service.current_round() == 2, 4 * TIMEOUT_S + 10, "round 1 closed")
        (_, _, summary), = service.store.round_summaries()
        assert sorted(summary["accepted"]) == sorted(d.id for d in fast + slow)  # 14/20 >= quorum 12
        assert len(summary["members"]) == N
        assert service.store.get("extensions/1/0") == 1  # below quorum at the first deadline: extended once
        took = summary["closed_at"] - opened
        assert 2 * TIMEOUT_S - 0.5 <= took <= 2 * TIMEOUT_S + 3.0, took  # closed at the extended deadline
        assert all(d.accepted(1) for d in fast + slow)
        for d in fast + slow:  # the live members go on to round 2
            assert d.start_of(2, timeout=20).round == 2
        # the slow devices were re-invited at the first deadline, before they had answered
        assert all(sum(s.round == 1 for s in d.starts()) >= 2 for d in slow)
    finally:
        for t in timers:
            t.cancel()
        for d in devices[DROPPED:]:
            d.stop()
        service.stop()
