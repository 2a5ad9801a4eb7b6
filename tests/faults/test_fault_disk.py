"""An unusable state directory and a disk that stops taking writes mid-round.

- A file stands where the state directory should be: ``fedaigc aggregator`` exits with
  status 2 and one line naming the directory and the reason, no traceback.
- Mid-round, the running daemon's file-size limit (RLIMIT_FSIZE, set from outside like
  ``prlimit --fsize``) drops to one byte, so every write to its SQLite files fails as on a full
  disk (SQLite reports a disk I/O error where ENOSPC would give "database or disk is full";
  the daemon handles both the same). Updates arriving then are refused ``unavailable``, logged
  with the store's reason, and not acknowledged; the database stays consistent
  (``PRAGMA integrity_check``) and holds exactly the acknowledged updates. Once writes work
  again the daemon carries on without a restart: the devices it could not keep are
  re-invited at the deadline, re-send the same bytes, and the round closes with all of them.
"""

import json

import psutil
from faultkit import (
    DaemonProcess,
    FaultDevice,
    delta_for,
    open_round_one,
    sqlite_rows,
    wait_until,
    write_config,
)

from edge_sdk.protocol.tensors import shapes_of

N = 4


def test_unusable_state_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    config = write_config(tmp_path / "aggregator.toml", mqtt_url="mqtt://127.0.0.1:1", state_dir=str(blocker / "state"))
    daemon = DaemonProcess(config)
    try:
        daemon.start()
        raise AssertionError("the daemon started on an unusable state directory")
    except RuntimeError:
        pass
    assert daemon.proc.returncode == 2
    out = daemon.output()
    assert "Traceback" not in out
    assert f"state directory {blocker / 'state'} is not usable" in out and "Not a directory" in out


def test_disk_full_mid_round_refuses_cleanly_and_recovers(tmp_path, own_broker, aggregator_id):
    db = tmp_path / "agg" / "state.db"
    config = write_config(tmp_path / "aggregator.toml", aggregator_id=aggregator_id, mqtt_url=own_broker.url,
                          state_dir=str(tmp_path / "agg"), expected_devices=N, clustering="single", rounds=2,
                          round_timeout_s=4, max_extensions=10, quorum=1.0, refine_after_round=0, interaction=False)
    daemon = DaemonProcess(config).start()
    devices = [FaultDevice(own_broker.url).start() for _ in range(N)]
    try:
        starts, initial = open_round_one(devices, seed=6)
        shapes = shapes_of(initial)
        for i in (0, 1):
            devices[i].answer(starts[i], delta_for(shapes, seed=i))
        wait_until(lambda: devices[0].accepted(1) and devices[1].accepted(1), 20, "first updates acknowledged")

        proc = psutil.Process(daemon.pid)
        soft, hard = proc.rlimit(psutil.RLIMIT_FSIZE)
        proc.rlimit(psutil.RLIMIT_FSIZE, (1, hard))  # the fault: no write past the first byte of any file
        devices[2].answer(starts[2], delta_for(shapes, seed=2))
        wait_until(lambda: any("refused unavailable" in line for line in daemon.lines), 20, "refusal logged")
        line = next(x for x in daemon.lines if "refused unavailable" in x)
        assert "state store is not writable" in line and devices[2].id in line
        assert not devices[2].acks_for(1)  # not kept, so not acknowledged
        assert sqlite_rows(db, "PRAGMA integrity_check") == [("ok",)]
        assert {r[0] for r in sqlite_rows(db, "SELECT device_id FROM updates")} == {devices[0].id, devices[1].id}

        proc.rlimit(psutil.RLIMIT_FSIZE, (soft, hard))  # space again
        devices[3].answer(starts[3], delta_for(shapes, seed=3))
        wait_until(lambda: devices[3].accepted(1), 20, "writes work again without a restart")
        wait_until(lambda: sqlite_rows(db, "SELECT state FROM rounds WHERE round = 1") == [("closed",)], 30,
                   "round closed once the refused device re-sent at the deadline")
        summary = json.loads(sqlite_rows(db, "SELECT summary FROM rounds WHERE round = 1")[0][0])
        assert sorted(summary["accepted"]) == sorted(d.id for d in devices)
        wait_until(lambda: devices[2].accepted(1), 20, "the re-sent update acknowledged")  # the ack may trail the close
        assert sqlite_rows(db, "PRAGMA integrity_check") == [("ok",)]
    finally:
        for d in devices:
            d.stop()
        daemon.stop()
