"""A small real federation: 4 devices in worker processes, 2 styles, 2 rounds, over the broker."""

import pytest

from aggregator.simulation.fleet import FleetConfig, run_federation
from aggregator.state import open_store


@pytest.fixture(scope="module")
def federation(tmp_path_factory, mqtt_url):
    state = tmp_path_factory.mktemp("federation")
    cfg = FleetConfig(devices=4, styles=2, rounds=2, local_steps=12, mqtt_url=mqtt_url, eval_samples=8,
                      final_eval_samples=16, state_dir=state)
    return cfg, run_federation(cfg, progress=False)


@pytest.mark.slow
def test_clusters_recover_the_styles(federation):
    _, result = federation
    assert result.ari("final") == 1.0
    assert len(set(result.assignment.values())) == 2


@pytest.mark.slow
def test_each_device_personalises_beyond_the_base_model(federation):
    _, result = federation
    assert len(result.devices) == 4
    for device, report in result.devices.items():
        assert report["personal"]["style_acc"] > report["base"]["style_acc"], device
        assert [r["accepted"] for r in report["rounds"]] == [True, True]


@pytest.mark.slow
def test_bytes_are_accounted_per_device_round_and_direction(federation):
    cfg, result = federation
    for rnd in (1, 2):
        per_device = result.traffic[rnd]
        assert set(per_device) == set(result.assignment)
        assert all(v["up"] > 0 and v["down"] > 0 for v in per_device.values())
    device_up = sum(r["bytes"]["out"] for r in result.devices.values())
    aggregator_in = sum(v["up"] for per in result.traffic.values() for v in per.values())
    assert aggregator_in <= device_up  # the devices also sent status/online messages the ledger leaves out


@pytest.mark.slow
def test_state_on_disk_is_consistent(federation):
    cfg, result = federation
    store = open_store(str(cfg.state_dir / "aggregator" / "state.db"))
    try:
        assert store.get("done") is True and store.get("current_round") == 2
        assert store.rounds("open") == []
        summaries = store.round_summaries()
        assert {(r, c) for r, c, _ in summaries} == {(r, c) for r in (1, 2) for c in set(result.assignment.values())}
        for _, _, summary in summaries:
            assert sorted(summary["accepted"]) == sorted(summary["members"])
        assert all(version == 2 for _, _, version in store.clusters().values())
    finally:
        store.close()
