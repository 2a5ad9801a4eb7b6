"""Fleet rollout of real ExecuTorch exports over the real broker: canary first, tampering, offline catch-up, rollback.

The exports are the tiny UNet's fp32 program from ``tests/test_export.py`` (same fixtures, same
content-hash cache under ``$FEDAIGC_CACHE_DIR/exports``); the load check on every device is the
real ExecuTorch runtime loading the program with its data. Devices are ``RolloutAgent``s with
their own MQTT connections and keys, enrolled in a running aggregator's registry; rollouts go
through the ``fedaigc rollout`` command.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

from aggregator.cli import main
from aggregator.config import AggregatorConfig
from aggregator.rollout import Rollout, RolloutPlan, canary_devices
from aggregator.service import AggregatorService
from aggregator.simulation.lite import DEMO_TOKEN
from aggregator.state import open_store
from aggregator.status import read_status, render_status
from edge_sdk.artifacts.inference import swap_adapter
from edge_sdk.artifacts.manifest import Manifest
from edge_sdk.protocol.envelope import EnvelopeWriter, MessageType
from edge_sdk.protocol.identity import Identity
from edge_sdk.protocol.messages import RolloutManifest
from edge_sdk.protocol.rollout import artifact_parts
from edge_sdk.protocol.tensors import pack_tensors
from edge_sdk.rollout import RolloutAgent
from edge_sdk.transport import MqttConfig, MqttTransport, discard_session
from tests.polling import wait_until
from tests.test_export import fp32, random_adapter, tiny  # noqa: F401  (fixtures: one cached export for both files)


# ---------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def exports(tiny, fp32, tmp_path_factory):  # noqa: F811
    """v1: the cached export; v2: v1 with another adapter swapped in (same program and base files);
    broken: v2 whose adapter.ptd is the base weights, hashes re-recorded, so only the runtime notices."""
    base, _, adapters = tiny
    root = tmp_path_factory.mktemp("rollout-exports")
    v1 = root / "v1"
    shutil.copytree(fp32[0], v1, ignore=shutil.ignore_patterns("done"))
    v2 = root / "v2"
    shutil.copytree(v1, v2)
    swap_adapter(v2, {"c": random_adapter(base, 2, seed=9)}, {"c": 1.0}, versions={"c": 2})
    broken = root / "broken"
    shutil.copytree(v2, broken)
    shutil.copyfile(broken / "base.ptd", broken / "adapter.ptd")
    manifest = Manifest.load(broken)
    manifest.record_files(broken, ["adapter.ptd"])
    manifest.save(broken)
    return {"v1": v1, "v2": v2, "broken": broken}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- a fleet around a running aggregator
class Device:
    """A device's rollout side: its own keys, MQTT connection and data directory."""

    def __init__(self, fleet: "Fleet", cluster: int, health=None) -> None:
        self.id = f"ro-{uuid.uuid4().hex[:8]}"
        self.identity = Identity.generate()
        self.checked: list[tuple[float, Path]] = []  # (time, directory) of every health check
        self.health = health
        pub = self.identity.public
        fleet.service.store.enrol(self.id, pub.verify_key, pub.box_key, "test", DEMO_TOKEN)
        self.mqtt = MqttConfig(url=fleet.mqtt_url, client_id=f"fedaigc-{self.id}", session_expiry_s=30)
        self.data_dir, self.cluster = fleet.tmp / self.id, cluster
        self.trusted = (fleet.service.config.aggregator_id, fleet.service.identity.public)
        self._make()

    def _make(self) -> None:
        """A fresh connection and agent over the same keys and data directory (a device app starting)."""
        self.transport = MqttTransport(self.mqtt)
        self.agent = RolloutAgent(self.transport, self.identity, EnvelopeWriter(self.identity, self.id),
                                  self.data_dir, aggregator=lambda: self.trusted, cluster=lambda: self.cluster,
                                  health_check=self._health, fetch_timeout_s=20)

    def _health(self, export_dir: Path) -> None:
        self.checked.append((time.monotonic(), export_dir))
        if self.health is not None:
            self.health(export_dir)

    def start(self) -> "Device":
        self.agent.start()
        self.transport.connect()
        return self

    def stop(self) -> None:
        self.agent.stop()
        self.transport.close()

    def restart(self) -> None:
        self.stop()
        self._make()
        self.start()

    @property
    def installed(self) -> int:
        return self.agent.installed

    def fetched_bytes(self, file_sha: str) -> int:
        prefix = self.transport.topics.rollout_artifact_part(file_sha, 0)[:-1]
        return sum(n for t, n in self.transport.bytes_in.items() if t.startswith(prefix))


class Fleet:
    def __init__(self, service: AggregatorService, tmp: Path, mqtt_url: str, capsys) -> None:
        self.service, self.tmp, self.mqtt_url, self.capsys = service, tmp, mqtt_url, capsys
        self.devices: list[Device] = []
        self.assignment: dict[str, int] = {}
        self.extra_topics: list[str] = []
        self.extra_sessions: list[str] = []

    def device(self, cluster: int = 0, health=None, start: bool = True) -> Device:
        d = Device(self, cluster, health)
        self.devices.append(d)
        self.assignment[d.id] = cluster
        blob = pack_tensors(self.service.initial)
        self.service.store.save_clusters({c: (None, blob, 1) for c in set(self.assignment.values())}, self.assignment)
        return d.start() if start else d

    def rollout(self, artifact: Path, to: str = "all", *extra: str) -> tuple[int, dict]:
        """``fedaigc rollout`` as an operator runs it; (exit code, its JSON summary)."""
        c = self.service.config
        self.capsys.readouterr()
        code = main(["rollout", "--artifact", str(artifact), "--to", to, "--state-dir", str(c.state_dir),
                     "--aggregator-id", c.aggregator_id, "--mqtt-url", self.mqtt_url, *extra])
        return code, json.loads(self.capsys.readouterr().out)

    def status(self) -> dict:
        return read_status(self.service.config.store_url)["rollout"]

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        state = self.service.store.get("rollout")
        records = [] if state is None else [*state["live"].values(), state["last"]]
        leftovers = {self.service.topics.rollout_manifest(r["target"]) for r in records} | set(self.extra_topics)
        leftovers |= {self.service.topics.rollout_artifact_part(f["sha256"], i)
                      for r in records for f in r["files"].values() for i in range(f["parts"])}
        with MqttTransport(MqttConfig(url=self.mqtt_url)) as t:  # retained messages outlive the test otherwise
            t.wait_published([info for topic in sorted(leftovers) for info in t.publish(topic, b"", retain=True)])
        for client_id in [f"fedaigc-{d.id}" for d in self.devices] + self.extra_sessions:
            discard_session(self.mqtt_url, client_id)


@pytest.fixture
def fleet(tmp_path, mqtt_url, capsys, tiny):  # noqa: F811
    config = AggregatorConfig(aggregator_id=f"agg-{uuid.uuid4().hex[:6]}", mqtt_url=mqtt_url,
                              state_dir=tmp_path / "agg", rounds=1, base_model=tiny[1],  # the exports' base
                              tokens=(DEMO_TOKEN,))
    service = AggregatorService(config).start()
    f = Fleet(service, tmp_path, mqtt_url, capsys)
    try:
        yield f
    finally:
        f.close()
        service.stop()


# ---------------------------------------------------------------- tests
def test_canary_devices_get_the_version_first_then_the_targeted_cluster(fleet, exports):
    members = [fleet.device(cluster=0) for _ in range(5)]
    other = fleet.device(cluster=1)
    canary = canary_devices([d.id for d in members], 0.25)
    assert len(canary) == 2  # ceil(25% of 5), chosen by hash of the device id

    code, summary = fleet.rollout(exports["v1"], "cluster:0", "--canary", "25%", "--wait", "30")

    assert code == 0 and summary["stage"] == "all" and summary["version"] == 1
    assert summary["canary"] == canary and summary["canary_reports"] == {d: "ok" for d in canary}
    assert summary["reports"] == {d.id: "ok" for d in members}
    assert all(d.installed == 1 for d in members) and other.installed == 0
    first = {d.id: d.checked[0][0] for d in members}
    assert max(first[d] for d in canary) < min(t for d, t in first.items() if d not in canary)
    for d in members:  # installed: a versioned directory, the pointer, files identical to the export
        assert json.loads((d.agent.root / "current").read_text()) == {"version": 1, "previous": 0}
        assert {p.name: sha(p) for p in d.agent.current_dir().iterdir()} == \
               {p.name: sha(p) for p in exports["v1"].iterdir()}
    wait_until(lambda: len(fleet.status()["devices"]) == 5, what="the aggregator recording five reports")
    status = fleet.status()
    assert status["installed"] == {"1": 5} and status["live"] == {"cluster-0": 1}
    text = render_status(read_status(fleet.service.config.store_url))
    assert "rollout: version 1 to cluster-0, stage all" in text and "v1 on 5 devices" in text


def test_a_tampered_artifact_or_forged_manifest_is_refused_and_the_device_keeps_its_version(fleet, exports):
    device = fleet.device()
    assert fleet.rollout(exports["v1"], "all", "--wait", "30")[1]["reports"] == {device.id: "ok"}

    # the publisher's copy of adapter.ptd got corrupted: signed parts, but not the file the manifest names
    service = fleet.service
    writer = EnvelopeWriter(service.identity, service.config.aggregator_id)
    files = {p.name: p.read_bytes() for p in exports["v2"].iterdir()}
    with MqttTransport(MqttConfig(url=fleet.mqtt_url)) as publisher:
        infos, parts = [], {}
        for name, blob in files.items():
            digest = hashlib.sha256(blob).hexdigest()
            sent = bytearray(blob)
            if name == "adapter.ptd":
                sent[len(sent) // 2] ^= 0xFF
            signed = artifact_parts(bytes(sent), writer, publisher.max_frame())
            parts[name] = len(signed)
            for i, part in enumerate(signed):
                fleet.extra_topics.append(publisher.topics.rollout_artifact_part(digest, i))
                infos += publisher.publish(publisher.topics.rollout_artifact_part(digest, i), part, retain=True)
        manifest = RolloutManifest(2, "all", [], [], {n: hashlib.sha256(b).hexdigest() for n, b in files.items()},
                                   {n: len(b) for n, b in files.items()}, parts, time.time())
        infos += publisher.publish(publisher.topics.rollout_manifest("all"),
                                   writer.build(MessageType.ROLLOUT_MANIFEST, manifest.encode()), retain=True)
        publisher.wait_published(infos)
        wait_until(lambda: len(device.agent.reports) == 2, what="the device's report on version 2")
        report = device.agent.reports[-1]
        assert not report.ok and report.installed == 1 and "adapter.ptd is not the file" in report.reason
        assert device.agent.refusals["tampered"] == 1 and device.installed == 1
        assert not (device.agent.root / "v2").exists() and not list(device.agent.root.glob(".staging-*"))

        # a manifest for version 3 signed by someone else under the aggregator's name
        forged = EnvelopeWriter(Identity.generate(), service.config.aggregator_id)
        manifest3 = RolloutManifest(**{**manifest.__dict__, "version": 3})
        publisher.wait_published(publisher.publish(publisher.topics.rollout_manifest("all"),
                                                   forged.build(MessageType.ROLLOUT_MANIFEST, manifest3.encode()),
                                                   retain=True))
        wait_until(lambda: device.transport.refusals["bad_signature"] == 1, what="the forged manifest refused")
    assert device.installed == 1 and len(device.agent.reports) == 2 and len(device.checked) == 1
    wait_until(lambda: device.id in fleet.status()["failed"], what="the aggregator recording the refusal")
    assert "adapter.ptd is not the file" in fleet.status()["failed"][device.id]["reason"]


def test_a_device_offline_during_rollouts_catches_up_from_the_retained_manifest(fleet, exports):
    online = fleet.device()
    offline = fleet.device(start=False)
    for version, export in ((1, exports["v1"]), (2, exports["v2"])):  # no --wait: the offline device would not answer
        assert fleet.rollout(export, "all")[0] == 0
        wait_until(lambda: [r.version for r in online.agent.reports] == list(range(1, version + 1)),
                   what=f"the online device's report on version {version}")
    # v2 changed only the adapter: the program and base weights were copied from v1, not fetched again
    assert online.fetched_bytes(sha(exports["v1"] / "model.pte")) < 1.1 * (exports["v1"] / "model.pte").stat().st_size
    assert online.fetched_bytes(sha(exports["v2"] / "adapter.ptd")) > 0

    offline.start()  # back after both rollouts: straight to v2, through retained messages only
    wait_until(lambda: offline.agent.reports, what="the returning device's report")
    assert [(r.version, r.ok) for r in offline.agent.reports] == [(2, True)] and offline.installed == 2
    assert {p.name: sha(p) for p in offline.agent.current_dir().iterdir()} == \
           {p.name: sha(p) for p in exports["v2"].iterdir()}
    assert offline.fetched_bytes(sha(exports["v1"] / "adapter.ptd")) == 0  # v1's own files were withdrawn
    wait_until(lambda: fleet.status()["installed"] == {"2": 2}, what="both devices reported on version 2")


def test_a_failed_load_rolls_back_and_an_unhealthy_canary_halts_the_rollout(fleet, exports):
    devices = [fleet.device() for _ in range(3)]
    assert fleet.rollout(exports["v1"], "all", "--wait", "30")[0] == 0
    assert all(d.installed == 1 for d in devices)

    # version 2's adapter data does not fit its program: the runtime refuses it on the canary
    code, summary = fleet.rollout(exports["broken"], "all", "--canary", "33%", "--canary-timeout", "30")
    assert code == 3 and summary["stage"] == "halted"
    (canary,) = [d for d in devices if d.id in summary["canary"]]
    assert "rolled back to 1" in summary["canary_reports"][canary.id]
    assert "does not fit this program" in summary["halted"]
    for d in devices:
        assert d.installed == 1 and (d.agent.root / "v1").exists() and not (d.agent.root / "v2").exists()
    assert json.loads((canary.agent.root / "current").read_text()) == {"version": 1, "previous": 0}
    assert "2" in canary.agent.failed()
    assert all(len(d.checked) == 1 for d in devices)  # the others never saw version 2
    assert fleet.status()["last"]["stage"] == "halted" and fleet.status()["live"] == {"all": 1}

    # version 3 is sound, but one device's own health check fails: that device alone rolls back
    def unhealthy(export_dir: Path) -> None:
        raise RuntimeError("samples look wrong")

    sick = devices[0]
    sick.health = unhealthy
    code, summary = fleet.rollout(exports["v2"], "all", "--wait", "30")
    assert code == 0 and summary["version"] == 3
    assert "samples look wrong" in summary["reports"][sick.id]
    assert sick.installed == 1 and all(d.installed == 3 for d in devices[1:])
    wait_until(lambda: fleet.status()["installed"] == {"1": 1, "3": 2}, what="the fleet's versions recorded")


def test_a_part_cleared_or_overwritten_during_a_canary_rollout_is_put_back_and_the_rollout_goes_on(fleet, exports):
    canary = fleet.device(start=False)  # fetches only after the attack: every part it reads is one the broker holds
    c = fleet.service.config
    store = open_store(c.store_url)
    transport = MqttTransport(c.mqtt(f"fedaigc-{c.aggregator_id}-rollout-test", session_expiry_s=0)).connect()
    rollout = Rollout(transport, fleet.service.identity, c.aggregator_id, store)
    summary: dict = {}
    plan = RolloutPlan(exports["v1"], "all", (), canary=1.0, canary_timeout_s=30)
    run = threading.Thread(target=lambda: summary.update(rollout.run(plan)), daemon=True)
    run.start()
    try:
        wait_until(lambda: (store.get("rollout") or {}).get("last", {}).get("stage") == "canary", 60,
                   "the canary stage")
        files = sorted(f["sha256"] for f in store.get("rollout")["last"]["files"].values())
        with MqttTransport(MqttConfig(url=fleet.mqtt_url, topic_prefix=c.mqtt_topic_prefix)) as attacker:
            attacker.wait_published(attacker.publish(attacker.topics.rollout_artifact_part(files[0], 0), b"",
                                                     retain=True)
                                    + attacker.publish(attacker.topics.rollout_artifact_part(files[1], 0),
                                                       b"not the aggregator's", retain=True))
        wait_until(lambda: rollout.retained.restored == 2, 5, "both parts put back")
        canary.start()
        run.join(60)
    finally:
        transport.close()
        store.close()
    assert summary["stage"] == "all" and summary["canary_reports"] == {canary.id: "ok"}
    assert summary["restored"] == 2 and transport.refusals["retained_altered"] == 2
    assert canary.installed == 1


def test_a_version_whose_check_never_finished_counts_as_failed_after_a_restart(fleet, exports):
    device = fleet.device()
    assert fleet.rollout(exports["v1"], "all", "--wait", "30")[0] == 0
    device.stop()  # ... as if the process died while checking version 2 (a crashing load, a power cut)
    shutil.copytree(device.agent.current_dir(), device.agent.root / "v2")
    (device.agent.root / "current").write_text(json.dumps({"version": 2, "previous": 1, "checking": True}))

    device.restart()
    assert device.installed == 1 and not (device.agent.root / "v2").exists()
    assert "still being checked" in device.agent.failed()["2"]
    code, summary = fleet.rollout(exports["v2"], "all", "--wait", "30")  # version 2 for real: not retried
    assert code == 0 and "still being checked" in summary["reports"][device.id]
    assert device.installed == 1 and len(device.checked) == 1


def test_a_federated_session_installs_a_rollout_and_samples_through_it(fleet, exports, tiny, tmp_path):  # noqa: F811
    """The SDK path: an EdgeClient's session enrols, takes version 1, and generates through the installed program."""
    import torch

    from edge_sdk import DeviceConfig, EdgeClient, LocalData
    from edge_sdk.session import FederatedSession

    _, base_path, _ = tiny
    client = EdgeClient(DeviceConfig(data_dir=tmp_path / "sdk-device", device_id=f"sdk-{uuid.uuid4().hex[:8]}",
                                     profile="simulator", quantization="none", base_model=base_path,
                                     enrolment_token=DEMO_TOKEN, inference_backend="executorch",
                                     aggregator_fingerprint=fleet.service.identity.public.fingerprint,
                                     export_dir=exports["v2"]))  # the export the app shipped with
    data = LocalData(torch.rand(4, 1, 16, 16), ("a bold 7",) * 4)
    session = FederatedSession(client, data, MqttConfig(url=fleet.mqtt_url, session_expiry_s=30))
    fleet.extra_sessions.append(f"fedaigc-{client.device_id}")
    try:
        session.start()
        assert session.enrolled.wait(30)
        code, summary = fleet.rollout(exports["v1"], "all", "--wait", "30")
        assert code == 0 and summary["reports"] == {client.device_id: "ok"}
        assert client.config.export_dir == session.rollout.current_dir() == session.rollout.root / "v1"
        images = client.generate("a bold 7", n=2, steps=2)
        assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    finally:
        session.stop()
