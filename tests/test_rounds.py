"""The round state machine and the IFCA policy over a real broker, driven by protocol-level devices."""

import numpy as np
import pytest

from aggregator.rounds import Phase
from aggregator.simulation.lite import LiteDevice, start_adapter
from edge_sdk.protocol.envelope import MessageType
from edge_sdk.protocol.messages import RoundStart
from tests.polling import wait_until
from tests.test_service import make_service, small_delta


@pytest.fixture
def ifca(tmp_path, mqtt_url):
    """An IFCA aggregator (k = 2) with two devices, each holding round 1's two candidates."""
    service = make_service(tmp_path, mqtt_url, clustering="ifca", k=2)
    devices = [LiteDevice(mqtt_url).start() for _ in range(2)]
    for d in devices:
        d.join(np.random.default_rng(0).normal(size=384))
    candidates = [{s.cluster: s for s in (RoundStart.decode(b) for _, b in d.wait_for(MessageType.ROUND_START, 2))}
                  for d in devices]
    yield service, devices, candidates
    for d in devices:
        d.stop()
    service.stop()


def test_phases_follow_a_round_from_open_to_committed(tmp_path, mqtt_url):
    service = make_service(tmp_path, mqtt_url)
    devices = [LiteDevice(mqtt_url).start() for _ in range(2)]
    try:
        for d in devices:
            d.join(np.random.default_rng(0).normal(size=384))
        starts = [d.round_start() for d in devices]
        assert service.rounds.phase(1) is Phase.OPEN
        devices[0].send(devices[0].topics.update(devices[0].id), devices[0].update_envelope(starts[0], small_delta(service)))
        wait_until(lambda: service.rounds.phase(1) is Phase.COLLECTING)
        devices[1].send(devices[1].topics.update(devices[1].id), devices[1].update_envelope(starts[1], small_delta(service)))
        wait_until(lambda: service.rounds.phase(1) is Phase.COMMITTED)
        assert service.rounds.phase(2) is Phase.OPEN
    finally:
        for d in devices:
            d.stop()
        service.stop()


def test_ifca_offers_every_device_all_k_candidates_whole(ifca):
    service, devices, candidates = ifca
    for offered in candidates:
        assert set(offered) == {0, 1}
        assert all(s.choices == 2 and s.base_version == -1 for s in offered.values())
    a, b = (start_adapter(candidates[0][c], service.shapes) for c in (0, 1))
    assert any(not (a[k] == b[k]).all() for k in a)  # distinct starting points break the symmetry


def test_ifca_counts_each_update_for_the_cluster_its_device_chose_and_closes_the_round_together(ifca):
    service, devices, candidates = ifca
    for d, offered in zip(devices, candidates):
        d.send(d.topics.update(d.id), d.update_envelope(offered[1], small_delta(service)))
    wait_until(lambda: service.current_round() == 2)
    summaries = {cid: s for r, cid, s in service.store.round_summaries() if r == 1}
    assert sorted(summaries[1]["accepted"]) == sorted(d.id for d in devices) and summaries[0]["accepted"] == []
    assert {service.membership.assignment[d.id] for d in devices} == {1}


def test_ifca_refuses_a_second_choice_in_the_same_round(ifca):
    service, devices, candidates = ifca
    d = devices[0]
    d.send(d.topics.update(d.id), d.update_envelope(candidates[0][0], small_delta(service)))
    wait_until(lambda: len(service.store.updates(1)) == 1)
    before = service.refusals["stale_round"]
    d.send(d.topics.update(d.id), d.update_envelope(candidates[0][1], small_delta(service, seed=1)))
    wait_until(lambda: service.refusals["stale_round"] > before)
    assert [u.cluster_id for u in service.store.updates(1)] == [0]
