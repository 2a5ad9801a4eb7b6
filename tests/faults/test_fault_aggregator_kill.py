"""The aggregator daemon is SIGKILLed mid-round and again mid-aggregation, and restarted each time.

Invariant: every update acknowledged to a device is in the round's aggregate, and none is in
it twice. Checked three ways: the round summary lists each device exactly once, every device
holding an acknowledgement is listed, and the committed adapter equals the rule applied
offline to exactly the updates the devices sent (counting one twice would move it).

The daemon runs as a child process (``fedaigc aggregator --config``); for the second kill it
runs through ``slow_aggregator.py``, whose rule signals when it holds the round's updates and
then takes its time, so the SIGKILL lands inside the aggregation for certain.
"""

import json
from pathlib import Path

import torch
from faultkit import (
    DaemonProcess,
    FaultDevice,
    delta_for,
    open_round_one,
    sqlite_rows,
    wait_until,
    write_config,
)

from aggregator.rules import ClientUpdate, make_rule
from edge_sdk.protocol.tensors import shapes_of, unpack_tensors
from models.lora import lora_config

N = 8
SLOW = Path(__file__).resolve().parent / "slow_aggregator.py"


def test_sigkill_mid_round_and_mid_aggregation_counts_every_acknowledged_update_once(tmp_path, own_broker,
                                                                                     aggregator_id):
    db = tmp_path / "agg" / "state.db"
    config = write_config(tmp_path / "aggregator.toml", aggregator_id=aggregator_id, mqtt_url=own_broker.url,
                          state_dir=str(tmp_path / "agg"), expected_devices=N, clustering="single", rounds=2,
                          round_timeout_s=5, max_extensions=20, quorum=1.0, refine_after_round=0, interaction=False,
                          rule="exact", clip=3.0)
    marker = tmp_path / "aggregating"
    slow = dict(runner=(str(SLOW),), extra=("--marker", str(marker), "--delay", "120"))
    daemon = DaemonProcess(config, **slow).start()
    devices = [FaultDevice(own_broker.url).start() for _ in range(N)]
    try:
        starts, initial = open_round_one(devices, seed=2)
        shapes = shapes_of(initial)
        deltas = {d.id: delta_for(shapes, seed=10 + i) for i, d in enumerate(devices)}

        def rows():
            return {r[0] for r in sqlite_rows(db, "SELECT device_id FROM updates WHERE round = 1")}

        for d, s in zip(devices[:3], starts[:3]):
            d.answer(s, deltas[d.id])
        wait_until(lambda: all(d.accepted(1) for d in devices[:3]), 30, "first three acknowledged")
        for d, s in zip(devices[3:5], starts[3:5]):
            d.answer(s, deltas[d.id], wait=True)
        daemon.kill()  # fault 1: mid-round, while updates are arriving
        assert sqlite_rows(db, "SELECT state FROM rounds WHERE round = 1") == [("open",)]
        assert rows() >= {d.id for d in devices[:3]}

        daemon = DaemonProcess(config, **slow).start()  # re-invites whoever is missing; they re-send
        wait_until(lambda: rows() >= {d.id for d in devices[:5]}, 60, "updates lost in the kill re-sent")
        for d, s in zip(devices[5:], starts[5:]):
            d.answer(s, deltas[d.id])
        wait_until(marker.exists, 60, "aggregation of the complete round started")
        daemon.kill()  # fault 2: mid-aggregation, the round's updates read, nothing written yet
        assert sqlite_rows(db, "SELECT state FROM rounds WHERE round = 1") == [("open",)]
        assert rows() == {d.id for d in devices}

        daemon = DaemonProcess(config).start()  # the real daemon: resumes and closes the round
        wait_until(lambda: sqlite_rows(db, "SELECT state FROM rounds WHERE round = 1") == [("closed",)], 60,
                   "round 1 closed after the restart")
        summary = json.loads(sqlite_rows(db, "SELECT summary FROM rounds WHERE round = 1")[0][0])
        assert sorted(summary["accepted"]) == sorted(d.id for d in devices)  # every update, each once
        assert len(sqlite_rows(db, "SELECT device_id FROM updates WHERE round = 1")) == N
        wait_until(lambda: all(d.accepted(1) or d.id in rows() for d in devices), 5)
        assert {d.id for d in devices if d.accepted(1)} <= set(summary["accepted"])

        blob, version = sqlite_rows(db, "SELECT adapter, version FROM clusters WHERE cluster_id = 0")[0]
        assert version == 1
        committed = unpack_tensors(blob)
        spec, rule = lora_config(2), make_rule("exact", 3.0)
        expected = rule.aggregate(initial, [ClientUpdate.from_delta(i, initial, deltas[i], 10) for i in deltas],
                                  spec).adapter
        twice = rule.aggregate(initial, [ClientUpdate.from_delta(i, initial, deltas[i], 10) for i in deltas]
                               + [ClientUpdate.from_delta("again", initial, deltas[devices[0].id], 10)], spec).adapter
        assert max(float((committed[k] - expected[k]).abs().max()) for k in expected) < 1e-6
        assert max(float((twice[k] - expected[k]).abs().max()) for k in expected) > 1e-4  # the check has teeth
        assert all(torch.isfinite(t).all() for t in committed.values())
    finally:
        for d in devices:
            d.stop()
        daemon.stop()
