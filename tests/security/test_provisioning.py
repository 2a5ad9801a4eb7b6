"""Provisioned devices instead of trust on first use (issue 17): who a device trusts, who may enrol.

Against the real daemon on the real broker (a topic prefix per test): a device without a pin
refuses to start; a rogue retained key does not capture a provisioned device; a token enrols
its own device once; tokens are stored as digests and the state is owner-only; a revoked
device is refused from its next message; a rotated key is followed through its signed
hand-over and a forged hand-over is refused. The bundle codec and the key ring last.
"""

import json
import sqlite3
import stat
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.cli import main
from aggregator.config import AggregatorConfig
from aggregator.keyring import KeyRing, rotate_key
from aggregator.provisioning import provision_device
from aggregator.simulation.lite import LiteDevice
from aggregator.state import open_store, token_digest
from edge_sdk import EdgeClient, FederatedSession, LocalData, ProvisioningBundle
from edge_sdk.protocol.envelope import EnvelopeWriter, MessageType
from edge_sdk.protocol.errors import Refusal, RefusedMessage
from edge_sdk.protocol.handover import sign_handover
from edge_sdk.protocol.identity import Identity, seal_to
from edge_sdk.protocol.messages import AggregatorKeys, EnrolAck, KeyHandover
from edge_sdk.protocol.provisioning import DeviceCredentials
from edge_sdk.transport import MqttConfig, MqttTransport
from models.digits.data import make_personas
from models.lora import lora_to_dict
from tests.polling import wait_until
from tests.test_service import make_service

DATA = LocalData.from_persona(make_personas(1, 1, seed=0)[0])


def prefix() -> str:
    return f"prov{uuid.uuid4().hex[:8]}"


def bundle_for(service, device_id: str, tmp_path) -> ProvisioningBundle:
    """What `fedaigc provision` hands a device: a file, loaded on the device in one call."""
    path = tmp_path / f"{device_id}.json"
    provision_device(service.store, service.identity, service.config, device_id).save(path)
    return ProvisioningBundle.load(path)


def session_of(bundle: ProvisioningBundle, tmp_path, **overrides) -> FederatedSession:
    data_dir = tmp_path / bundle.device_id
    client = EdgeClient(bundle.device_config(data_dir, profile="simulator", local_steps=1, **overrides))
    return FederatedSession(client, DATA, bundle.mqtt_config(data_dir, session_expiry_s=30))


def publish_keys(mqtt_url: str, topic_prefix: str, mtype: MessageType, body) -> None:
    """Publish a retained key announcement as any broker client can (no ACLs on the shared broker)."""
    t = MqttTransport(MqttConfig(url=mqtt_url, topic_prefix=topic_prefix, session_expiry_s=0)).connect()
    try:
        env = EnvelopeWriter(ROGUE, body.aggregator_id).build(mtype, body.encode())
        t.wait_published(t.publish(t.topics.aggregator_keys, env, retain=True))
    finally:
        t.close()


ROGUE = Identity.generate()


def rogue_keys(service, chain=None):
    pub = ROGUE.public
    fields = (service.config.aggregator_id, pub.verify_key, pub.box_key, service.model_digest,
              lora_to_dict(service.config.lora))
    return AggregatorKeys(*fields) if chain is None else KeyHandover(*fields, chain)


@pytest.fixture
def daemon(tmp_path, mqtt_url):
    service = make_service(tmp_path, mqtt_url, mqtt_topic_prefix=prefix(), expected_devices=1, clustering="single",
                           rounds=2, local_steps=1, interaction=False, tokens=())
    yield service
    service.stop()


# ---------------------------------------------------------------------------------------------- trusting the aggregator
def test_a_device_without_a_fingerprint_refuses_to_start_and_names_both_fixes(tmp_path, daemon):
    bundle = bundle_for(daemon, "unpinned", tmp_path)
    session = session_of(bundle, tmp_path, aggregator_fingerprint=None)
    with pytest.raises(ValueError) as refused:
        session.start()
    assert "aggregator_fingerprint" in str(refused.value) and "trust_on_first_use=True" in str(refused.value)
    assert not session.transport.connected.is_set()


def test_a_rogue_retained_key_does_not_capture_a_provisioned_device(tmp_path, mqtt_url):
    service = make_service(tmp_path, mqtt_url, mqtt_topic_prefix=prefix(), expected_devices=2, tokens=())
    service.stop()  # the real aggregator is not announcing yet: the broker holds only the rogue's key
    service = type(service)(service.config)
    bundle = bundle_for(service, "victim", tmp_path)
    publish_keys(mqtt_url, service.config.mqtt_topic_prefix, MessageType.AGGREGATOR_KEYS, rogue_keys(service))
    session = session_of(bundle, tmp_path).start()
    try:
        wait_until(lambda: session.refusals["untrusted_key"] == 1, what="the rogue key refused")
        assert session.client.aggregator is None and not session.enrolled.is_set()
        service.start()  # the real announcement replaces the rogue's
        assert session.enrolled.wait(20)
        assert session.client.aggregator == service.identity.public
        assert session.refusals.counts() == {"untrusted_key": 1}
        assert service.store.device("victim").verify_key == session.client.identity.public.verify_key
    finally:
        session.stop()
        service.stop()


# ---------------------------------------------------------------------------------------------- tokens
def enrol_ack(device: LiteDevice, n: int = 1) -> EnrolAck:
    return EnrolAck.decode(device.wait_for(MessageType.ENROL_ACK, n)[n - 1][1])


def test_a_token_enrols_only_its_own_device_and_only_once(tmp_path, daemon):
    bundle = provision_device(daemon.store, daemon.identity, daemon.config, "owner")
    devices = [LiteDevice.from_bundle(bundle).start(),
               LiteDevice(bundle.broker_url, "thief", bundle.token, bundle.topic_prefix).start()]
    owner, thief = devices
    try:
        thief.enrol()
        ack = enrol_ack(thief)
        assert not ack.accepted and ack.reason.startswith("bad_token") and "issued for another device" in ack.reason
        owner.enrol()
        assert enrol_ack(owner).accepted
        owner.enrol()  # its ack was lost: enrolling again with the same keys is idempotent
        assert enrol_ack(owner, 2).accepted
        twin = LiteDevice.from_bundle(bundle)  # the same bundle, other keys: the token was used
        devices.append(twin.start())
        twin.enrol()
        ack = enrol_ack(twin)
        assert not ack.accepted and ack.reason.startswith("bad_token") and "other keys" in ack.reason
        assert daemon.refusals["bad_token"] == 2
        assert daemon.store.device("owner").verify_key == owner.identity.public.verify_key
        assert daemon.store.device("thief") is None
    finally:
        for d in devices:
            d.stop()


def test_a_bundle_lost_before_use_is_voided_by_revoking_its_token(tmp_path):
    state = tmp_path / "agg"
    bundle = tmp_path / "lost.json"
    assert main(["provision", "lost", "--out", str(bundle), "--state-dir", str(state)]) == 0
    assert main(["revoke", "--token-of", "lost", "--state-dir", str(state)]) == 0
    store = open_store(str(state / "state.db"))
    with pytest.raises(RefusedMessage) as refused:
        store.enrol("lost", b"v" * 32, b"b" * 32, "pi", ProvisioningBundle.load(bundle).token)
    assert refused.value.reason == Refusal.BAD_TOKEN and store.device("lost") is None


def test_a_tls_bundle_carries_the_ca_and_the_device_account_but_not_the_aggregators(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    config = AggregatorConfig(mqtt_url="mqtts://aggregator:its-password@broker.example:8883", mqtt_tls_ca=str(ca),
                              state_dir=tmp_path / "agg")
    store, identity = open_store(str(tmp_path / "state.db")), Identity.generate()
    creds = provision_device(store, identity, config, "tls-dev", mqtt_username="tls-dev", mqtt_password="pw")
    creds.save(tmp_path / "b.json")
    bundle = ProvisioningBundle.load(tmp_path / "b.json")
    assert bundle.broker_url == "mqtts://broker.example:8883"
    assert "its-password" not in (tmp_path / "b.json").read_text()
    mqtt = bundle.mqtt_config(tmp_path / "device")
    assert (mqtt.url, mqtt.credentials(), mqtt.tls) == ("mqtts://broker.example:8883", ("tls-dev", "pw"), True)
    assert Path(mqtt.tls_ca).read_text() == ca.read_text() and modes(Path(mqtt.tls_ca)) == {"broker-ca.pem": 0o600}
    device = bundle.device_config(tmp_path / "device", profile="simulator")
    assert (device.device_id, device.enrolment_token, device.aggregator_fingerprint) == (
        "tls-dev", creds.token, identity.public.fingerprint)


def test_stored_tokens_are_digests_not_the_tokens(tmp_path, mqtt_url):
    fleet_token = f"fleet-{uuid.uuid4().hex}"
    service = make_service(tmp_path, mqtt_url, mqtt_topic_prefix=prefix(), tokens=(fleet_token,))
    try:
        issued = provision_device(service.store, service.identity, service.config, "dev-a").token
        device = LiteDevice.from_bundle(provision_device(service.store, service.identity, service.config, "dev-b"))
        device.start().enrol()
        assert enrol_ack(device).accepted
        device.stop()
    finally:
        service.stop()
    db = tmp_path / "agg" / "state.db"
    raw = b"".join(p.read_bytes() for p in db.parent.glob("state.db*"))
    for token in (fleet_token, issued, device.token):
        assert token.encode() not in raw
    rows = dict(sqlite3.connect(db).execute("SELECT digest, label FROM enrolment_tokens").fetchall())
    assert token_digest(issued) in rows and token_digest(fleet_token) in rows
    assert sqlite3.connect(db).execute("SELECT token FROM devices WHERE device_id = 'dev-b'").fetchone()[0] == \
        token_digest(device.token)


def test_a_store_from_before_hashing_keeps_its_tokens_as_digests_only(tmp_path):
    db = tmp_path / "state.db"
    old = sqlite3.connect(db)
    old.execute("CREATE TABLE tokens (token TEXT PRIMARY KEY, label TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0)")
    old.execute("CREATE TABLE devices (device_id TEXT PRIMARY KEY, verify_key BLOB NOT NULL, box_key BLOB NOT NULL, "
                "profile TEXT NOT NULL, token TEXT NOT NULL, enrolled_at DOUBLE PRECISION NOT NULL, "
                "revoked INTEGER NOT NULL DEFAULT 0)")
    old.execute("INSERT INTO tokens (token, label) VALUES ('clear-fleet-token', 'config')")
    old.execute("INSERT INTO devices VALUES ('d1', ?, ?, 'pi', 'clear-fleet-token', 0, 0)", (b"v" * 32, b"b" * 32))
    old.commit()
    old.close()
    store = open_store(str(db))
    assert store.token_valid("clear-fleet-token") and store.device("d1").token == token_digest("clear-fleet-token")
    store.revoke_token("clear-fleet-token")  # still revokes the devices it enrolled
    assert store.device("d1").revoked
    store.close()
    tables = {name for (name,) in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "tokens" not in tables
    assert b"clear-fleet-token" not in b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))


def test_a_token_dropped_from_the_config_is_revoked_with_the_devices_it_enrolled(tmp_path):
    store = open_store(str(tmp_path / "state.db"))
    store.sync_config_tokens(["old", "kept"])
    store.enrol("d-old", b"v" * 32, b"b" * 32, "pi", "old")
    store.enrol("d-kept", b"w" * 32, b"b" * 32, "pi", "kept")
    assert store.sync_config_tokens(["kept"]) == 1  # what the daemon does at start
    assert not store.token_valid("old") and store.device("d-old").revoked
    assert store.token_valid("kept") and not store.device("d-kept").revoked


def modes(*paths) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths}


def test_state_keys_and_bundles_are_owner_only(tmp_path, daemon):
    state = daemon.config.state_dir
    out = tmp_path / "bundle.json"
    assert main(["provision", "dev-files", "--out", str(out), "--state-dir", str(state),
                 "--state", daemon.config.store_url]) == 0
    files = [state / "state.db", state / "state.db-wal", state / "state.db-shm", state / "aggregator.key", out]
    assert modes(*files) == {p.name: 0o600 for p in files}
    assert ProvisioningBundle.load(out).aggregator_fingerprint == daemon.identity.public.fingerprint


def test_files_made_too_wide_before_are_tightened_on_open(tmp_path):
    state = tmp_path / "old"
    open_store(str(state / "state.db")).close()
    Identity.generate().save(state / "aggregator.key")
    for p in state.iterdir():
        p.chmod(0o644)
    open_store(str(state / "state.db")).close()
    Identity.load_or_generate(state / "aggregator.key")
    assert set(modes(*state.iterdir()).values()) == {0o600}


# ---------------------------------------------------------------------------------------------- revoke
def test_a_revoked_device_is_refused_from_its_next_update_by_the_running_daemon(tmp_path, mqtt_url):
    service = make_service(tmp_path, mqtt_url, mqtt_topic_prefix=prefix(), expected_devices=2, tokens=())
    devices = [LiteDevice.from_bundle(provision_device(service.store, service.identity, service.config, f"r{i}"))
               .start() for i in range(2)]
    try:
        vector = np.random.default_rng(0).normal(size=384)
        for d in devices:
            d.join(vector)
        starts = [d.round_start() for d in devices]
        assert main(["revoke", "--device", "r1", "--state-dir", str(service.config.state_dir),
                     "--state", service.config.store_url]) == 0
        before = service.refusals["revoked"]
        delta = {k: torch.zeros(s) for k, s in service.shapes.items()}
        devices[1].send(devices[1].topics.update("r1"), devices[1].update_envelope(starts[1], delta))
        wait_until(lambda: service.refusals["revoked"] == before + 1, what="the revoked device's update refused")
        assert [u.device_id for u in service.store.updates(1)] == []
        devices[1].enrol()  # nor can its bundle enrol it again
        assert not enrol_ack(devices[1], 2).accepted
    finally:
        for d in devices:
            d.stop()
        service.stop()


# ---------------------------------------------------------------------------------------------- rotate
def test_after_rotate_key_a_pinned_device_follows_the_handover_and_trains_the_next_round(tmp_path, daemon):
    old = daemon.identity.public
    bundle = bundle_for(daemon, "follower", tmp_path)
    session = session_of(bundle, tmp_path).start()
    try:
        assert session.enrolled.wait(30)
        assert main(["rotate-key", "--state-dir", str(daemon.config.state_dir),
                     "--state", daemon.config.store_url]) == 0
        wait_until(lambda: daemon.identity.public != old, what="the daemon loaded the new key")
        wait_until(lambda: session.client.aggregator == daemon.identity.public, what="the device followed")
        assert session.finished.wait(120)  # both rounds trained, the final adapter installed
        summaries = daemon.store.round_summaries()
        assert [r for r, _, s in summaries if "follower" in s["accepted"]] == [1, 2]
        assert session.refusals.counts() == {}
        pinned = json.loads((session.client.data_dir / "session.json").read_text())["aggregator"]
        assert bytes.fromhex(pinned[0]) == daemon.identity.public.verify_key != old.verify_key
        restarted = session_of(bundle, tmp_path)  # the app restarts with the same, older bundle
        assert restarted.client.aggregator == daemon.identity.public
        later = provision_device(daemon.store, daemon.identity, daemon.config, "later")
        assert later.aggregator_fingerprint == daemon.identity.public.fingerprint != old.fingerprint
    finally:
        session.stop()


def test_a_forged_handover_is_refused_and_the_device_keeps_its_pin(tmp_path, daemon):
    session = session_of(bundle_for(daemon, "steadfast", tmp_path), tmp_path).start()
    try:
        assert session.enrolled.wait(30)
        real = daemon.identity.public
        forged = sign_handover(ROGUE, ROGUE.public)
        forged[:2] = [real.verify_key, real.box_key]  # claims the real key vouched for the rogue's
        publish_keys(daemon.config.mqtt_url, daemon.config.mqtt_topic_prefix, MessageType.KEY_HANDOVER,
                     rogue_keys(daemon, [forged]))
        wait_until(lambda: session.refusals["bad_signature"] == 1, what="the forged hand-over refused")
        unrelated = sign_handover(Identity.generate(), ROGUE.public)
        publish_keys(daemon.config.mqtt_url, daemon.config.mqtt_topic_prefix, MessageType.KEY_HANDOVER,
                     rogue_keys(daemon, [unrelated]))
        wait_until(lambda: session.refusals["untrusted_key"] == 1, what="a hand-over not from the pin refused")
        assert session.client.aggregator == real
    finally:
        session.stop()


def test_a_key_handover_is_refused_by_a_reader_of_plain_announcements():
    """A device without the hand-over logic reads announcements as ``AggregatorKeys``: it refuses the
    hand-over's body (counted, ``malformed``) rather than take the new key silently."""
    pub = ROGUE.public
    body = KeyHandover("agg", pub.verify_key, pub.box_key, "m", {}, [sign_handover(ROGUE, pub)]).encode()
    with pytest.raises(RefusedMessage) as refused:
        AggregatorKeys.decode(body)
    assert refused.value.reason == Refusal.MALFORMED


def test_the_retired_key_opens_sealed_messages_for_its_grace_period_only(tmp_path):
    store = open_store(str(tmp_path / "state.db"))
    ring = KeyRing(tmp_path / "aggregator.key", store)
    retired = ring.public
    for grace_s, opens in ((60.0, True), (0.0, False)):
        rotate_key(tmp_path / "aggregator.key", store, grace_s=grace_s)
        assert ring.refresh()
        sealed = seal_to(ring.handovers[-1][1], b"sealed before the device followed")
        if opens:
            assert ring.open_sealed(sealed) == b"sealed before the device followed"
        else:
            time.sleep(0.01)
            with pytest.raises(RefusedMessage):
                ring.open_sealed(sealed)
            assert not (tmp_path / "aggregator.key.previous").exists()
    assert ring.public != retired and len(ring.handovers) == 2


# ---------------------------------------------------------------------------------------------- the bundle codec
text = st.text(min_size=1, max_size=40)
credentials = st.builds(DeviceCredentials, device_id=text, broker_url=text, topic_prefix=text, aggregator_id=text,
                        aggregator_fingerprint=text, token=text, ca_pem=st.none() | st.text(max_size=200),
                        mqtt_username=st.none() | text, mqtt_password=st.none() | text)


@settings(max_examples=200, deadline=None)
@given(credentials)
def test_a_bundle_reads_back_as_it_was_written(creds):
    assert DeviceCredentials.from_json(creds.to_json()) == creds


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["format", "device_id", "broker_url", "topic_prefix", "token",
                                                  "aggregator_id", "aggregator_fingerprint", "ca_pem", "extra"]),
                                 json_values, max_size=9).map(lambda d: json.dumps(d).encode())))
def test_anything_but_a_bundle_is_a_value_error(data):
    try:
        DeviceCredentials.from_json(data)
    except ValueError:
        return
    raise AssertionError(f"accepted {data!r}")  # only a complete bundle of strings parses
