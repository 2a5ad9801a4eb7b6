"""Two aggregator workers share the uplink (MQTT v5 shared subscription) and keep state in PostgreSQL;
the leading worker is SIGKILLed mid-round and replaced.

Runs against this machine's Mosquitto (127.0.0.1:1883) and PostgreSQL (127.0.0.1:5432,
database ``test``, a schema of its own). Both workers load the same aggregator key (devices
see one aggregator) and connect as ``fedaigc-<aggregator_id>-<worker_id>``; the broker hands
each device update to one of them. One worker leads (PostgreSQL advisory lock): it forms
the clusters, closes rounds, opens the next. When it dies, the survivor takes the lock,
reloads the round from the database and re-invites the devices whose updates are missing;
the replacement reconnects with the dead worker's id, so its MQTT session (and whatever the
broker queued for it) carries on.

Invariant: each device's update is in the aggregate exactly once (rows are unique per
(round, cluster, device); closing locks the round row against late accepts), every
acknowledged update is in it, and the committed adapter is the rule applied to exactly the
updates sent. A device that joins later is put in a cluster by the leader whichever worker
received its task vector.
"""

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from faultkit import DaemonProcess, FaultDevice, delta_for, open_round_one, wait_until, write_config

from aggregator.broker import broker_listening
from aggregator.rules import ClientUpdate, make_rule
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.tensors import shapes_of, unpack_tensors
from edge_sdk.transport import discard_session
from models.lora import lora_config

N = 12
PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_schema():
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(PG, autocommit=True, connect_timeout=3)
    except Exception:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    schema = f"faults_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{PG}?options=-csearch_path%3D{schema}"
    reader = psycopg.connect(url, autocommit=True)
    try:
        yield url, reader
    finally:
        reader.close()
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
        conn.close()


def test_a_killed_worker_is_replaced_without_losing_or_double_counting(tmp_path, pg_schema, aggregator_id):
    if not broker_listening("127.0.0.1", 1883):
        pytest.skip("needs the machine's Mosquitto at 127.0.0.1:1883")
    url, pg = pg_schema
    state_dir = tmp_path / "agg"
    state_dir.mkdir()
    keys = Identity.generate()
    keys.save(state_dir / "aggregator.key")  # one aggregator identity, shared by its workers
    common = dict(aggregator_id=aggregator_id, mqtt_url="mqtt://127.0.0.1:1883", state_dir=str(state_dir),
                  state_url=url, shared_group=f"g{uuid.uuid4().hex[:8]}", expected_devices=N, clustering="single",
                  rounds=2, round_timeout_s=5, max_extensions=20, quorum=1.0, refine_after_round=0,
                  interaction=False, rule="exact", clip=3.0)
    configs = {w: write_config(tmp_path / f"{w}.toml", worker_id=w, **common) for w in ("w1", "w2")}
    verbose = ("-m", "aggregator.cli", "-v", "aggregator")
    with ThreadPoolExecutor(2) as pool:
        workers = dict(zip(configs, pool.map(lambda w: DaemonProcess(configs[w], runner=verbose).start(), configs)))

    def rows(sql):
        return pg.execute(sql).fetchall()

    devices = [FaultDevice("mqtt://127.0.0.1:1883", keys=keys.public, aggregator_id=aggregator_id).start()
               for _ in range(N)]
    try:
        starts, initial = open_round_one(devices, seed=7)
        shapes = shapes_of(initial)
        deltas = {d.id: delta_for(shapes, seed=20 + i) for i, d in enumerate(devices)}
        wait_until(lambda: any(any("leads aggregator" in x for x in w.lines) for w in workers.values()), 10)
        leader = next(w for w, p in workers.items() if any("leads aggregator" in x for x in p.lines))

        for d, s in zip(devices[: N // 2], starts[: N // 2]):
            d.answer(s, deltas[d.id])
        wait_until(lambda: all(d.accepted(1) for d in devices[: N // 2]), 30, "first half acknowledged")
        # one worker, not both, took each update: a plain subscription would have acked twice
        time.sleep(1.0)
        assert all(len(d.acks_for(1)) == 1 for d in devices[: N // 2])
        for d, s in zip(devices[N // 2:], starts[N // 2:]):
            d.answer(s, deltas[d.id], wait=True)
        workers[leader].kill()  # the fault: the leader dies with updates in flight
        survivor = next(w for w in workers if w != leader)
        workers[leader] = DaemonProcess(configs[leader], runner=verbose).start()  # the replacement, same worker id

        wait_until(lambda: rows("SELECT state FROM rounds WHERE round = 1") == [("closed",)], 60,
                   "round 1 closed by the new leader")
        assert any("leads aggregator" in x for x in workers[survivor].lines)  # the survivor took over
        summary = json.loads(rows("SELECT summary FROM rounds WHERE round = 1")[0][0])
        assert sorted(summary["accepted"]) == sorted(d.id for d in devices)  # each exactly once
        assert len(rows("SELECT device_id FROM updates WHERE round = 1")) == N
        assert {d.id for d in devices if d.accepted(1)} <= set(summary["accepted"])

        blob, version = rows("SELECT adapter, version FROM clusters WHERE cluster_id = 0")[0]
        committed = unpack_tensors(bytes(blob))
        expected = make_rule("exact", 3.0).aggregate(
            initial, [ClientUpdate.from_delta(i, initial, deltas[i], 10) for i in deltas], lora_config(2)).adapter
        assert version == 1
        assert max(float((committed[k] - expected[k]).abs().max()) for k in expected) < 1e-6

        # a device joining late lands on either worker; the leader puts it in a cluster and invites it
        late = FaultDevice("mqtt://127.0.0.1:1883", keys=keys.public, aggregator_id=aggregator_id).start()
        devices.append(late)
        late.join(np.random.default_rng(7).normal(size=384))
        assert late.start_of(2, timeout=30).round == 2
    finally:
        for d in devices:
            d.stop()
        for p in workers.values():
            p.stop()
        for client_id in [f"fedaigc-{aggregator_id}-{w}" for w in configs] + [f"fedaigc-{d.id}" for d in devices]:
            discard_session("mqtt://127.0.0.1:1883", client_id)  # the shared broker keeps no queue for them
